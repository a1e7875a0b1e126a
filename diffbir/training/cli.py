"""Command-line training of the restoration module (``diffbir-train-rm``) and of the generation
module (``diffbir-train-gm``).

    diffbir-train-gm --config configs/train/gm.yaml trainer.devices=8 data.train.batch_size=32
    diffbir-train-gm --config gm --resume last

Every setting lives in the YAML (``configs/train/``); ``key=value`` arguments override it and
an unknown key is an error. Missing files and empty datasets are reported before training.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from diffbir.checkpoint import CheckpointError, WeightsNotFoundError, read_state_dict
from diffbir.config import load_config, resolve_config_path
from diffbir.pipeline.device import PRECISIONS, cpu_has_fast_half
from diffbir.schema import SettingError, check_mapping
from diffbir.training.common import TrainingTask
from diffbir.training.config import SCHEMAS
from diffbir.training.data import TrainingSetupError, build_paired_dataset, check_source
from diffbir.versions import schedule_conflict

EXPORT_NAMES = {"rm": "swinir", "gm": "controlnet"}


def check_keys(cfg: Mapping[str, Any], kind: str, source: str = "config") -> None:
    """Raise :class:`TrainingSetupError` ``<source>: <key>: ...`` for the first unknown or
    missing key, wrong type or value out of range (:mod:`diffbir.training.config`)."""
    try:
        check_mapping(cfg, SCHEMAS[kind])
    except SettingError as err:
        raise TrainingSetupError(f"{source}: {err}") from err


def _require_file(path: Any, key: str) -> None:
    if not path:
        raise TrainingSetupError(f"config key {key!r} must name a weight file")
    if not Path(path).is_file():
        raise WeightsNotFoundError(f"{key}: weight file not found: {Path(path).resolve()}")


def check_setup(cfg: Mapping[str, Any], kind: str, source: str = "config") -> None:
    """Every check that can fail before training starts: keys, values, lists, files, datasets.

    ``source`` (the config file) starts the messages about keys and values."""
    check_keys(cfg, kind, source)
    model = cfg["model"]
    if kind == "gm" and model.get("sd_weights"):  # an official SD file of another schedule
        conflict = schedule_conflict(
            Path(model["sd_weights"]).name,
            model.get("parameterization") or "eps",
            bool(model.get("zero_terminal_snr")),
        )
        if conflict:
            raise TrainingSetupError(f"model.sd_weights: {conflict}")
    splits = ["train"] + (["val"] if cfg["data"].get("val") else [])
    for split in splits:
        key = f"data.{split}.dataset.source"
        check_source(cfg["data"][split]["dataset"].get("source"), key)
    load_config(model["config"])  # the model config must exist
    if kind == "gm":
        _require_file(model["sd_weights"], "model.sd_weights")
        if model.get("controlnet_init"):
            _require_file(model["controlnet_init"], "model.controlnet_init")
        if model.get("stage1"):
            load_config(model["stage1"]["config"])
            _require_file(model["stage1"]["weights"], "model.stage1.weights")
    for split in splits:
        build_paired_dataset(
            cfg["data"][split]["dataset"], f"data.{split}.dataset", int(cfg["seed"])
        )


def build_task(cfg: Mapping[str, Any], kind: str) -> TrainingTask:
    """The LightningModule for ``kind`` ("rm" or "gm")."""
    if kind == "rm":
        from diffbir.training.rm import RestorationModuleTask

        return RestorationModuleTask(cfg)
    from diffbir.training.gm import GenerationModuleTask

    return GenerationModuleTask(cfg)


def note_slow_precision(accelerator: str, precision: Any) -> None:
    """Say (rank 0) when a half-precision setting runs on a CPU without native support for it:
    it trains correctly, only far slower than 32-bit (Lightning itself turns 16-mixed into
    bf16-mixed on CPU and says so)."""
    name = str(precision)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu or "16" not in name:
        return
    half = "fp16" if name in ("16-true", "16") else "bf16"
    if not cpu_has_fast_half(PRECISIONS[half]):
        rank_zero_warn(
            f"trainer.precision={name}: this CPU has no native {half} support (AVX512-BF16, "
            "AVX512-FP16 or AMX); training runs, but far slower than with trainer.precision=32"
        )


def build_trainer(cfg: Mapping[str, Any]) -> pl.Trainer:
    """A Trainer from ``cfg["trainer"]``: checkpoints every n steps (+ last), TensorBoard logs."""
    t = cfg["trainer"]
    note_slow_precision(t["accelerator"], t["precision"])
    output_dir = Path(cfg["output_dir"])
    accumulate = int(t["accumulate_grad_batches"])
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=int(t["checkpoint_every_n_steps"]),
        save_last=True,
        save_top_k=int(t["keep_checkpoints"]),
        monitor="step",
        mode="max",
        enable_version_counter=False,  # a resumed run overwrites last.ckpt, never last-v1.ckpt
    )
    has_val = bool(cfg["data"].get("val"))
    return pl.Trainer(
        accelerator=t["accelerator"],
        devices=t["devices"],
        num_nodes=int(t["num_nodes"]),
        strategy=t["strategy"],
        precision=t["precision"],
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t["gradient_clip_val"],
        max_steps=int(t["max_steps"]),
        log_every_n_steps=int(t["log_every_n_steps"]),
        # the train loader is endless: validation is scheduled in batches, not epochs
        val_check_interval=int(t["val_every_n_steps"]) * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=None if has_val else 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the seeded sampler shards by rank itself
        deterministic=bool(t["deterministic"]),
        enable_progress_bar=bool(t["progress_bar"]),
        default_root_dir=output_dir,
        logger=TensorBoardLogger(save_dir=output_dir, name="logs", version=""),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step")],
    )


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """``last`` -> ``<output_dir>/checkpoints/last.ckpt``; a path must exist."""
    if resume is None:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise TrainingSetupError(f"--resume {resume}: checkpoint not found: {path.resolve()}")
    try:  # the checks of the real load, made now: a truncated or unsafe file fails at setup
        try:  # mmap: nothing is read but what is looked at
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # only the legacy (pre-zip) format cannot be mapped
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainingSetupError(
            f"--resume {resume}: {path} is not a loadable training checkpoint (truncated, not a "
            f"torch file, or needs unsafe unpickling: weights_only=True refused it): {reason}"
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise TrainingSetupError(
            f"--resume {resume}: {path} is not a Lightning training checkpoint (expected the "
            "keys state_dict and global_step; a weight file only starts a new run)"
        )
    return str(path)


def load_training_config(config: str | Path | DictConfig, overrides: Sequence[str] = ()) -> dict:
    """The training config (a YAML path or a name in ``configs/train/``) with overrides."""
    cfg = load_config(config, overrides, group="train")
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def export(task: TrainingTask, kind: str, output_dir: str | Path) -> list[Path]:
    """Write the trained weights as ``<output_dir>/export/<name>.pth`` and ``.safetensors``."""
    name = EXPORT_NAMES[kind]
    return [task.export_weights(Path(output_dir) / "export" / f"{name}{ext}")
            for ext in (".pth", ".safetensors")]  # fmt: skip


def export_checkpoint(kind: str, cfg: Mapping[str, Any], ckpt_path: str | Path) -> list[Path]:
    """Export the weights of a training checkpoint (e.g. an intermediate one) without training."""
    task = build_task(cfg, kind)
    task.load_trained_weights(read_state_dict(ckpt_path), str(ckpt_path))
    return export(task, kind, cfg["output_dir"])


def prepare(
    kind: str,
    config: str | Path | DictConfig,
    overrides: Sequence[str] = (),
    resume: str | None = None,
) -> tuple[dict, str | None]:
    """Load the config and run every check; returns it and the checkpoint to resume from."""
    cfg = load_training_config(config, overrides)
    check_setup(cfg, kind, _config_source(config))
    return cfg, resolve_resume(resume, cfg["output_dir"])


def _config_source(config: str | Path | DictConfig) -> str:
    if isinstance(config, DictConfig):
        return "config"
    return str(resolve_config_path(config, "train"))


def seeded_task(kind: str, cfg: Mapping[str, Any]) -> TrainingTask:
    """Seed every RNG from ``cfg["seed"]``, then build the task (so its initialisation repeats)."""
    pl.seed_everything(int(cfg["seed"]), workers=True)
    return build_task(cfg, kind)


def fit(
    kind: str,
    cfg: Mapping[str, Any],
    ckpt_path: str | None = None,
    task: TrainingTask | None = None,
) -> TrainingTask:
    """Train ``kind`` ("rm"/"gm") as configured and export its weights; returns the task.

    ``task``: one made by :func:`seeded_task` (built here when not given).
    """
    task = seeded_task(kind, cfg) if task is None else task
    trainer = build_trainer(cfg)
    trainer.fit(task, ckpt_path=ckpt_path, weights_only=True)
    # the final state is always resumable, even off the checkpoint interval (all ranks call this)
    last = Path(cfg["output_dir"]) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last, weights_only=False)  # full state; saying so keeps logs quiet
    if trainer.is_global_zero:
        export(task, kind, cfg["output_dir"])
    return task


def train(
    kind: str,
    config: str | Path | DictConfig,
    overrides: Sequence[str] = (),
    resume: str | None = None,
) -> TrainingTask:
    """:func:`prepare` then :func:`fit` (the programmatic form of the console scripts)."""
    return fit(kind, *prepare(kind, config, overrides, resume))


def _parser(kind: str) -> argparse.ArgumentParser:
    title = {"rm": "restoration module (SwinIR, stage 1)", "gm": "generation module (IRControlNet)"}
    parser = argparse.ArgumentParser(
        prog=f"diffbir-train-{kind}", description=f"Train the DiffBIR {title[kind]}."
    )
    parser.add_argument(
        "--config", required=True, help="training YAML, or a name in configs/train/ (e.g. gm)"
    )
    parser.add_argument(
        "--resume", default=None, metavar="last|PATH",
        help="continue from <output_dir>/checkpoints/last.ckpt or from a checkpoint file",
    )  # fmt: skip
    parser.add_argument(
        "--export-from", default=None, metavar="CKPT",
        help="only write <output_dir>/export/ weights from this training checkpoint",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _main(kind: str, argv: Sequence[str] | None) -> None:
    parser = _parser(kind)
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key=value, got {bad}")
    try:
        if args.export_from:
            cfg = load_training_config(args.config, args.overrides)
            check_keys(cfg, kind)
            for path in export_checkpoint(kind, cfg, args.export_from):
                print(f"wrote {path}")
            return
        cfg, ckpt_path = prepare(kind, args.config, args.overrides, args.resume)
        # building the task loads the weight files: their errors are setup errors too
        task = seeded_task(kind, cfg)
    except (TrainingSetupError, CheckpointError, FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    fit(kind, cfg, ckpt_path, task)


def main_rm(argv: Sequence[str] | None = None) -> None:
    """``diffbir-train-rm``: train the restoration module."""
    _main("rm", sys.argv[1:] if argv is None else argv)


def main_gm(argv: Sequence[str] | None = None) -> None:
    """``diffbir-train-gm``: train the generation module."""
    _main("gm", sys.argv[1:] if argv is None else argv)
