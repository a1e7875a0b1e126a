"""Which part of the pipeline runs in which dtype (the precision policy).

With ``--precision fp16`` or ``bf16``, UNet and IRControlNet (the sampling steps: nearly all the
time of an image), the VAE and the stage-1 model run in that precision; their normalisation
layers accumulate their statistics in float32 (PyTorch's kernels do this for half inputs), as
the official code's float32 norms do, without casting every activation. The text encoder stays
in float32: it runs once per batch, on two 77-token prompts. The README's "Precision" section
gives the measurements behind this.
"""

from __future__ import annotations

import torch
from torch import nn

# Parts of a ControlLDM that keep float32 whatever the precision.
FLOAT32_PARTS = ("text_encoder",)


def part_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the policy gives ControlLDM part ``name`` under precision ``dtype``."""
    return torch.float32 if name in FLOAT32_PARTS else dtype


def place_models(
    cldm: nn.Module,
    stage1: nn.Module | None,
    device: torch.device | None,
    dtype: torch.dtype,
) -> None:
    """Move ``cldm`` (a ControlLDM) and ``stage1`` to ``device`` (``None``: where they are) in
    the policy's dtypes. On models built on ``meta`` this costs nothing: done before loading,
    the weights are converted as they are read, without a float32 copy first."""
    for name, part in cldm.named_children():
        part.to(device=device, dtype=part_dtype(name, dtype))
    if stage1 is not None:
        place_stage1(stage1, device, dtype)


def place_stage1(stage1: nn.Module, device: torch.device | None, dtype: torch.dtype) -> None:
    """Move a stage-1 model to ``device`` (``None``: where it is) in ``dtype``, for inference."""
    stage1.eval().requires_grad_(False).to(device=device, dtype=dtype)
