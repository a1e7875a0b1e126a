"""The Stable Diffusion 2.1 UNet (epsilon/v predictor) with IRControlNet control injection.

Module and parameter names follow the official checkpoints (``model.diffusion_model.*``), so the
released weight files load as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffbir.models.attention import SpatialTransformer
from diffbir.models.norm import GroupNorm32


def channels_last(x: Tensor) -> Tensor:
    """``x`` in NHWC memory order: faster convolutions, and the token reshapes of the
    transformers become views instead of copies."""
    return x.contiguous(memory_format=torch.channels_last)


def conv_weights_channels_last(module: nn.Module) -> None:
    """Store the 4-D (conv) weights of ``module`` in NHWC order, as the activations, so that
    convolutions do not reorder their weights on every call (state-dict keys are unchanged)."""
    module.to(memory_format=torch.channels_last)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``cat([cos(t f), sin(t f)])`` with ``f_i = max_period^(-i/half)``."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between; 1x1 skip if widths differ."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[..., None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 conv with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepBlock(nn.Sequential):
    """A sequence of layers fed with the timestep embedding and the text context as they need."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetEncoder(nn.Module):
    """Time embedding, input (down) blocks and middle block: shared by the UNet and IRControlNet.

    ``skip_channels`` lists the width of every input block's output, in order.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_head_channels: int,
        context_dim: int,
        transformer_depth: int = 1,
    ):
        super().__init__()
        self.model_channels = model_channels
        self.gradient_checkpointing = False
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        self.num_head_channels = num_head_channels
        self.transformer_depth = transformer_depth
        self.context_dim = context_dim
        self.attention_resolutions = set(attention_resolutions)
        blocks = [TimestepBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(self.attention(ch))
                blocks.append(TimestepBlock(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                blocks.append(TimestepBlock(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)
        self.middle_block = TimestepBlock(
            ResBlock(ch, emb_dim, ch), self.attention(ch), ResBlock(ch, emb_dim, ch)
        )
        self.skip_channels = skip_channels
        self.out_ds = ds

    def attention(self, channels: int) -> SpatialTransformer:
        """A spatial transformer for ``channels`` features (heads of ``num_head_channels``)."""
        heads = channels // self.num_head_channels
        return SpatialTransformer(
            channels, heads, self.num_head_channels, self.transformer_depth, self.context_dim
        )

    def embed_time(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """The timestep embedding for integer (or float) timesteps ``t`` of shape (B,)."""
        emb = timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype)
        return self.time_embed(emb).to(dtype)

    def run(self, block: TimestepBlock, h: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        """One block, with activation checkpointing when enabled and training."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)


class UNet(UNetEncoder):
    """SD 2.1 UNet: ``forward(x, t, context, control=None)``.

    ``control`` (13 tensors for SD 2.1: one per skip, then the middle block) is added to the
    middle-block output (last tensor) and to each skip before it is concatenated in the decoder.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_head_channels: int = 64,
        context_dim: int = 1024,
        transformer_depth: int = 1,
    ):
        super().__init__(
            in_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            attention_resolutions,
            num_head_channels,
            context_dim,
            transformer_depth,
        )
        emb_dim = model_channels * 4
        skips = list(self.skip_channels)
        ch, ds = self.skip_channels[-1], self.out_ds
        blocks = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(ch + skips.pop(), emb_dim, mult * model_channels)
                ]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(self.attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepBlock(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(
            GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )
        conv_weights_channels_last(self)

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, control: Sequence[Tensor] | None = None
    ) -> Tensor:
        emb = self.embed_time(t, x.dtype)
        h, skips = channels_last(x), []
        for block in self.input_blocks:
            h = self.run(block, h, emb, context)
            skips.append(h)
        h = self.run(self.middle_block, h, emb, context)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(
                    f"UNet expects {len(skips) + 1} control tensors, got {len(control)}"
                )
            control = list(control)
            h = h + control.pop()
            skips = [s + c for s, c in zip(skips, control, strict=True)]
        for block in self.output_blocks:
            h = self.run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).contiguous()
