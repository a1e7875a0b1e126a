"""YAML configs (OmegaConf) and model construction from them."""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from diffbir.models import model_class

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
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{source}: {str(err).splitlines()[0]}") from err
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
    check_params(cls, params, source)
    try:
        return cls(**params)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"{source}: cannot build {cfg['name']!r} from its params: {err}") from err


_SIMPLE_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               type(None): "null"}  # fmt: skip


def check_params(cls: type, params: dict[str, Any], source: str) -> None:
    """Unknown keys and values of the wrong simple type (int, float, bool, str) are a
    :class:`ConfigError` naming ``params.<key>``, from ``cls.__init__``'s signature and hints."""
    signature = inspect.signature(cls.__init__)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    known = [name for name in signature.parameters if name != "self"]
    if not takes_any:
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {['params.' + k for k in unknown]} for "
                f"{cls.__name__}; known keys: {known}"
            )
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: the build itself reports bad values
        return
    for key, value in params.items():
        allowed = _allowed_types(hints.get(key))
        if allowed is None or value is None and type(None) in allowed:
            continue
        bad_bool = isinstance(value, bool) and bool not in allowed
        if bad_bool or not isinstance(value, allowed):
            names = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in allowed if t is not int
                                              or float not in allowed))
            raise ConfigError(f"{source}: params.{key}: expected {names}, got {value!r}")


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """The Python types a simple annotation admits (``None`` when it is not simple)."""
    if hint in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_allowed_types(a) if a is not type(None) else (type(None),)
                 for a in typing.get_args(hint)]  # fmt: skip
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts for t in p)
    return None
