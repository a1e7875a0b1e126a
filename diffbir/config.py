"""YAML configs (OmegaConf) and model construction from them."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from diffbir.models import model_class
from diffbir.schema import SettingError, check_arguments

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used: the message names the file and the key."""


def resolve_config_path(path_or_name: str | os.PathLike, group: str = "model") -> Path:
    """A YAML path, or a bare name looked up in ``configs/<group>/<name>.yaml``."""
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path.resolve()}")
        return path
    candidate = CONFIG_ROOT / group / f"{path_or_name}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / group).glob("*.yaml"))
        raise FileNotFoundError(
            f"no config named {str(path_or_name)!r} in {CONFIG_ROOT / group}; known: {known}"
        )
    return candidate


def load_yaml(path: str | os.PathLike) -> DictConfig:
    """A YAML mapping as a DictConfig; :class:`ConfigError` names the file (and the line of a
    syntax error) when it cannot be read or is not a mapping."""
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from err
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: cannot be read ({str(err).splitlines()[0]})") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, got a list")
    return cfg


def load_config(
    path_or_name: str | os.PathLike | DictConfig,
    overrides: Sequence[str] = (),
    group: str = "model",
) -> DictConfig:
    """Load a YAML config and apply ``key=value`` dot-list overrides.

    An override whose key does not exist in the file is an error (struct mode), so that a typo
    fails before any work starts.
    """
    if isinstance(path_or_name, DictConfig):
        cfg = path_or_name
    else:
        cfg = load_yaml(resolve_config_path(path_or_name, group))
    OmegaConf.set_struct(cfg, True)
    for override in overrides:  # one at a time, so that an error names the bad one
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:  # unknown key, bad value
            first_line = getattr(err, "problem", None) or (str(err).strip().splitlines() or [""])[0]
            raise ConfigError(f"bad config override {override!r}: {first_line}") from err
    return cfg


def _model_class(cfg: Mapping[str, Any], source: str) -> tuple[type, dict[str, Any]]:
    """The class and checked params of ``{"name": registry name, "params": {...}}``: unknown
    keys and wrong types, sub-configs included (a model class with a ``check_params``
    classmethod checks its own), are a :class:`ConfigError` naming ``source`` and the key."""
    if "name" not in cfg:
        raise ConfigError(
            f"{source}: needs a 'name' key (one of the registry names), got keys {sorted(cfg)}"
        )
    unknown = sorted(set(cfg) - {"name", "params"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; expected 'name' and 'params'")
    try:
        cls = model_class(cfg["name"])
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{source}: name: {err}") from err
    params = cfg.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: params: expected a mapping, got {params!r}")
    try:
        if hasattr(cls, "check_params"):
            cls.check_params(params)
        else:
            check_arguments(cls, params, "params")
    except (SettingError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err
    return cls, params


def _as_mapping(cfg: DictConfig | dict[str, Any], source: str) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {str(err).splitlines()[0]}") from err
    return cfg


def check_model_config(cfg: DictConfig | str | os.PathLike, source: str | None = None) -> None:
    """Every check of :func:`build_model` without building: for a run to refuse a bad model
    config before it writes or loads anything."""
    if not isinstance(cfg, DictConfig):
        source = source or str(cfg)
        cfg = load_config(cfg)
    source = source or "model config"
    _model_class(_as_mapping(cfg, source), source)


def build_model(
    cfg: DictConfig | dict[str, Any] | str | os.PathLike, source: str | None = None
) -> nn.Module:
    """Build ``{"name": registry name, "params": {...}}`` (or a path/name of such a YAML).

    A key the model does not take, a value of the wrong type or any other failure to build is a
    :class:`ConfigError` naming ``source`` (the config's path or name) and the key.
    """
    if not isinstance(cfg, (DictConfig, dict)):
        source = source or str(cfg)
        cfg = load_config(cfg)
    source = source or "model config"
    mapping = _as_mapping(cfg, source)
    cls, params = _model_class(mapping, source)
    try:
        return cls(**params)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(
            f"{source}: cannot build {mapping['name']!r} from its params: {err}"
        ) from err
