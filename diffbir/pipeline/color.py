"""Colour correction of the restored image towards the stage-1 image (off by default)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ColorFix = Literal["none", "wavelet", "adain"]
COLOR_FIXES: tuple[str, ...] = ("none", "wavelet", "adain")
WAVELET_LEVELS = 5
_EPS = 1e-5


def adain(content: Tensor, style: Tensor) -> Tensor:
    """Per-image, per-channel mean and std of ``content`` replaced by those of ``style``."""
    c_mean, c_std = content.mean(dim=(2, 3), keepdim=True), content.std(dim=(2, 3), keepdim=True)
    s_mean, s_std = style.mean(dim=(2, 3), keepdim=True), style.std(dim=(2, 3), keepdim=True)
    return (content - c_mean) / (c_std + _EPS) * s_std + s_mean


def _blur(x: Tensor, dilation: int) -> Tensor:
    """3x3 binomial blur with holes ("a trous"), replicate-padded."""
    k1 = x.new_tensor([0.25, 0.5, 0.25])
    kernel = torch.outer(k1, k1).expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, dilation=dilation, groups=x.shape[1])


def _split(x: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """``(high, low)`` frequencies of ``x``: an a-trous wavelet decomposition with ``levels``."""
    high = torch.zeros_like(x)
    low = x
    for level in range(levels):
        blurred = _blur(low, 2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(content: Tensor, style: Tensor) -> Tensor:
    """High frequencies of ``content`` with the low frequencies (colours) of ``style``."""
    high, _ = _split(content)
    _, low = _split(style)
    return high + low


def color_fix(image: Tensor, reference: Tensor, method: str) -> Tensor:
    """Correct the colours of ``image`` (B, 3, H, W) towards ``reference`` (same size)."""
    if method == "none":
        return image
    if image.shape != reference.shape:
        raise ValueError(
            f"color fix: image {tuple(image.shape)} != reference {tuple(reference.shape)}"
        )
    if method == "wavelet":
        return wavelet(image, reference)
    if method == "adain":
        return adain(image, reference)
    raise ValueError(f"color fix: expected one of {COLOR_FIXES}, got {method!r}")
