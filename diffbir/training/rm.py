"""Training of the restoration module (RM, stage 1): SwinIR with the MSE loss of paper Eq. 1."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from diffbir.checkpoint import load_weights, save_state_dict, sub_state_dict
from diffbir.config import build_model, load_config
from diffbir.training.common import TrainingTask, pad_to_multiple, psnr, ssim
from diffbir.training.data import TrainingSetupError


class RestorationModuleTask(TrainingTask):
    """RM training: ``I_RM = RM(I_lq)``, loss ``||I_RM - I_hq||^2`` (mean squared error).

    ``cfg["model"]["config"]`` names the stage-1 model config (e.g. ``swinir``); validation
    reports PSNR/SSIM of the output and of the LQ input against HQ and logs LQ/output/HQ grids.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        self.model = build_model(load_config(cfg["model"]["config"]))
        if cfg["model"].get("gradient_checkpointing"):
            if not hasattr(self.model, "set_gradient_checkpointing"):
                raise TrainingSetupError(
                    f"model.gradient_checkpointing: {type(self.model).__name__} does not support "
                    "gradient checkpointing; set it to false"
                )
            self.model.set_gradient_checkpointing(True)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()

    def forward(self, lq: Tensor) -> Tensor:
        """The restored image for ``lq`` in [0, 1] of any size (padded and cropped back)."""
        h, w = lq.shape[-2:]
        multiple = getattr(self.model, "size_multiple", 1)  # SwinIR: 64
        return self.model(pad_to_multiple(lq, multiple))[..., :h, :w]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        output = self(batch["lq"])
        loss = F.mse_loss(output.float(), batch["hq"].float())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["hq"].shape[0])
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        lq, hq = batch["lq"], batch["hq"]
        output = self(lq).clamp(0, 1)
        size = hq.shape[0]
        self.log("val/loss", F.mse_loss(output.float(), hq.float()), batch_size=size)
        self.log("val/psnr", psnr(output, hq).mean(), batch_size=size, prog_bar=True)
        self.log("val/ssim", ssim(output, hq).mean(), batch_size=size)
        self.log("val/psnr_lq", psnr(lq, hq).mean(), batch_size=size)
        self.log("val/ssim_lq", ssim(lq, hq).mean(), batch_size=size)
        if batch_idx == 0:
            self.log_image_grid("val/lq_output_hq", [lq, output, hq])

    def load_trained_weights(self, sd: Mapping[str, Tensor], source: str) -> None:
        """Load the SwinIR weights of a training checkpoint's state dict (keys ``model.*``)."""
        load_weights(self.model, sub_state_dict(sd, "model."), source)

    def export_weights(self, path: str | os.PathLike) -> Path:
        """Write the SwinIR weights as a flat state dict (``.pth`` or ``.safetensors``)."""
        path = Path(path)
        save_state_dict(self.model.state_dict(), path)
        return path
