"""Stage 1: the cleaner that turns a low-quality image into the condition image of stage 2.

The sizes, resizes and padding are the official ones (SPEC "Image sizes", :mod:`.resize`): the
output is ``int(upscale * size)``; a condition whose short side is below ``min_side`` (512) is
enlarged; nothing is clamped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffbir.pipeline.options import RestoreOptions
from diffbir.pipeline.resize import (
    enlarge_short_side,
    pad_to_multiple,
    resize_bicubic,
    resize_pil_bicubic,
    scaled_size,
    short_side_size,
)
from diffbir.pipeline.tiling import TILE_WEIGHTS, run_tiled


def target_size(height: int, width: int, upscale: float) -> tuple[int, int]:
    """The output size for an input of ``height`` x ``width`` (official: truncated)."""
    return scaled_size(height, width, upscale)


@dataclass
class Cleaner:
    """A stage-1 cleaner (``model`` ``None``: the input is only resized), run as the official
    code runs it.

    ``resize_first``: a same-size cleaner (SwinIR, SCUNet): the input is first resized to the
    output size (PIL bicubic on the 8-bit image); otherwise (BSRNet x4) the model's output is
    resized, once, to the stage-2 size. ``enlarge_first``: a condition whose short side is below
    ``min_side`` is enlarged before the model (SwinIR, when not tiled) instead of after it.
    The model's ``size_multiple`` attribute (default 1; SwinIR: 64) is the multiple its input
    is zero-padded to; the output is cropped back.
    """

    model: nn.Module | None
    resize_first: bool = False
    enlarge_first: bool = False

    def _run(self, x: Tensor) -> Tensor:
        model = self.model
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, getattr(model, "size_multiple", 1))
        y = model(padded.to(next(model.parameters()).dtype)).float()
        out_h = round(height * y.shape[-2] / padded.shape[-2])
        out_w = round(width * y.shape[-1] / padded.shape[-1])
        return y[..., :out_h, :out_w]

    @torch.no_grad()
    def condition(self, lq: Tensor, options: RestoreOptions) -> Tensor:
        """The condition of stage 2 (B, 3, h, w), float32, not clamped: the cleaned image at
        the output size, its short side enlarged to ``options.min_side`` if shorter. ``lq``
        (B, 3, H, W) in [0, 1] is on the device to work on."""
        lq = lq.float()
        size = target_size(*lq.shape[-2:], options.upscale)
        min_side = options.min_side
        if self.model is None or self.resize_first:
            lq = resize_pil_bicubic(lq, size)
        if self.model is None:
            return enlarge_short_side(lq, min_side)
        tile = options.tiles.stage1
        if tile is not None and min(lq.shape[-2:]) < tile:
            tile = None  # as the official: an input smaller than a tile is not tiled
        if self.enlarge_first and tile is None:
            lq = enlarge_short_side(lq, min_side)
        weight = TILE_WEIGHTS[options.tiles.weights]
        out = run_tiled(self._run, lq, tile, options.tiles.stage1_stride, weight=weight)
        if self.resize_first:
            return enlarge_short_side(out, min_side)
        if min(size) < min_side:
            return resize_bicubic(out, short_side_size(*out.shape[-2:], min_side))
        return resize_bicubic(out, size)
