"""Tasks of the v2 pipeline and building a :class:`Restorer` from configs and weight files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffbir.checkpoint import load_weights, read_state_dict
from diffbir.config import build_model, load_config
from diffbir.pipeline.device import PRECISIONS, resolve_device, warn_if_slow_precision
from diffbir.pipeline.restorer import Restorer, Stage1
from diffbir.weights import check_weights, weight_path

SD_FILE = "v2-1_512-ema-pruned.ckpt"
CONTROLNET_FILE = "v2.pth"


@dataclass(frozen=True)
class Task:
    """A restoration task: its stage-1 model (config and official file) and default upscale."""

    stage1_config: str | None
    stage1_file: str | None
    resize_first: bool
    default_upscale: float


TASKS: dict[str, Task] = {
    "sr": Task("bsrnet", "BSRNet.pth", resize_first=False, default_upscale=4.0),
    "denoise": Task("scunet", "scunet_color_real_psnr.pth", resize_first=True, default_upscale=1.0),
    "face": Task("swinir", "face_swinir_v1.ckpt", resize_first=True, default_upscale=1.0),
    "custom": Task(None, None, resize_first=False, default_upscale=1.0),
}


@dataclass(frozen=True)
class WeightPaths:
    """The weight files of one run (``stage1`` is ``None`` when there is no stage-1 model)."""

    sd: Path
    controlnet: Path
    stage1: Path | None


def resolve_weight_paths(
    task: str,
    weights_dir: str | os.PathLike | None = None,
    *,
    sd: str | os.PathLike | None = None,
    controlnet: str | os.PathLike | None = None,
    stage1: str | os.PathLike | None = None,
) -> WeightPaths:
    """Explicit paths win; else the official file names in the weights folder."""
    spec = TASKS[task]
    stage1_path = Path(stage1) if stage1 else None
    if stage1_path is None and spec.stage1_file:
        stage1_path = weight_path(spec.stage1_file, weights_dir)
    return WeightPaths(
        sd=Path(sd) if sd else weight_path(SD_FILE, weights_dir),
        controlnet=Path(controlnet) if controlnet else weight_path(CONTROLNET_FILE, weights_dir),
        stage1=stage1_path,
    )


def check_paths(paths: WeightPaths) -> None:
    """Raise one :class:`~diffbir.weights.MissingWeightsError` listing every missing file."""
    roles = {"Stable Diffusion 2.1 (--sd-weights)": paths.sd}
    roles["IRControlNet (--controlnet-weights)"] = paths.controlnet
    if paths.stage1 is not None:
        roles["stage-1 model (--stage1-weights)"] = paths.stage1
    check_weights(roles)


def build_restorer(
    task: str,
    paths: WeightPaths | None = None,
    *,
    weights_dir: str | os.PathLike | None = None,
    cldm_config: str = "control_ldm",
    stage1_config: str | None = None,
    device: torch.device | str = "auto",
    precision: str | torch.dtype = "fp32",
) -> Restorer:
    """Build the models from configs, load the weight files and wrap them in a Restorer.

    ``paths`` default to the official files in ``weights_dir`` (see :mod:`diffbir.weights`).
    ``stage1_config`` overrides the task's stage-1 config (required for ``custom`` when a stage-1
    weight file is given; with ``custom`` and no weights there is no stage-1 model).
    ``device``: ``auto``, ``cpu``, ``cuda``, ...; ``precision``: fp32, fp16, bf16 or a dtype.
    """
    if task not in TASKS:
        raise ValueError(f"--task: expected one of {sorted(TASKS)}, got {task!r}")
    spec = TASKS[task]
    if paths is None:
        paths = resolve_weight_paths(task, weights_dir)
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
        precision = PRECISIONS[precision]
    device = resolve_device(device) if isinstance(device, str) else device
    warn_if_slow_precision(device, precision)
    stage1_config = stage1_config or spec.stage1_config
    if task == "custom" and paths.stage1 is not None and stage1_config is None:
        raise ValueError("--task custom with --stage1-weights needs --stage1-config")
    if stage1_config is not None and paths.stage1 is None:
        raise ValueError(f"stage-1 config {stage1_config!r} given without --stage1-weights")
    check_paths(paths)

    cldm = build_model(load_config(cldm_config))
    cldm.load_sd_weights(read_state_dict(paths.sd), str(paths.sd))
    cldm.load_controlnet_weights(read_state_dict(paths.controlnet), str(paths.controlnet))

    stage1 = Stage1(model=None)
    if paths.stage1 is not None:
        cfg = load_config(stage1_config)
        model = build_model(cfg)
        load_weights(model, read_state_dict(paths.stage1), str(paths.stage1))
        name = OmegaConf.select(cfg, "name")
        stage1 = Stage1(
            model=model,
            resize_first=spec.resize_first,
            pad_multiple=64 if name == "swinir" else 1,
        )
    return Restorer(cldm, stage1, device=device, dtype=precision)
