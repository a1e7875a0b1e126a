"""The page's controls, generated from the option definitions (no Gradio here).

Every field of :class:`~diffbir.pipeline.options.InferenceConfig` gets a control from its
:class:`~diffbir.schema.Setting` and type hint (choices: a dropdown; bool: a checkbox; int and
float: a number box with the field's range; str: a text box), unless :func:`absent_reason`
says why it is not on the page: :data:`ABSENT` is the one list of those. A field added to the
options appears on the page without a demo edit, in the section of its Setting's group.

The page's values become a config as flags do on the command line: the values that differ
from the server's config (its ``--config``, ``key=value`` and flags) replace them, the options
check themselves, and a changed value that the config would ignore is refused
(:func:`~diffbir.schema.check_needs`) with the command line's message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from diffbir.pipeline.arguments import build_parser
from diffbir.pipeline.options import SHORTHANDS, InferenceConfig, Shorthand
from diffbir.pipeline.presets import default_config
from diffbir.schema import SettingError, check_needs, describe, leaves, name_of, spec_of

BASIC = "basic"
# The controls shown first, in this order; every other one goes to the advanced section of its
# Setting's group.
BASIC_KEYS = (
    "version",
    "task",
    "restore.upscale",
    "restore.steps",
    "restore.sampler.name",
    "restore.cfg_scale",
    "restore.pos_prompt",
    "restore.neg_prompt",
    "seed",
)
SELECTORS = ("version", "task")  # they select the defaults of the others

_STARTING_VALUES = (
    "fixed when the server starts: the server's --config and key=value overrides give the "
    "controls their starting values, then the controls are the config"
)
_LOADED_ONCE = (
    "fixed when the server starts: the models are loaded once, on this device and in this "
    "precision (diffbir-demo --device, --precision)"
)
# Command-line options deliberately not on the page, by parser destination: a dotted config key,
# or a prefix ending in "." for a whole section. The reason is shown on the page.
ABSENT = {
    "config": _STARTING_VALUES,
    "overrides": _STARTING_VALUES,
    "device": _LOADED_ONCE,
    "precision": _LOADED_ONCE,
    "weights.": "fixed when the server starts (diffbir-demo --weights-dir, --sd-weights, ...): "
    "a page does not choose the server's files",
    "prompts": "a CSV of per-image prompts is for folders; the page's image takes the "
    "positive prompt",
    "batch_size": "the page restores one image at a time (a batch never changes an output)",
    "run.": "how and where a run goes (input and output folders, resume, progress bars, "
    "processes, memory reuse, torch.compile): the page restores its upload in a temporary "
    "folder, in the server's one process, with its own progress bar",
}
# A value of these kinds names a file of the server: never asked for by the page.
FILE_METAVARS = ("PATH", "DIR", "CSV", "YAML", "NAME_OR_YAML", "DIR_OR_REPO")
_FILE_VALUE = "names a file on the server; a page does not choose the server's files"


def absent_reason(key: str) -> str | None:
    """Why the option of ``key`` (a dotted config key, or a destination of ``diffbir-infer``'s
    parser) is not on the page; ``None`` when it has a control."""
    for name, reason in ABSENT.items():
        if key == name or (name.endswith(".") and key.startswith(name)):
            return reason
    spec = {k: spec_of(f) for k, f, _ in leaves(InferenceConfig)}.get(key)
    if spec is not None and spec.metavar in FILE_METAVARS:
        return _FILE_VALUE
    return None


def absent_options() -> dict[str, list[str]]:
    """The options of ``diffbir-infer`` that are not on the page (flags, and ``key=value``),
    grouped by the reason."""
    grouped: dict[str, list[str]] = {}
    for action in build_parser()._actions:
        reason = absent_reason(action.dest)
        if reason is not None:
            name = action.option_strings[0] if action.option_strings else str(action.metavar)
            grouped.setdefault(reason, []).append(name)
    return grouped


def _scalar(hint: Any) -> tuple[Any, bool]:
    """``(type, None allowed)`` of a hint (``int | None`` -> ``(int, True)``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        return (args[0] if len(args) == 1 else hint), optional
    return hint, False


@dataclass(frozen=True)
class Control:
    """One control of the page: the config ``key`` it sets and how to show it.

    ``kind``: ``dropdown`` (``choices``), ``checkbox``, ``number`` (``integer``, ``minimum``,
    ``maximum``, ``step``), ``text``, or ``yaml`` (a value of another type, typed as YAML);
    ``optional``: an empty box means "not set" (``None``): such a number is typed in a text
    box (:attr:`typed`), since a number box cannot be empty; ``section``: :data:`BASIC` or the
    Setting's group.
    """

    key: str
    name: str  # how errors call it: its flag, else its key
    kind: str
    label: str
    info: str
    section: str
    choices: tuple[Any, ...] | None = None
    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    optional: bool = False

    @property
    def typed(self) -> bool:
        """Whether the page shows a text box (text, YAML, a number that may be unset)."""
        return self.kind in ("text", "yaml") or (self.kind == "number" and self.optional)

    @property
    def elem_id(self) -> str:
        """The HTML id of the control on the page."""
        return "opt-" + self.key.replace(".", "-").replace("_", "-")

    def to_page(self, value: Any) -> Any:
        """The control's value for the config value ``value``."""
        if value is None:
            return "" if self.typed else None
        if self.kind == "yaml":
            return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
        return str(value) if self.typed and self.kind == "number" else value

    def from_page(self, value: Any) -> Any:
        """The config value of the control's value ``value`` (the options check it)."""
        if value is None or (self.optional and value == ""):
            return None
        if self.kind == "number" and isinstance(value, str):
            try:
                return int(value) if self.integer else float(value)
            except ValueError:
                what = "an integer" if self.integer else "a number"
                raise SettingError(f"{self.name}: expected {what}, got {value!r}") from None
        if self.kind == "number":
            if self.integer and isinstance(value, float) and value.is_integer():
                return int(value)
            if not self.integer and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
        if self.kind == "yaml":
            try:
                return yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise SettingError(f"{self.name}: expected a YAML value, got {value!r}") from err
        return value


def _label(key: str, flag: str | None) -> str:
    if flag is None:
        return key
    return f"{flag.lstrip('-').replace('-', ' ')} ({flag})"


def _control(key: str, field: dataclasses.Field, hint: Any) -> Control:
    spec = spec_of(field)
    kind_of, optional = _scalar(hint)
    section = BASIC if key in BASIC_KEYS else (spec.group or "other")
    info = spec.help + (" (empty: not set)" if optional else "")
    common = {"key": key, "name": name_of(field, key[: -len(field.name)]),
              "label": _label(key, spec.flag), "info": info, "section": section,
              "optional": optional}  # fmt: skip
    choices = spec.allowed()
    if choices is not None:
        return Control(kind="dropdown", choices=tuple(choices), **common)
    if kind_of is bool:
        return Control(kind="checkbox", **common)
    if kind_of in (int, float):
        step = spec.multiple or (1 if kind_of is int else 0.1)
        return Control(kind="number", integer=kind_of is int, minimum=spec.low,
                       maximum=spec.high, step=step, **common)  # fmt: skip
    if kind_of is str:
        return Control(kind="text", **common)
    return Control(kind="yaml", **{**common, "info": f"{info} ({describe(hint)}, as YAML)"})


def controls(cls: type = InferenceConfig) -> list[Control]:
    """A control per field of ``cls`` that the page shows: the basic ones in
    :data:`BASIC_KEYS` order, then the others in the order of their definition."""
    made = [_control(key, field, hint) for key, field, hint in leaves(cls)
            if absent_reason(key) is None]  # fmt: skip
    basic = sorted((c for c in made if c.section == BASIC), key=lambda c: BASIC_KEYS.index(c.key))
    return basic + [c for c in made if c.section != BASIC]


def sections(shown: Iterable[Control]) -> dict[str, list[Control]]:
    """The controls by section, in order of first appearance."""
    grouped: dict[str, list[Control]] = {}
    for control in shown:
        grouped.setdefault(control.section, []).append(control)
    return grouped


def shorthands(shown: Iterable[Control]) -> list[Shorthand]:
    """The shorthands (``--tiled``, ``--guidance``) whose every value has a control: a button
    each on the page."""
    keys = {c.key for c in shown}
    return [s for s in SHORTHANDS if set(s.expand({})) <= keys]


# ----------------------------------------------------------------------- values and configs


def value_at(cfg: Any, key: str) -> Any:
    """The value of dotted ``key`` in a config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_values(cfg: InferenceConfig, shown: Iterable[Control]) -> dict[str, Any]:
    """``{key: value}`` of ``cfg`` for each shown control (config values, not page values)."""
    return {c.key: value_at(cfg, c.key) for c in shown}


def _replaced(obj: Any, values: Mapping[str, Any]) -> Any:
    """``obj`` (a dataclass) with dotted ``values`` replaced; each dataclass rebuilt checks
    itself."""
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            own[head] = value
    for head, sub in nested.items():
        own[head] = _replaced(getattr(obj, head), sub)
    return dataclasses.replace(obj, **own)


def page_config(base: InferenceConfig, values: Mapping[str, Any]) -> InferenceConfig:
    """The config of the page's ``values`` (config values by key) over the server's ``base``,
    checked as the command line's flags are; a refused value raises
    :class:`~diffbir.schema.SettingError` naming its flag."""
    changed = {k: v for k, v in values.items() if v != value_at(base, k)}
    cfg = _replaced(base, changed)
    check_needs(cfg, list(changed))
    return cfg


def follow_selection(values: Mapping[str, Any], old: tuple[str, str],
                     new: tuple[str, str]) -> dict[str, Any]:  # fmt: skip
    """The values after the version and task change from ``old`` to ``new``: each value still
    at the old version and task's default takes the new one's (steps, sampler, CFG, prompts,
    upscale); a value set otherwise (by hand or by the server's config) stays."""
    before, after = default_config(*old), default_config(*new)
    return {
        key: value_at(after, key) if key not in SELECTORS and value == value_at(before, key)
        else value
        for key, value in values.items()
    }  # fmt: skip


def apply_shorthand(shorthand: Shorthand, base: InferenceConfig,
                    values: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The values a shorthand's button sets, as its flag would: values changed on the page
    count as typed and stay."""
    given = {k: v for k, v in values.items() if v != value_at(base, k)}
    return {k: v for k, v in shorthand.expand(given).items() if k in values}
