"""The keys of the training configs (``configs/train/*.yaml``), their types and ranges.

The YAML is read as it is (the tasks get a plain dict); these dataclasses are its schema,
checked by :func:`~diffbir.schema.check_mapping` before anything is built: an unknown or
missing key, a wrong type or a value out of range names the dotted key. Fields without a
default are required.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffbir.diffusion.schedule import PARAMETERIZATIONS
from diffbir.schema import setting

POSITIVE = {"low": 0, "low_open": True}


@dataclass
class DataSplit:
    """``data.train``: the dataset (checked when it is built) and its loader."""

    dataset: dict[str, Any]
    batch_size: int = setting(**POSITIVE)
    num_workers: int = setting(0, low=0)


@dataclass
class ValSplit(DataSplit):
    """``data.val``; ``max_images``: validate on the first N images only."""

    max_images: int | None = setting(None, **POSITIVE)


@dataclass
class GMValSplit(ValSplit):
    """``data.val`` of the GM: also restore ``sample_batches`` batches with ``sample_steps``."""

    sample_batches: int = setting(0, low=0)
    sample_steps: int = setting(50, **POSITIVE)


@dataclass
class Data:
    train: DataSplit
    val: ValSplit | None = None


@dataclass
class GMData:
    train: DataSplit
    val: GMValSplit | None = None


@dataclass
class Optim:
    """AdamW with a step learning-rate schedule."""

    lr: float = setting(**POSITIVE)
    betas: list[float] = setting(low=0.0, high=1.0, high_open=True)
    weight_decay: float = setting(low=0.0)
    lr_milestones: list[int] = setting()
    lr_gamma: float = setting(**POSITIVE)


@dataclass
class TrainerSettings:
    """The Lightning Trainer (``devices``: a count, ``auto`` or a list of indices)."""

    accelerator: str
    devices: Any
    num_nodes: int = setting(**POSITIVE)
    strategy: str = setting()
    precision: int | str = setting()
    accumulate_grad_batches: int = setting(**POSITIVE)
    gradient_clip_val: float | None = setting(low=0.0)
    max_steps: int = setting(**POSITIVE)
    log_every_n_steps: int = setting(**POSITIVE)
    val_every_n_steps: int = setting(**POSITIVE)
    checkpoint_every_n_steps: int = setting(**POSITIVE)
    keep_checkpoints: int = setting()
    deterministic: bool = setting()
    progress_bar: bool = setting()


@dataclass
class RMModel:
    """The restoration module: its model config (``configs/model``)."""

    config: str
    gradient_checkpointing: bool = False


@dataclass
class FrozenStage1:
    """The frozen stage 1 whose output conditions the GM."""

    config: str
    weights: str | None = None


@dataclass
class GMModel:
    """The generation module: ControlLDM config, base SD file, initialisation, stage 1 and the
    schedule it is trained on."""

    config: str
    sd_weights: str | None = None
    controlnet_init: str | None = None
    stage1: FrozenStage1 | None = None
    noise_aug_timestep: int = setting(0, low=0, high=999)
    parameterization: str = setting("eps", choices=PARAMETERIZATIONS)
    zero_terminal_snr: bool = False
    gradient_checkpointing: bool = False


@dataclass
class RMConfig:
    """A ``diffbir-train-rm`` config."""

    seed: int
    output_dir: str
    model: RMModel
    data: Data
    optim: Optim
    trainer: TrainerSettings


@dataclass
class GMConfig:
    """A ``diffbir-train-gm`` config."""

    seed: int
    output_dir: str
    model: GMModel
    data: GMData
    optim: Optim
    trainer: TrainerSettings


SCHEMAS = {"rm": RMConfig, "gm": GMConfig}
