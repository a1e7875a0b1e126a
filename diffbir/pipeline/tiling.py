"""Overlapping tiles blended with Gaussian weights, so that memory is bounded by the tile.

Used for stage 1 (image tiles), the VAE encoder/decoder (image/latent tiles) and the latent
diffusion model (latent tiles, blended at every step). When one tile covers the whole input the
function is called once on the whole input, so tiled and untiled results agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from diffbir.diffusion.denoiser import ConditionalModel
from diffbir.diffusion.guidance import Guidance
from diffbir.models.norm import SharedGroupNormStats

# Standard deviation of the blending weight, as a fraction of the tile side: ours ("wide") and
# the official one (variance 0.01 of the side squared).
SIGMA_FRACTION = 0.25
OFFICIAL_SIGMA_FRACTION = 0.1

Box = tuple[int, int, int, int]  # y0, y1, x0, x1


def tile_starts(size: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, size)`` with step ``stride``.

    The last tile ends at ``size``. Starts are multiples of ``align`` when ``size``, ``tile``
    and ``stride`` are.
    """
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got {tile} and {stride}")
    if stride > tile:
        raise ValueError(f"tile stride {stride} is larger than the tile size {tile}: gaps")
    if size <= tile:
        return [0]
    count = math.ceil((size - tile) / stride) + 1
    starts = sorted({min(k * stride, size - tile) for k in range(count)})
    if align > 1 and any(s % align for s in starts):
        raise ValueError(f"tile offsets {starts} are not multiples of {align}")
    return starts


def tile_boxes(height: int, width: int, tile: int, stride: int, align: int = 1) -> list[Box]:
    """Boxes ``(y0, y1, x0, x1)`` of the tiles covering a ``height`` x ``width`` grid."""
    return [
        (y, min(y + tile, height), x, min(x + tile, width))
        for y in tile_starts(height, tile, stride, align)
        for x in tile_starts(width, tile, stride, align)
    ]


def default_stride(tile: int, align: int = 1) -> int:
    """Half the tile, rounded down to a multiple of ``align``."""
    return max(align, tile // 2 // align * align)


def _owned(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """Split ``[0, size)`` among overlapping tiles at the middle of each overlap."""
    ends = [min(s + tile, size) for s in starts]
    cuts = [0, *((ends[i - 1] + starts[i]) / 2 for i in range(1, len(starts))), size]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def gaussian_weight(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """(height, width) separable Gaussian blending weight, peak 1 at the centre, > 0 everywhere."""

    def axis(n: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (pos / (SIGMA_FRACTION * n)) ** 2)

    return torch.outer(axis(height), axis(width)).to(device=device, dtype=dtype)


def official_gaussian_weight(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """The official blending weight: sigma 0.1 of the side, the normal density's scale, rows
    centred at ``height / 2`` and columns at ``(width - 1) / 2`` (as the official code does)."""

    def axis(n: int, centre: float) -> Tensor:
        sigma = OFFICIAL_SIGMA_FRACTION * n
        pos = torch.arange(n, dtype=torch.float64) - centre
        return torch.exp(-0.5 * (pos / sigma) ** 2) / (
            math.sqrt(2 * math.pi) * OFFICIAL_SIGMA_FRACTION
        )

    return torch.outer(axis(height, height / 2), axis(width, (width - 1) / 2)).to(
        device=device, dtype=dtype
    )


WeightFn = Callable[..., Tensor]
# Blending weights by name (TileOptions.weights, --tile-weights).
TILE_WEIGHTS: dict[str, WeightFn] = {"wide": gaussian_weight, "official": official_gaussian_weight}


def run_tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int | None,
    stride: int | None = None,
    align: int = 1,
    shared_norms: nn.Module | None = None,
    weight: WeightFn = gaussian_weight,
) -> Tensor:
    """``fn`` over overlapping tiles of ``x`` (B, C, H, W), blended into one output.

    ``fn`` may change the channel count and scale the spatial size by a fixed factor (e.g. x4
    super-resolution, /8 VAE encoding, x8 decoding); the factor is read off the first tile.
    ``tile=None`` (or a tile covering ``x``) calls ``fn(x)`` once. Output float32.

    With ``shared_norms``, its GroupNorm layers normalise every tile with statistics of the
    whole input (:class:`~diffbir.models.norm.SharedGroupNormStats`): a first pass over the
    tiles records them, each pixel counted once (overlaps are split at their middle), and a
    second pass produces the output, at twice the compute. On the test VAE this brought tiled
    encodings closer to untiled ones; decodings were not (the decoder's mid-block attention,
    cut at tile borders, dominates its tile error there). ``weight(h, w, device=)`` gives a
    tile's blending weight (:data:`TILE_WEIGHTS`).
    """
    height, width = x.shape[-2:]
    if tile is None or (height <= tile and width <= tile):
        return fn(x).float()
    stride = stride or default_stride(tile, align)
    if shared_norms is None:
        return _blend_tiles(fn, x, tile, stride, align, weight)
    rows = tile_starts(height, tile, stride, align)
    cols = tile_starts(width, tile, stride, align)
    with SharedGroupNormStats(shared_norms) as stats:
        for y, (oy0, oy1) in zip(rows, _owned(rows, tile, height), strict=True):
            for x0, (ox0, ox1) in zip(cols, _owned(cols, tile, width), strict=True):
                th, tw = min(tile, height - y), min(tile, width - x0)
                stats.region = ((oy0 - y) / th, (oy1 - y) / th, (ox0 - x0) / tw, (ox1 - x0) / tw)
                fn(x[..., y : y + th, x0 : x0 + tw])
        stats.region = None
        stats.freeze()
        return _blend_tiles(fn, x, tile, stride, align, weight)


def _blend_tiles(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, stride: int, align: int, weight: WeightFn
) -> Tensor:
    height, width = x.shape[-2:]
    out = weights = None
    scale = 1.0
    for y0, y1, x0, x1 in tile_boxes(height, width, tile, stride, align):
        piece = fn(x[..., y0:y1, x0:x1]).float()
        if out is None:
            scale = piece.shape[-1] / (x1 - x0)
            out_h, out_w = round(height * scale), round(width * scale)
            out = piece.new_zeros(*piece.shape[:-2], out_h, out_w)
            weights = piece.new_zeros(out_h, out_w)
        oy0, ox0 = round(y0 * scale), round(x0 * scale)
        oh, ow = piece.shape[-2:]
        if (oh, ow) != (round((y1 - y0) * scale), round((x1 - x0) * scale)):
            raise ValueError(
                f"tiled run: a {y1 - y0}x{x1 - x0} tile gave {oh}x{ow}; the scale must be fixed"
            )
        w = weight(oh, ow, device=piece.device)
        out[..., oy0 : oy0 + oh, ox0 : ox0 + ow] += piece * w
        weights[oy0 : oy0 + oh, ox0 : ox0 + ow] += w
    return out / weights


def _crop_cond(cond: Mapping[str, Tensor], box: Box, size: tuple[int, int]) -> dict[str, Tensor]:
    """Crop the spatial (4-D) entries of ``cond`` to ``box`` of a ``size`` grid, scaled by each
    entry's integer size ratio to that grid (8 for a condition image over the latent)."""
    y0, y1, x0, x1 = box
    out = {}
    for key, value in cond.items():
        if value.ndim == 4:
            f = value.shape[-2] // size[0]
            if f < 1 or value.shape[-2:] != (f * size[0], f * size[1]):
                raise ValueError(
                    f"tiled model: cond[{key!r}] of size {tuple(value.shape[-2:])} is not an "
                    f"integer multiple of the latent size {tuple(size)}"
                )
            value = value[..., f * y0 : f * y1, f * x0 : f * x1]
        out[key] = value
    return out


class TileLayout:
    """The tile boxes of a grid with their Gaussian blending weights and the weights' sum:
    built once per grid size and reused at every sampling step (moved once to the device the
    blended tensors are on)."""

    def __init__(
        self, height: int, width: int, tile: int, stride: int, weight: WeightFn = gaussian_weight
    ) -> None:
        self.boxes = tile_boxes(height, width, tile, stride)
        self.weights = [weight(y1 - y0, x1 - x0) for y0, y1, x0, x1 in self.boxes]
        self.total = torch.zeros(height, width)
        for (y0, y1, x0, x1), w in zip(self.boxes, self.weights, strict=True):
            self.total[y0:y1, x0:x1] += w

    def blend(self, run: Callable[[int, Box], Tensor], like: Tensor) -> Tensor:
        """Sum of ``run(index, box) * weight`` over the tiles, divided by the summed weights."""
        if self.total.device != like.device:
            self.weights = [w.to(like.device) for w in self.weights]
            self.total = self.total.to(like.device)
        out = torch.zeros_like(like, dtype=self.total.dtype)
        for index, ((y0, y1, x0, x1), w) in enumerate(zip(self.boxes, self.weights, strict=True)):
            out[..., y0:y1, x0:x1] += run(index, (y0, y1, x0, x1)) * w
        return out / self.total


class TiledModel:
    """A conditional model ``model_fn(x, t, cond)`` run on overlapping latent tiles.

    Spatial condition tensors (4-D: ``cond["latent"]``, or a condition image at 8x) are cropped
    with ``x``, scaled to their resolution; others (the text context) are passed whole. Tile
    outputs are blended with Gaussian weights, so with sampling every step sees one seamless
    noise prediction.
    """

    def __init__(
        self, model_fn: ConditionalModel, tile: int, stride: int, weight: WeightFn = gaussian_weight
    ) -> None:
        self.model_fn = model_fn
        self.tile = tile
        self.stride = stride
        self.weight = weight
        self._layouts: dict[tuple[int, int], TileLayout] = {}

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        size = (x.shape[-2], x.shape[-1])
        if size not in self._layouts:
            self._layouts[size] = TileLayout(*size, self.tile, self.stride, self.weight)
        layout = self._layouts[size]
        if len(layout.boxes) == 1:
            return self.model_fn(x, t, cond)

        def run(index: int, box: Box) -> Tensor:
            y0, y1, x0, x1 = box
            return self.model_fn(x[..., y0:y1, x0:x1], t, _crop_cond(cond, box, size)).float()

        return layout.blend(run, x)


class TiledGuidance:
    """Restoration guidance applied tile by tile (each tile guided towards its part of the target).

    ``make(y0, y1, x0, x1)`` builds the guidance for one latent box (pixel box = 8x it); the
    guided tiles are blended with Gaussian weights. Each tile's loss is averaged over that tile,
    so memory (including the decoder's backward pass in pixel space) is bounded by the tile.
    """

    def __init__(
        self,
        make: Callable[[int, int, int, int], Guidance],
        latent_size: tuple[int, int],
        tile: int,
        stride: int,
        weight: WeightFn = gaussian_weight,
    ) -> None:
        self.layout = TileLayout(*latent_size, tile, stride, weight)
        self.guides = [make(*box) for box in self.layout.boxes]

    def __call__(self, pred_x0: Tensor, t_model: float, coef1: float) -> Tensor:
        if len(self.guides) == 1:
            return self.guides[0](pred_x0, t_model, coef1)

        def run(index: int, box: Box) -> Tensor:
            y0, y1, x0, x1 = box
            return self.guides[index](pred_x0[..., y0:y1, x0:x1], t_model, coef1)

        return self.layout.blend(run, pred_x0).to(pred_x0.dtype)
