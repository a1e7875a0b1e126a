"""Parts shared by the two training tasks: resumable data position, seeding, metrics, logging."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.utils import make_grid

from diffbir.training.data import (
    SKIPPED_KEY,
    build_paired_dataset,
    derive_seed,
    train_loader,
    val_loader,
)

DATA_POSITION_KEY = "diffbir_batches_seen"
STREAM_POSITION_KEY = "diffbir_stream_position"
WORLD_SIZE_KEY = "diffbir_world_size"
SKIPPED_FILES_KEY = "diffbir_skipped_files"
logger = logging.getLogger(__name__)


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1], shape (B,)."""
    mse = (output.float().clamp(0, 1) - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(output: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of RGB images in [0, 1], shape (B,)."""
    return structural_similarity_index_measure(
        output.float().clamp(0, 1), target.float(), data_range=1.0, reduction="none"
    )


def pad_to_multiple(img: Tensor, multiple: int) -> Tensor:
    """Reflect-pad the bottom/right of (B,C,H,W) ``img`` to a multiple of ``multiple``."""
    h, w = img.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h == 0 and pad_w == 0:
        return img
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(img, (0, pad_w, 0, pad_h), mode=mode)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode."""
    module.eval()
    module.requires_grad_(False)
    return module


class TrainingTask(pl.LightningModule):
    """A LightningModule with a resumable data stream, per-batch seeding and AdamW + step LR.

    ``cfg`` is the whole training config as a plain dict (keys ``seed``, ``data``, ``optim``).
    Every checkpoint stores the number of training batches each rank has consumed and the
    position in the shared sample stream (samples consumed by all ranks); the train loader of
    a resumed run starts right after them, and the global RNGs are re-seeded from
    ``(seed, batch number, rank)`` before every training batch, so resuming with the same number
    of processes reproduces an uninterrupted run. Resuming with another number of processes
    continues the stream where it stopped and says what changes (see :meth:`resume_note`).
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"cfg": dict(cfg)})
        self.cfg = cfg
        self.seed = int(cfg["seed"])
        self.batch_size = int(cfg["data"]["train"]["batch_size"])  # per process
        self.batches_seen = 0
        self.stream_position = 0  # samples of the shared stream consumed by all ranks together
        self.skipped_files = 0  # unreadable training images replaced by others (this rank)

    # ----- parameters and optimisation -----
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The parameters the optimizer updates."""
        raise NotImplementedError

    def load_trained_weights(self, sd: Mapping[str, Tensor], source: str) -> None:
        """Load the trained weights from a Lightning checkpoint's ``state_dict``."""
        raise NotImplementedError

    def export_weights(self, path: str | os.PathLike) -> Path:
        """Write the trained network as a flat state dict usable by inference."""
        raise NotImplementedError

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg["optim"]
        params = [p for p in self.trainable_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=float(optim["lr"]),
            betas=tuple(optim["betas"]),
            weight_decay=float(optim["weight_decay"]),
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(optim["lr_milestones"]), gamma=float(optim["lr_gamma"])
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ----- data -----
    def train_dataloader(self) -> DataLoader:
        data = self.cfg["data"]
        dataset = build_paired_dataset(data["train"]["dataset"], "data.train.dataset", self.seed)
        world_size = self.trainer.world_size
        return train_loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=int(data["train"]["num_workers"]),
            seed=self.seed,
            rank=self.global_rank,
            world_size=world_size,
            start=self.stream_position // world_size,  # this rank's first unseen sample
        )

    def val_dataloader(self) -> DataLoader | list:
        val = self.cfg["data"].get("val")
        if not val:
            return []
        dataset = build_paired_dataset(val["dataset"], "data.val.dataset", self.seed)
        if val.get("max_images"):
            dataset = Subset(dataset, range(min(int(val["max_images"]), len(dataset))))
        return val_loader(
            dataset,
            batch_size=int(val["batch_size"]),
            num_workers=int(val["num_workers"]),
            seed=derive_seed(self.seed, 1),
        )

    # ----- resumability -----
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(derive_seed(self.seed, self.batches_seen, self.global_rank))
        self.batches_seen += 1
        self.stream_position += self.batch_size * self.trainer.world_size
        skipped = batch.pop(SKIPPED_KEY, None) if isinstance(batch, dict) else None
        if skipped is not None:
            self.skipped_files += int(torch.as_tensor(skipped).sum())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("data/skipped_files", float(self.skipped_files), reduce_fx="sum", sync_dist=True)

    def on_train_end(self) -> None:
        if self.skipped_files:
            logger.warning(
                "rank %d: %d unreadable training image(s) were replaced by other samples",
                self.global_rank,
                self.skipped_files,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[DATA_POSITION_KEY] = self.batches_seen
        checkpoint[STREAM_POSITION_KEY] = self.stream_position
        checkpoint[WORLD_SIZE_KEY] = self.trainer.world_size
        checkpoint[SKIPPED_FILES_KEY] = self.skipped_files

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        world_size, batch_size = self.trainer.world_size, self.batch_size
        self.batches_seen = int(checkpoint.get(DATA_POSITION_KEY, 0))
        self.skipped_files = int(checkpoint.get(SKIPPED_FILES_KEY, 0))
        saved_world = int(checkpoint.get(WORLD_SIZE_KEY, world_size))
        self.stream_position = int(
            checkpoint.get(STREAM_POSITION_KEY, self.batches_seen * batch_size * world_size)
        )
        if saved_world != world_size:
            rank_zero_warn(self.resume_note(saved_world, world_size, batch_size))
            self.stream_position = -(-self.stream_position // world_size) * world_size

    def resume_note(self, saved_world: int, world_size: int, batch_size: int) -> str:
        """What resuming a run of ``saved_world`` processes with ``world_size`` does."""
        skipped = -self.stream_position % world_size
        skip = f", after skipping {skipped} so that the ranks share it evenly" if skipped else ""
        return (
            f"resuming a {saved_world}-process run with {world_size} process(es): the data "
            f"continue at sample {self.stream_position} of the shared stream{skip} (no sample "
            f"twice in a pass); a step now takes {batch_size * world_size} samples "
            f"(data.train.batch_size {batch_size} x {world_size}; set "
            "trainer.accumulate_grad_batches to keep the old total); the global step, optimizer "
            "and learning-rate schedule continue, but per-batch random draws come from other "
            "per-rank streams, so the result differs from an uninterrupted run"
        )

    # ----- logging -----
    def log_image_grid(self, tag: str, rows: list[Tensor], max_images: int = 4) -> None:
        """Log one grid, one row per tensor of (B,3,H,W) images in [0, 1], to TensorBoard."""
        if not isinstance(self.logger, TensorBoardLogger) or self.global_rank != 0:
            return
        h = min(r.shape[-2] for r in rows)
        w = min(r.shape[-1] for r in rows)
        count = min(max_images, rows[0].shape[0])
        images = [r[:count, :, :h, :w].detach().float().clamp(0, 1).cpu() for r in rows]
        grid = make_grid(torch.cat(images), nrow=count, padding=2)
        self.logger.experiment.add_image(tag, grid, self.global_step)
