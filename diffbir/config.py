"""YAML configs (OmegaConf) and model construction from them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffbir.models import model_class

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


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
        cfg = OmegaConf.load(resolve_config_path(path_or_name, group))
    OmegaConf.set_struct(cfg, True)
    for override in overrides:  # one at a time, so that an error names the bad one
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
        except Exception as err:  # omegaconf raises ConfigKeyError / ValidationError
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"bad config override {override!r}: {first_line}") from err
    return cfg


def build_model(cfg: DictConfig | dict[str, Any] | str | os.PathLike) -> nn.Module:
    """Build ``{"name": registry name, "params": {...}}`` (or a path/name of such a YAML)."""
    if not isinstance(cfg, (DictConfig, dict)):
        cfg = load_config(cfg)
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if "name" not in cfg:
        raise ValueError(
            f"model config needs a 'name' key (one of the registry names), got {sorted(cfg)}"
        )
    params = cfg.get("params") or {}
    return model_class(cfg["name"])(**params)
