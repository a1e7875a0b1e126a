"""IRControlNet (paper §3.3): a trainable copy of the UNet encoder fed with ``cat(z_t, c)``.

Parameter names follow the official flat files (``v2.pth``): ``time_embed.*``, ``input_blocks.*``,
``middle_block.*``, ``zero_convs.0..N-1.0.*`` and ``middle_block_out.0.*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffbir.models.unet import UNet, UNetEncoder, channels_last, conv_weights_channels_last


def zero_conv(channels: int) -> nn.Sequential:
    """A 1x1 conv initialised to zero (wrapped in a Sequential, as in the official key names)."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv)


class IRControlNet(UNetEncoder):
    """``forward(x_t, cond_latent, t, context)`` -> one control tensor per UNet skip + middle."""

    def __init__(
        self,
        in_channels: int = 4,
        hint_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_head_channels: int = 64,
        context_dim: int = 1024,
        transformer_depth: int = 1,
    ):
        super().__init__(
            in_channels + hint_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            attention_resolutions,
            num_head_channels,
            context_dim,
            transformer_depth,
        )
        self.in_channels = in_channels
        self.zero_convs = nn.ModuleList(zero_conv(ch) for ch in self.skip_channels)
        self.middle_block_out = zero_conv(self.skip_channels[-1])
        conv_weights_channels_last(self)

    def forward(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        emb = self.embed_time(t, x.dtype)
        h = channels_last(torch.cat([x, hint.to(x.dtype)], dim=1))
        controls = []
        for block, zero in zip(self.input_blocks, self.zero_convs, strict=True):
            h = self.run(block, h, emb, context)
            controls.append(zero(h))
        h = self.run(self.middle_block, h, emb, context)
        controls.append(self.middle_block_out(h))
        return controls

    @torch.no_grad()
    def init_from_unet(self, unet: UNet) -> None:
        """Copy every same-named UNet weight; the hint input channels and zero convs get 0.

        The zero convs output zero, so the result leaves the UNet's prediction unchanged.
        """
        source = unet.state_dict()
        for name, param in self.state_dict().items():
            if name not in source:
                param.zero_()  # zero_convs.* and middle_block_out.*
                continue
            src = source[name]
            if src.shape == param.shape:
                param.copy_(src)
            elif name == "input_blocks.0.0.weight" and src.shape[1] == self.in_channels:
                param.zero_()
                param[:, : self.in_channels].copy_(src)
            else:
                raise ValueError(
                    f"cannot initialise IRControlNet '{name}' {tuple(param.shape)} from the UNet's "
                    f"{tuple(src.shape)}: the two configs differ"
                )
