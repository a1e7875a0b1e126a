"""Sizes, resizes and padding of the pipeline, as the official code does them (SPEC "Image sizes").

- Sizes are truncated with ``int()`` (a 36x52 input at x4 enlarged to a 512 short side is
  512x739, not 740).
- Float images are resized with PyTorch's bicubic filter with ``antialias=True`` (which also
  changes the kernel when enlarging: PIL's a = -0.5 instead of -0.75), never clamped.
- The enlargement by the upscale factor before a same-size cleaner (SwinIR, SCUNet) is PIL's
  bicubic on the 8-bit image.
- Padding is with zeros, at the bottom and right.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(int(height * scale), int(width * scale))``, at least 1 (the official output size)."""
    return max(1, int(height * scale)), max(1, int(width * scale))


def short_side_size(height: int, width: int, side: int) -> tuple[int, int]:
    """The size with the short side ``side`` and the long side scaled and truncated."""
    if height == width:
        return side, side
    if height < width:
        return side, int(width * (side / height))
    return int(height * (side / width)), side


def resize_bicubic(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize with antialiasing (B, C, H, W) -> (B, C, *size); unchanged if same size."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img, size=size, mode="bicubic", antialias=True)


def enlarge_short_side(img: Tensor, side: int) -> Tensor:
    """``img`` resized so that its short side is ``side`` if it is shorter, else unchanged."""
    height, width = img.shape[-2:]
    if min(height, width) >= side:
        return img
    return resize_bicubic(img, short_side_size(height, width, side))


def _is_8bit(img: Tensor) -> bool:
    scaled = img * 255
    in_range = img.min() >= 0 and img.max() <= 1
    return bool(in_range and ((scaled - scaled.round()).abs() < 1e-3).all())


def resize_pil_bicubic(img: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL's bicubic resize of images in [0, 1] (B, 3, H, W) to ``size`` (H, W).

    Images that are exactly 8-bit (values k/255, as read from 8-bit files) are resized as 8-bit
    images, exactly as the official code does; others (16-bit files) channel by channel in
    PIL's float mode, with the same filter and no quantisation.
    """
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    height, width = size
    out = []
    for item in img.detach().float().cpu():
        if _is_8bit(item):
            arr = (item * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            resized = Image.fromarray(arr).resize((width, height), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1) / 255.0)
        else:
            channels = [
                np.asarray(Image.fromarray(c.numpy()).resize((width, height), Image.BICUBIC))
                for c in item
            ]
            out.append(torch.from_numpy(np.stack(channels)))
    return torch.stack(out).to(device=img.device, dtype=torch.float32)


def pad_to_multiple(img: Tensor, multiple: int) -> Tensor:
    """Zero-pad the bottom/right of ``img`` (..., H, W) to multiples of ``multiple``."""
    height, width = img.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not (pad_h or pad_w):
        return img
    return F.pad(img, (0, pad_w, 0, pad_h))
