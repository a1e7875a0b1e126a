"""SCUNet (Swin-Conv-UNet), DiffBIR's stage-1 model for blind image denoising.

State-dict keys follow the official ``scunet_color_real_psnr.pth``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffbir.models.norm import init_transformer_weights

_PAD_MULTIPLE = 64  # three 2x downsamplings and 8x8 windows at the bottom


@functools.lru_cache(maxsize=8)
def _shift_mask(h_win: int, w_win: int, window: int, device: torch.device) -> Tensor:
    """``(nW, N, N)`` additive mask (0 or -inf) for attention on a map rolled by ``-window // 2``:
    in the last window row/column, pixels that wrapped around do not see the others."""
    s = window - window // 2
    with torch.inference_mode(False), torch.no_grad():
        block = torch.zeros(h_win, w_win, window, window, window, window, dtype=torch.bool)
        block[-1, :, :s, :, s:, :] = True
        block[-1, :, s:, :, :s, :] = True
        block[:, -1, :, :s, :, s:] = True
        block[:, -1, :, s:, :, :s] = True
        block = block.reshape(h_win * w_win, window * window, window * window)
        mask = torch.zeros(block.shape).masked_fill(block, float("-inf"))
        return mask.to(device)


def _relative_coords(window: int) -> tuple[Tensor, Tensor]:
    """Row and column offsets (shifted to be >= 0) between every pair of window positions."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ys[:, None] - ys[None, :] + window - 1, xs[:, None] - xs[None, :] + window - 1


class WMSA(nn.Module):
    """(Shifted-)window multi-head self-attention on ``(B, H, W, C)`` maps."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = dim // head_dim
        self.window = window
        self.shifted = shifted
        self.embedding_layer = nn.Linear(dim, 3 * dim)
        # bias indexed [head, dy, dx]
        self.relative_position_params = nn.Parameter(
            torch.empty(self.num_heads, 2 * window - 1, 2 * window - 1)
        )
        self.linear = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)

    def relative_bias(self) -> Tensor:
        """``(heads, N, N)`` relative-position bias."""
        params = self.relative_position_params
        dy, dx = (t.to(params.device) for t in _relative_coords(self.window))
        return params[:, dy, dx]

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        p, heads, shift = self.window, self.num_heads, self.window // 2
        if self.shifted:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        hw, ww = h // p, w // p
        x = x.view(b, hw, p, ww, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hw * ww, p * p, c)
        qkv = self.embedding_layer(x).view(b, hw * ww, p * p, 3 * heads, self.head_dim)
        q, k, v = qkv.permute(0, 1, 3, 2, 4).chunk(3, dim=2)  # (B, nW, heads, N, d) each
        bias = self.relative_bias().unsqueeze(0)  # (1, heads, N, N)
        if self.shifted:
            bias = bias + _shift_mask(hw, ww, p, x.device).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.transpose(2, 3).reshape(b, hw * ww, p * p, c)
        out = self.linear(out)
        out = out.view(b, hw, ww, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if self.shifted:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: (S)W-MSA and a 4x GELU MLP, both residual."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = WMSA(dim, head_dim, window, shifted)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.msa(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ConvTransBlock(nn.Module):
    """Swin-Conv block: a 1x1 conv splits channels into a residual conv branch and a
    transformer branch, a second 1x1 conv fuses them, plus a skip connection."""

    def __init__(self, conv_dim: int, trans_dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.conv_dim = conv_dim
        self.trans_dim = trans_dim
        self.trans_block = Block(trans_dim, head_dim, window, shifted)
        self.conv1_1 = nn.Conv2d(conv_dim + trans_dim, conv_dim + trans_dim, 1)
        self.conv1_2 = nn.Conv2d(conv_dim + trans_dim, conv_dim + trans_dim, 1)
        self.conv_block = nn.Sequential(
            nn.Conv2d(conv_dim, conv_dim, 3, 1, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(conv_dim, conv_dim, 3, 1, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        conv_x, trans_x = self.conv1_1(x).split((self.conv_dim, self.trans_dim), dim=1)
        conv_x = self.conv_block(conv_x) + conv_x
        trans_x = self.trans_block(trans_x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.conv1_2(torch.cat((conv_x, trans_x), dim=1))


class SCUNet(nn.Module):
    """Four-level UNet of Swin-Conv blocks; ``config`` gives the block count of each of its
    seven stages (down1-3, body, up3-1).

    Input ``(B, in_nc, H, W)`` in ``[0, 1]``, replicate-padded to a multiple of 64 and cropped back;
    the output has the input's shape (not clamped). Blocks alternate regular and shifted windows
    unless a stage's nominal resolution (``input_resolution`` / 2^level) fits in one window.
    """

    def __init__(
        self,
        in_nc: int = 3,
        config: Sequence[int] = (2, 2, 2, 2, 2, 2, 2),
        dim: int = 64,
        head_dim: int = 32,
        window_size: int = 8,
        input_resolution: int = 256,
    ) -> None:
        super().__init__()
        if len(config) != 7:
            raise ValueError(f"SCUNet: config needs 7 block counts, got {list(config)}")

        def stage(n: int, width: int, level: int) -> list[nn.Module]:
            single_window = input_resolution // 2**level <= window_size
            return [
                ConvTransBlock(
                    width // 2, width // 2, head_dim, window_size, i % 2 == 1 and not single_window
                )
                for i in range(n)
            ]

        def down(width: int) -> nn.Module:
            return nn.Conv2d(width, 2 * width, 2, 2, 0, bias=False)

        def up(width: int) -> nn.Module:
            return nn.ConvTranspose2d(2 * width, width, 2, 2, 0, bias=False)

        self.m_head = nn.Sequential(nn.Conv2d(in_nc, dim, 3, 1, 1, bias=False))
        self.m_down1 = nn.Sequential(*stage(config[0], dim, 0), down(dim))
        self.m_down2 = nn.Sequential(*stage(config[1], 2 * dim, 1), down(2 * dim))
        self.m_down3 = nn.Sequential(*stage(config[2], 4 * dim, 2), down(4 * dim))
        self.m_body = nn.Sequential(*stage(config[3], 8 * dim, 3))
        self.m_up3 = nn.Sequential(up(4 * dim), *stage(config[4], 4 * dim, 2))
        self.m_up2 = nn.Sequential(up(2 * dim), *stage(config[5], 2 * dim, 1))
        self.m_up1 = nn.Sequential(up(dim), *stage(config[6], dim, 0))
        self.m_tail = nn.Sequential(nn.Conv2d(dim, in_nc, 3, 1, 1, bias=False))
        self.apply(init_transformer_weights)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % _PAD_MULTIPLE, 0, (-h) % _PAD_MULTIPLE), mode="replicate")
        x1 = self.m_head(x)
        x2 = self.m_down1(x1)
        x3 = self.m_down2(x2)
        x4 = self.m_down3(x3)
        y = self.m_body(x4)
        y = self.m_up3(y + x4)
        y = self.m_up2(y + x3)
        y = self.m_up1(y + x2)
        y = self.m_tail(y + x1)
        return y[..., :h, :w]
