"""The latent codec of stage 2: the VAE, tiled when asked, with the official padding.

Condition images are zero-padded to a multiple of 64 (8 when the VAE encoder or the diffusion
is tiled) before encoding; the sampled latent is also padded to a multiple of 8 unless the
diffusion is tiled; both paddings are cropped after decoding (SPEC "Image sizes").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffbir.pipeline.options import LATENT_FACTOR, TileOptions
from diffbir.pipeline.resize import pad_to_multiple
from diffbir.pipeline.tiling import TILE_WEIGHTS, run_tiled


def pad_multiple(tiles: TileOptions) -> int:
    """Stage-2 condition images are zero-padded to this multiple: 64, or 8 when the VAE encoder
    or the diffusion is tiled (official)."""
    return LATENT_FACTOR if tiles.vae_encoder is not None or tiles.diffusion is not None else 64


def latent_size(
    height: int, width: int, tiles: TileOptions, sampled: bool = True
) -> tuple[int, int]:
    """The latent size of a condition of ``height`` x ``width`` zero-padded to
    :func:`pad_multiple`; ``sampled``: the size sampled at, where (official) the latent is also
    zero-padded to a multiple of 8 unless the diffusion is tiled."""
    multiple = pad_multiple(tiles)
    size = [-(-side // multiple) * multiple // LATENT_FACTOR for side in (height, width)]
    if sampled and tiles.diffusion is None:
        size = [-(-side // 8) * 8 for side in size]
    return size[0], size[1]


class LatentCodec:
    """Encodes condition images and decodes final latents with a ControlLDM's VAE."""

    def __init__(self, cldm: nn.Module) -> None:
        self.cldm = cldm

    def encode(self, image: Tensor, tiles: TileOptions) -> Tensor:
        """Latents (posterior mode, scaled) of images in [-1, 1]."""
        tile = tiles.vae_encoder
        stride = None if tile is None else max(8, tile * 3 // 4 // 8 * 8)
        shared = self.cldm.vae.encoder if tiles.vae_shared_norm in ("encoder", "both") else None
        weight = TILE_WEIGHTS[tiles.weights]
        return run_tiled(self.cldm.vae_encode, image, tile, stride, LATENT_FACTOR, shared, weight)

    def decode(self, z: Tensor, tiles: TileOptions) -> Tensor:
        """Images in about [-1, 1] of scaled latents."""
        tile = None if tiles.vae_decoder is None else tiles.vae_decoder // LATENT_FACTOR
        stride = None if tile is None else max(1, tile * 3 // 4)
        shared = self.cldm.vae.decoder if tiles.vae_shared_norm in ("decoder", "both") else None
        weight = TILE_WEIGHTS[tiles.weights]
        return run_tiled(self.cldm.vae_decode, z, tile, stride, shared_norms=shared, weight=weight)

    @torch.no_grad()
    def condition_latent(self, cond: Tensor, tiles: TileOptions) -> Tensor:
        """The condition latent (c_img) of condition images (N, 3, h, w) in [0, 1], float32,
        padded as the official pads it (:func:`latent_size`)."""
        cond = cond.float()
        latent = self.encode(pad_to_multiple(cond, pad_multiple(tiles)) * 2 - 1, tiles)
        height, width = latent_size(*cond.shape[-2:], tiles)
        return F.pad(latent, (0, width - latent.shape[-1], 0, height - latent.shape[-2]))
