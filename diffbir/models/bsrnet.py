"""BSRNet: the RRDB network (ESRGAN generator) used as DiffBIR's x4 stage-1 model for BSR.

State-dict keys follow the official ``BSRNet.pth``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RESIDUAL_SCALE = 0.2


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs with a scaled residual."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(self.lrelu(conv(torch.cat(feats, dim=1))))
        return self.conv5(torch.cat(feats, dim=1)) * _RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks with a scaled residual."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * _RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    """RRDB trunk and nearest x2 + conv upsampling stages (``sf`` a power of two).

    Input ``(B, in_nc, H, W)`` in ``[0, 1]``; output ``(B, out_nc, sf*H, sf*W)`` (not clamped).
    """

    def __init__(
        self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 23, gc: int = 32, sf: int = 4
    ) -> None:
        super().__init__()
        if sf < 2 or sf & (sf - 1):
            raise ValueError(f"RRDBNet: sf must be a power of two >= 2, got {sf}")
        self.num_up = int(math.log2(sf))
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(1, self.num_up + 1):
            self.add_module(f"upconv{i}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs, scaled by 0.1 inside the dense blocks (ESRGAN initialisation)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                if name.startswith("RRDB_trunk"):
                    module.weight.data.mul_(0.1)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv_first(x)
        feat = feat + self.trunk_conv(self.RRDB_trunk(feat))
        for i in range(1, self.num_up + 1):
            conv = getattr(self, f"upconv{i}")
            feat = self.lrelu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.HRconv(feat)))
