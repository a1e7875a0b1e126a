"""Stage-1 SwinIR of DiffBIR: SwinIR with a pixel-unshuffle input and a nearest+conv upsampler.

With ``unshuffle_scale == sf`` (8 in DiffBIR) the network maps an image to one of the same size:
the input is pixel-unshuffled by 8, processed by residual Swin transformer groups at 1/8 of the
resolution and brought back by three nearest x2 + conv stages. State-dict keys follow the official
release (``general_swinir_v1.ckpt``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffbir.models.norm import init_transformer_weights

_RGB_MEAN = (0.4488, 0.4371, 0.4040)
_MASK_VALUE = -100.0  # additive attention mask between windows regions, as in the original


def window_partition(x: Tensor, window: int) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, window * window, C)`` non-overlapping windows, row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window * window, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """``(N, N)`` index into the ``(2w-1)^2`` relative-position bias table, ``N = window^2``."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> Tensor:
    """``(nW, N, N)`` additive mask (0 or -100) that keeps attention of a cyclically shifted
    feature map inside the regions that were adjacent before the shift."""
    labels = torch.zeros(1, h, w, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, hs in enumerate(bounds):
        for j, ws in enumerate(bounds):
            labels[:, hs, ws, :] = 3 * i + j
    windows = window_partition(labels, window).squeeze(-1)  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, _MASK_VALUE)


@functools.lru_cache(maxsize=8)
def _cached_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return shifted_window_mask(h, w, window, shift).to(device)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """``x``: ``(B * nW, N, C)`` windows; ``mask``: ``(nW, N, N)`` additive or None."""
        bw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        index = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[index].view(n, n, heads).permute(2, 0, 1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        else:
            # fold windows into the head axis so that the (window, head) bias broadcasts over B
            nw = mask.shape[0]
            bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, nw * heads, n, n)
            q, k, v = (t.reshape(bw // nw, nw * heads, n, -1) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.reshape(bw, heads, n, -1).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """Linear - GELU - Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, both pre-norm residual, on ``(B, H*W, C)`` tokens."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        if min(input_resolution) <= window_size:  # one window covers the map: nothing to shift
            window_size, shift_size = min(input_resolution), 0
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = (
            shifted_window_mask(*input_resolution, window_size, shift_size) if shift_size else None
        )
        self.register_buffer("attn_mask", mask)

    def _mask(self, h: int, w: int, device: torch.device) -> Tensor | None:
        if not self.shift_size:
            return None
        if (h, w) == tuple(self.input_resolution):
            return self.attn_mask
        return _cached_mask(h, w, self.window_size, self.shift_size, device)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        h, w = x_size
        b, _, c = x.shape
        s, win = self.shift_size, self.window_size
        y = self.norm1(x).view(b, h, w, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = self.attn(window_partition(y, win), self._mask(h, w, x.device))
        y = window_reverse(y, win, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """A stack of Swin blocks alternating regular and shifted windows."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                0 if i % 2 == 0 else window_size // 2,
                mlp_ratio,
                qkv_bias,
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        for block in self.blocks:
            x = block(x, x_size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin blocks, a 3x3 conv, and a skip connection."""

    def __init__(self, dim: int, layer: BasicLayer) -> None:
        super().__init__()
        self.residual_group = layer
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, x_size).transpose(1, 2).reshape(b, c, *x_size)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` tokens, optionally layer-normed."""

    def __init__(self, dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIR(nn.Module):
    """SwinIR with DiffBIR's modifications (pixel-unshuffle input, nearest+conv upsampling).

    Input: ``(B, in_chans, H, W)`` in ``[0, 1]``. The image is reflect-padded so that the feature
    map is a multiple of the window size; the official callers zero-pad to :attr:`size_multiple`
    (64 with DiffBIR's settings), so nothing is padded here. The output is cropped back to
    ``(H, W) * sf / unshuffle_scale``.
    """

    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_norm: bool = True,
        sf: int = 4,
        img_range: float = 1.0,
        upsampler: str = "nearest+conv",
        resi_connection: str = "1conv",
        unshuffle: bool = False,
        unshuffle_scale: int | None = None,
        num_feat: int = 64,
    ) -> None:
        super().__init__()
        if upsampler != "nearest+conv":
            raise ValueError(f"SwinIR: upsampler must be 'nearest+conv', got {upsampler!r}")
        if resi_connection != "1conv":
            raise ValueError(f"SwinIR: resi_connection must be '1conv', got {resi_connection!r}")
        if sf < 2 or sf & (sf - 1):
            raise ValueError(f"SwinIR: sf must be a power of two >= 2, got {sf}")
        if patch_size != 1:
            raise ValueError(f"SwinIR: only patch_size 1 is supported, got {patch_size}")
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinIR: depths {depths} and num_heads {num_heads} differ in length")
        if unshuffle and not unshuffle_scale:
            raise ValueError("SwinIR: unshuffle=True needs unshuffle_scale")
        self.sf = sf
        self.img_range = img_range
        self.window_size = window_size
        self.unshuffle_scale = unshuffle_scale if unshuffle else 1
        mean = _RGB_MEAN if in_chans == 3 else (0.0,) * in_chans
        self.register_buffer("mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)

        first = nn.Conv2d(in_chans * self.unshuffle_scale**2, embed_dim, 3, 1, 1)
        self.conv_first = (
            nn.Sequential(nn.PixelUnshuffle(self.unshuffle_scale), first) if unshuffle else first
        )
        self.patch_embed = PatchEmbed(embed_dim, patch_norm)
        resolution = (img_size // patch_size, img_size // patch_size)
        self.layers = nn.ModuleList(
            RSTB(
                embed_dim,
                BasicLayer(embed_dim, resolution, d, h, window_size, mlp_ratio, qkv_bias),
            )
            for d, h in zip(depths, num_heads, strict=True)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)

        self.conv_before_upsample = nn.Sequential(
            nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        self.num_up = int(math.log2(sf))
        for i in range(1, self.num_up + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.apply(init_transformer_weights)

    @property
    def size_multiple(self) -> int:
        """Callers pad inputs to this multiple (pixel unshuffle x window size) with zeros."""
        return self.window_size * self.unshuffle_scale

    def forward_features(self, x: Tensor) -> Tensor:
        """Residual Swin groups on a ``(B, C, h, w)`` feature map."""
        b, c, h, w = x.shape
        tokens = self.patch_embed(x)
        for layer in self.layers:
            tokens = layer(tokens, (h, w))
        return self.norm(tokens).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        multiple = self.size_multiple
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        feat = self.conv_first(x)
        feat = self.conv_after_body(self.forward_features(feat)) + feat
        feat = self.conv_before_upsample(feat)
        for i in range(1, self.num_up + 1):
            conv = getattr(self, f"conv_up{i}")
            feat = self.lrelu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        out = out / self.img_range + mean
        scale = self.sf / self.unshuffle_scale
        return out[..., : int(h * scale), : int(w * scale)]
