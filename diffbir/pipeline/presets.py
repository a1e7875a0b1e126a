"""Inference presets: one structured config (:class:`InferenceConfig`) for everything that decides
a restoration, loaded from YAML (``configs/inference/*.yaml``) with ``key=value`` overrides.

Precedence, lowest to highest: the dataclass defaults with the defaults of the model version
(:mod:`diffbir.versions`), the preset YAML, ``key=value`` overrides, explicit command-line flags.
The presets are dumps of :func:`default_config` (``python -m diffbir.pipeline.presets`` writes
them); the effective config of a run is written beside its outputs as ``config.yaml``, and a
run from that file gives the same outputs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from diffbir.captioning import OFFICIAL_CAPTIONER
from diffbir.config import CONFIG_ROOT, ConfigError, load_config, load_yaml, resolve_config_path
from diffbir.pipeline.options import InferenceConfig, RestoreOptions, SamplerOptions
from diffbir.schema import check_needs
from diffbir.versions import (
    DEFAULT_UPSCALE,
    DEFAULT_VERSION,
    TASKS,
    VERSION_NAMES,
    VERSIONS,
    ModelVersion,
    custom_version,
)

PRESET_GROUP = "inference"
CONFIG_FILE = "config.yaml"
# keys that do not change any output (left out when comparing with an earlier run's config)
OUTPUT_NEUTRAL_KEYS = ("batch_size", "caption.batch_size", "faces.batch")


def _sampling_defaults(version: str) -> ModelVersion:
    return VERSIONS[version] if version in VERSIONS else custom_version("eps", False)


def default_config(version: str = DEFAULT_VERSION, task: str = "sr") -> InferenceConfig:
    """The defaults of ``version`` and ``task``: the dataclass defaults with the version's
    sampler, steps, CFG scale and prompts and the task's upscale."""
    if version not in VERSION_NAMES:
        raise ValueError(f"--version: expected one of {list(VERSION_NAMES)}, got {version!r}")
    if task not in TASKS:
        raise ValueError(f"--task: expected one of {list(TASKS)}, got {task!r}")
    v = _sampling_defaults(version)
    restore = RestoreOptions(
        upscale=DEFAULT_UPSCALE[task],
        steps=v.steps,
        cfg_scale=v.cfg_scale,
        pos_prompt=v.pos_prompt,
        neg_prompt=v.neg_prompt,
        sampler=SamplerOptions(name=v.sampler),
    )
    return InferenceConfig(version=version, task=task, restore=restore)


def dump(cfg: DictConfig | InferenceConfig) -> str:
    """The YAML text of a config (what presets and ``config.yaml`` hold)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(cfg)


def _user_error(what: str, err: Exception) -> ValueError:
    first_line = (str(err).strip().splitlines() or [""])[0]
    key = getattr(err, "full_key", None)  # omegaconf errors know the dotted key
    return ValueError(f"{what}: {f'{key}: ' if key else ''}{first_line}")


def _selected(name: str, flags: Mapping[str, Any], overrides: DictConfig, preset: DictConfig):
    for source in (flags, overrides, preset):
        value = source.get(name) if source is not None else None
        if value is not None:
            return value
    return None


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def resolve_config(
    preset: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> tuple[InferenceConfig, DictConfig]:
    """The effective config: defaults of the version and task, then ``preset`` (a YAML path or
    a name in ``configs/inference/``), ``overrides`` (``key=value``) and ``flags`` (dotted keys
    of explicitly given flags). Returns the checked dataclass and its DictConfig.

    A preset is made for one version and task (its upscale, prompts and sampler are theirs):
    selecting another one with a flag or override is refused, naming the preset to use.
    """
    flags = dict(flags or {})
    preset_cfg = OmegaConf.create()
    if preset is not None:
        path = resolve_config_path(preset, PRESET_GROUP)
        try:
            preset_cfg = load_yaml(path)
        except ConfigError as err:
            raise ConfigError(f"--config {err}") from err
    try:
        override_cfg = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise _user_error(f"bad override in {list(overrides)}", err) from err
    selection = {}
    for name in ("version", "task"):
        chosen = _selected(name, flags, override_cfg, None)
        in_preset = preset_cfg.get(name)
        if chosen is not None and in_preset is not None and chosen != in_preset:
            raise ValueError(
                f"--{name} {chosen}: the preset {preset} is for {name} {in_preset} (its defaults "
                f"are that {name}'s); use the preset of {name} {chosen} in "
                f"{CONFIG_ROOT / PRESET_GROUP}, or no --config"
            )
        selection[name] = chosen if chosen is not None else in_preset
    version = selection["version"] or DEFAULT_VERSION
    task = selection["task"] or "sr"
    cfg = OmegaConf.structured(default_config(str(version), str(task)))
    try:
        cfg = OmegaConf.merge(cfg, preset_cfg)
    except OmegaConfBaseException as err:
        raise _user_error(f"--config {preset}", err) from err
    cfg = load_config(cfg, list(overrides))  # one at a time: an error names the bad one
    try:
        cfg = OmegaConf.merge(cfg, _nested(flags))
    except OmegaConfBaseException as err:
        raise _user_error("bad flag value", err) from err
    try:
        checked = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _user_error("config", err) from err
    check_needs(checked, [*flags, *(item.split("=", 1)[0] for item in overrides)])
    return checked, cfg


def differing_keys(old: DictConfig, new: DictConfig) -> list[str]:
    """Dotted keys whose values differ between two configs (output-neutral keys left out)."""

    def flat(cfg: DictConfig) -> dict[str, Any]:
        items: dict[str, Any] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, Mapping):
                for key, value in node.items():
                    walk(value, f"{prefix}{key}.")
            else:
                items[prefix[:-1]] = node

        walk(OmegaConf.to_container(cfg), "")
        return {k: v for k, v in items.items() if k not in OUTPUT_NEUTRAL_KEYS}

    a, b = flat(old), flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def with_defaults(cfg: DictConfig) -> DictConfig:
    """An earlier run's config with the keys added since at their defaults (of its version and
    task); unchanged when it cannot be read as a config of today's options."""
    try:
        base = OmegaConf.structured(default_config(str(cfg.version), str(cfg.task)))
        return OmegaConf.merge(base, cfg)
    except (ValueError, OmegaConfBaseException):
        return cfg


def preset_name(version: str, task: str) -> str:
    """File stem of the preset of ``version`` and ``task`` (``sr`` is the version's own)."""
    return version if task == "sr" else f"{version}_{task}"


def preset_text(version: str, task: str) -> str:
    """The content of a preset file: a header and the dump of :func:`default_config`."""
    header = (
        f"# DiffBIR {version}, task {task}: the version's defaults (diffbir/versions.py).\n"
        "# Written by `python -m diffbir.pipeline.presets`; weights null = the official file of\n"
        "# the version and task, looked for in weights.dir ($DIFFBIR_WEIGHTS_DIR or weights/).\n"
        f"# diffbir-infer --config {preset_name(version, task)} [key=value ...] [flags]\n"
    )
    if version == DEFAULT_VERSION:
        header += (
            f"# The official run captions every input ({OFFICIAL_CAPTIONER}, 4-bit on CUDA); "
            "ours does not by\n"
            f"# default (caption.name none). --captioner {OFFICIAL_CAPTIONER} reproduces it, "
            "as --seed-mode official\n# does the official seeding.\n"
        )
    return header + dump(default_config(version, task))


def write_presets(folder: Path = CONFIG_ROOT / PRESET_GROUP) -> list[Path]:
    """Write the preset of every official version and each of its tasks (except ``custom``)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for version in VERSIONS.values():
        for task in version.tasks:
            if task == "custom":
                continue
            path = folder / f"{preset_name(version.name, task)}.yaml"
            path.write_text(preset_text(version.name, task))
            written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_presets():
        print(written_path, file=sys.stderr)
