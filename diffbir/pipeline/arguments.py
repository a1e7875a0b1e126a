"""The command line of ``diffbir-infer``, generated from :mod:`diffbir.pipeline.options`.

Every field of :class:`~diffbir.pipeline.options.InferenceConfig` and
:class:`~diffbir.pipeline.options.RunOptions` with a flag becomes one argument whose
destination is the field's dotted key (run options under ``run.``); flags default to "not
given", so that the dataclasses stay the only home of defaults and a preset's value is kept
unless a flag is typed. :data:`~diffbir.pipeline.options.SHORTHANDS` add the flags that stand
for several values.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from diffbir.pipeline.options import SHORTHANDS, InferenceConfig, RunOptions
from diffbir.pipeline.presets import PRESET_GROUP, default_config
from diffbir.schema import Setting, leaves, spec_of
from diffbir.versions import VERSIONS

RUN_PREFIX = "run."
SHORTHAND_PREFIX = "shorthand."
_SELECTORS = ("version", "task")  # they select the defaults of the others
_METAVARS = {int: "N", float: "X", str: "TEXT"}
DESCRIPTION = (
    "Blind image restoration with DiffBIR (stage-1 cleaner + IRControlNet on Stable Diffusion "
    "2.1). Without --input, restores degraded scikit-image sample photos. Settings: the defaults "
    "of --version, then --config PRESET, then key=value overrides (e.g. restore.steps=20), then "
    "flags."
)


@dataclass
class Invocation:
    """A parsed command line: the preset, the ``key=value`` overrides, the config values of
    the flags that were typed (``{dotted key: value}``, shorthands expanded) and the run
    options."""

    preset: str | None
    overrides: list[str]
    flags: dict[str, Any]
    run: RunOptions


def _value_type(hint: Any) -> Any:
    """The scalar type a flag parses (``int | None`` -> ``int``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


@functools.cache
def _preset_defaults() -> tuple[InferenceConfig, ...]:
    return tuple(
        default_config(v.name, task) for v in VERSIONS.values() for task in v.tasks
    )


def _version_dependent(key: str) -> bool:
    """Whether the default of ``key`` differs between the versions' and tasks' presets."""
    values = set()
    for cfg in _preset_defaults():
        node: Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        values.add(node)
    return len(values) > 1


def _help(key: str, spec: Setting, default: Any, run: bool) -> str:
    if default is None:
        return spec.help
    if isinstance(default, bool):
        return f"{spec.help} (default: {'on' if default else 'off'})"
    if not run and key not in _SELECTORS and _version_dependent(key):
        return f"{spec.help} (default: the version's, see configs/{PRESET_GROUP}/)"
    return f"{spec.help} (default: {default})"


def _add(groups: dict[str, Any], parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    for key, field, hint in leaves(cls):
        spec = spec_of(field)
        if spec.flag is None:
            continue
        group_name = spec.group or "options"
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        default = field.default if field.default is not dataclasses.MISSING else None
        kwargs: dict[str, Any] = {
            "dest": prefix + key,
            "default": argparse.SUPPRESS,
            "help": _help(key, spec, default, bool(prefix)),
        }
        value_type = _value_type(hint)
        if value_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = value_type
            choices = spec.allowed()
            if choices is not None:
                kwargs["choices"] = list(choices)
            else:
                kwargs["metavar"] = spec.metavar or _METAVARS.get(value_type)
        groups[group_name].add_argument(spec.flag, **kwargs)


def build_parser(
    prog: str = "diffbir-infer", description: str = DESCRIPTION, run_options: bool = True
) -> argparse.ArgumentParser:
    """The argument parser of ``diffbir-infer``: ``--config``, ``key=value`` overrides, a flag
    per config field and the shorthands, and (``run_options``) a flag per run option. Another
    command that takes the same config (``diffbir-demo``) passes its own ``prog`` and adds its
    own arguments."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)"
    )
    parser.add_argument(
        "--config",
        help=f"inference preset: a YAML file, or a name in configs/{PRESET_GROUP}/ (v2.1)",
    )
    groups: dict[str, Any] = {}
    _add(groups, parser, InferenceConfig, "")
    if run_options:
        _add(groups, parser, RunOptions, RUN_PREFIX)
    for shorthand in SHORTHANDS:
        groups[shorthand.group].add_argument(
            shorthand.flag,
            dest=SHORTHAND_PREFIX + shorthand.flag.lstrip("-"),
            action="store_true",
            help=shorthand.help,
        )
    return parser


def invocation(namespace: dict[str, Any]) -> Invocation:
    """The :class:`Invocation` of parsed arguments (``vars`` of a namespace of a parser made
    by :func:`build_parser`; arguments a command added for itself are left out). A bad value
    of a run option raises :class:`~diffbir.schema.SettingError`."""
    config_keys = {key for key, _, _ in leaves(InferenceConfig)}
    flags = {key: value for key, value in namespace.items() if key in config_keys}
    for shorthand in SHORTHANDS:
        if namespace[SHORTHAND_PREFIX + shorthand.flag.lstrip("-")]:
            flags.update(shorthand.expand(flags))
    run = {k[len(RUN_PREFIX) :]: v for k, v in namespace.items() if k.startswith(RUN_PREFIX)}
    return Invocation(namespace["config"], list(namespace["overrides"]), flags, RunOptions(**run))


def parse(argv: Sequence[str] | None = None) -> Invocation:
    """Parse a command line (``SystemExit`` 2 with argparse's message on a malformed one; a
    bad value of a run option raises :class:`~diffbir.schema.SettingError`)."""
    return invocation(vars(build_parser().parse_intermixed_args(argv)))
