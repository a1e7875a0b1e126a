"""The Stable Diffusion VAE (AutoencoderKL), with the official ``first_stage_model.*`` names."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffbir.models.norm import GroupNorm32
from diffbir.models.unet import channels_last, conv_weights_channels_last


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels, eps=1e-6)


class VAEResBlock(nn.Module):
    """Norm-SiLU-conv twice, with a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class VAEAttention(nn.Module):
    """Single-head self attention over all positions, 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        y = self.norm(x)
        q, k, v = (rearrange(f(y), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class VAEDownsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 conv with stride 2 and no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class VAEUpsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResBlock, attention, ResBlock at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = VAEResBlock(channels, channels)
        self.attn_1 = VAEAttention(channels)
        self.block_2 = VAEResBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """The res blocks of one resolution and an optional resampler (``downsample``/``upsample``)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class Encoder(nn.Module):
    """Image (B,3,H,W) in [-1,1] -> moments (B,2z,H/f,W/f) with ``f = 2**(len(ch_mult)-1)``."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        in_channels: int,
        z_channels: int,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, block_in = [], ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(VAEResBlock(block_in, block_out))
                block_in = block_out
            last = i == len(ch_mult) - 1
            levels.append(Level(blocks, None if last else VAEDownsample(block_in), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(channels_last(x))
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)))).contiguous()


class Decoder(nn.Module):
    """Latent (B,z,h,w) -> image (B,3,h*f,w*f) in about [-1,1]."""

    def __init__(
        self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, out_ch: int, z_channels: int
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        levels: list[Level] = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(VAEResBlock(block_in, block_out))
                block_in = block_out
            levels.insert(0, Level(blocks, VAEUpsample(block_in) if i else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(channels_last(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


class AutoencoderKL(nn.Module):
    """SD VAE. ``encode`` returns posterior moments; see :meth:`posterior_mode`/``sample``."""

    def __init__(
        self,
        embed_dim: int = 4,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        in_channels: int = 3,
        out_ch: int = 3,
        z_channels: int = 4,
    ):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, in_channels, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, out_ch, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.downscale = 2 ** (len(ch_mult) - 1)
        conv_weights_channels_last(self)

    def encode(self, x: Tensor) -> Tensor:
        """Posterior moments ``cat(mean, logvar)`` of image ``x`` in [-1, 1]."""
        return self.quant_conv(self.encoder(x))

    @staticmethod
    def posterior(
        moments: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """The posterior mode (mean), or a sample ``mean + std * noise`` from ``generator``."""
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
