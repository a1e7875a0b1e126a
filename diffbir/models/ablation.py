"""IRControlNet ablation variants (paper §3.3 "Discussion", Fig. 4 and 11; Tables 1, 7 and 9).

Each variant changes IRControlNet along one axis; everything else is IRControlNet:

============  =========  ==============================================================
variant       paper      change
============  =========  ==============================================================
ircontrolnet  --         none (the reference: same keys, same numbers as IRControlNet)
controlnet    Variant 1  condition encoding: no VAE latent; the condition *image* goes
                         through a small conv stack ending in a zero conv
                         (``input_hint_block``, 8x down), added to the output of the
                         condition network's first layer, which sees z_t only (ControlNet)
no_zt         Variant 2  condition network input: c_RM only (first conv 4 -> C, copied)
random_init   Variant 3  condition network initialisation: PyTorch's random init, no copy
                         of the UNet encoder (the zero convs stay zero)
decoder       Variant 4  feature modulation: the middle-block output and the decoder's own
                         features (the main-path input of every decoder block) are
                         controlled, instead of the skip features
concat        Variant 5  feature modulation: middle block + the concatenation
                         ``cat(decoder feature, skip)`` of every decoder block
sft           Variant 6  feature modulation: middle-block output and skips are modulated
                         by SFT, ``F * (1 + gamma) + beta``; ``(gamma, beta)`` come from
                         zero convs of twice the width, so they start at zero
============  =========  ==============================================================

Control ``i`` comes from condition-network block ``i`` (the last one from the middle block) and
is used by UNet decoder block ``n - 1 - i``, where IRControlNet adds it to the skip; the
variants' zero convs map it to the width of what they control. Every variant starts with zero
controls, so a fresh variant leaves the frozen UNet's prediction unchanged.

Select a variant with ``name: control_ldm_ablation`` and ``params.variant`` in a model config
(``configs/model/control_ldm[_tiny]_<variant>.yaml``); the trainable condition network is
``model.controlnet`` as for :class:`~diffbir.models.control_ldm.ControlLDM`, so the GM training
task trains and exports it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffbir.models.control_ldm import ControlLDM, unet_kwargs
from diffbir.models.controlnet import IRControlNet
from diffbir.models.unet import UNet

INJECTIONS = ("skip", "decoder", "concat", "sft")
LATENT_FACTOR = 8  # VAE downsampling: the hint encoder must reduce the image by the same factor


@dataclass(frozen=True)
class VariantSpec:
    """The three design axes of paper Fig. 4: condition encoding, network, modulation."""

    pixel_hint: bool = False  # Variant 1: conv-stack encoder on the image instead of the VAE
    use_zt: bool = True  # Variant 2: False = condition network sees c_RM only
    copy_init: bool = True  # Variant 3: False = random initialisation
    injection: str = "skip"  # Variants 4-6: "decoder", "concat", "sft"


VARIANTS: dict[str, VariantSpec] = {
    "ircontrolnet": VariantSpec(),
    "controlnet": VariantSpec(pixel_hint=True),
    "no_zt": VariantSpec(use_zt=False),
    "random_init": VariantSpec(copy_init=False),
    "decoder": VariantSpec(injection="decoder"),
    "concat": VariantSpec(injection="concat"),
    "sft": VariantSpec(injection="sft"),
}


def variant_spec(name: str) -> VariantSpec:
    """The :class:`VariantSpec` of ``name``; ValueError listing the known names otherwise."""
    if name not in VARIANTS:
        raise ValueError(f"unknown IRControlNet variant {name!r}; expected one of {list(VARIANTS)}")
    return VARIANTS[name]


def zero_conv(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Sequential:
    """A conv initialised to zero, wrapped in a Sequential like IRControlNet's zero convs."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv)


def hint_encoder(image_channels: int, channels: Sequence[int], out_channels: int) -> nn.Sequential:
    """ControlNet's condition encoder: 3x3 convs + SiLU, ``len(channels) - 1`` of them with
    stride 2, then a zero-initialised 3x3 conv to ``out_channels``."""
    if 2 ** (len(channels) - 1) != LATENT_FACTOR:
        raise ValueError(
            f"hint_encoder_channels must list {LATENT_FACTOR.bit_length()} widths (one per "
            f"resolution, {LATENT_FACTOR}x down in all), got {list(channels)}"
        )
    layers: list[nn.Module] = [nn.Conv2d(image_channels, channels[0], 3, padding=1), nn.SiLU()]
    for prev, cur in zip(channels[:-1], channels[1:], strict=True):
        layers += [nn.Conv2d(prev, prev, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(prev, cur, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(zero_conv(channels[-1], out_channels, 3)[0])
    return nn.Sequential(*layers)


def decoder_input_channels(
    model_channels: int, channel_mult: Sequence[int], num_res_blocks: int, middle_channels: int
) -> list[int]:
    """Width of the main-path input of every UNet decoder block (before the skip concat)."""
    blocks = num_res_blocks + 1
    outputs = [m * model_channels for m in reversed(channel_mult) for _ in range(blocks)]
    return [middle_channels, *outputs[:-1]]


class AblationControlNet(IRControlNet):
    """IRControlNet changed as :data:`VARIANTS` ``[variant]`` says (see the module docstring).

    ``forward(x_t, hint, t, context)``: ``hint`` is the condition latent c_RM, or for
    ``controlnet`` the condition image (B, 3, 8h, 8w) in [0, 1]. Returns the control tensors
    (one per condition-network block, then the middle block), already in the width the
    variant's injection needs (twice the width for ``sft``: gamma then beta).
    """

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
        *,
        variant: str = "ircontrolnet",
        hint_encoder_channels: Sequence[int] = (16, 32, 96, 256),
        image_channels: int = 3,
    ):
        spec = variant_spec(variant)
        super().__init__(
            in_channels if spec.use_zt else 0,
            0 if spec.pixel_hint else hint_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            attention_resolutions,
            num_head_channels,
            context_dim,
            transformer_depth,
        )
        self.variant = variant
        self.spec = spec
        self.input_hint_block = (
            hint_encoder(image_channels, hint_encoder_channels, model_channels)
            if spec.pixel_hint
            else None
        )
        middle = self.skip_channels[-1]
        if spec.injection != "skip":
            targets = self._control_widths(model_channels, channel_mult, num_res_blocks)
            self.zero_convs = nn.ModuleList(
                zero_conv(ch, out) for ch, out in zip(self.skip_channels, targets, strict=True)
            )
            scale = 2 if spec.injection == "sft" else 1
            self.middle_block_out = zero_conv(middle, scale * middle)

    def _control_widths(
        self, model_channels: int, channel_mult: Sequence[int], num_res_blocks: int
    ) -> list[int]:
        """Output width of zero conv ``i`` (it feeds decoder block ``n - 1 - i``)."""
        skips = self.skip_channels
        decoder = decoder_input_channels(model_channels, channel_mult, num_res_blocks, skips[-1])
        mains = list(reversed(decoder))  # main-path width at the decoder block using control i
        if self.spec.injection == "decoder":
            return mains
        if self.spec.injection == "concat":
            return [m + s for m, s in zip(mains, skips, strict=True)]
        return [2 * s for s in skips]  # sft

    @property
    def injection(self) -> str:
        """Where the controls go: "skip" (IRControlNet), "decoder", "concat" or "sft"."""
        return self.spec.injection

    @property
    def hint_key(self) -> str:
        """The condition-dict entry this network reads: "latent" or "image"."""
        return "image" if self.spec.pixel_hint else "latent"

    def forward(self, x: Tensor, hint: Tensor, t: Tensor, context: Tensor) -> list[Tensor]:
        emb = self.embed_time(t, x.dtype)
        hint = hint.to(x.dtype)
        inputs = ([x] if self.spec.use_zt else []) + ([] if self.spec.pixel_hint else [hint])
        h = torch.cat(inputs, dim=1)
        controls = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = self.run(block, h, emb, context)
            if i == 0 and self.input_hint_block is not None:
                h = h + self.input_hint_block(hint)
            controls.append(zero(h))
        h = self.run(self.middle_block, h, emb, context)
        controls.append(self.middle_block_out(h))
        return controls

    @torch.no_grad()
    def zero_outputs(self) -> None:
        """Zero every layer whose output enters the UNet or the network (zero convs)."""
        layers = [*(z[0] for z in self.zero_convs), self.middle_block_out[0]]
        if self.input_hint_block is not None:
            layers.append(self.input_hint_block[-1])
        for layer in layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def init_from_unet(self, unet: UNet) -> None:
        """Paper §3.3 initialisation, as the variant allows.

        Copy every UNet weight of the same name and shape (not for ``random_init``); extra input
        channels of the first conv (the c_RM channels next to z_t) start at zero; the hint
        encoder keeps its random init; all zero convs are (re)set to zero.
        """
        self.zero_outputs()
        if not self.spec.copy_init:
            return
        source = unet.state_dict()
        for name, param in self.state_dict().items():
            if name.startswith(("zero_convs.", "middle_block_out.", "input_hint_block.")):
                continue
            src = source.get(name)
            if src is not None and src.shape == param.shape:
                param.copy_(src)
            elif src is not None and name == "input_blocks.0.0.weight" and self.spec.use_zt:
                param.zero_()
                param[:, : src.shape[1]].copy_(src)
            else:
                shape = None if src is None else tuple(src.shape)
                raise ValueError(
                    f"cannot initialise {self.variant} '{name}' {tuple(param.shape)} from the "
                    f"UNet's {shape}: the two configs differ"
                )


def _sft(feature: Tensor, control: Tensor) -> Tensor:
    gamma, beta = control.chunk(2, dim=1)
    return feature * (1 + gamma) + beta


def unet_with_controls(
    unet: UNet, x: Tensor, t: Tensor, context: Tensor, controls: Sequence[Tensor], injection: str
) -> Tensor:
    """The frozen UNet's noise prediction with ``controls`` injected as ``injection`` says.

    ``"skip"`` computes exactly what :meth:`UNet.forward` does with ``control``.
    """
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
    emb = unet.embed_time(t, x.dtype)
    h, skips = x, []
    for block in unet.input_blocks:
        h = unet.run(block, h, emb, context)
        skips.append(h)
    h = unet.run(unet.middle_block, h, emb, context)
    if len(controls) != len(skips) + 1:
        raise ValueError(f"UNet expects {len(skips) + 1} control tensors, got {len(controls)}")
    controls = list(controls)
    middle = controls.pop()
    h = _sft(h, middle) if injection == "sft" else h + middle
    for block in unet.output_blocks:
        skip, control = skips.pop(), controls.pop()
        if injection == "skip":
            joined = torch.cat([h, skip + control], dim=1)
        elif injection == "decoder":
            joined = torch.cat([h + control, skip], dim=1)
        elif injection == "concat":
            joined = torch.cat([h, skip], dim=1) + control
        else:
            joined = torch.cat([h, _sft(skip, control)], dim=1)
        h = unet.run(block, joined, emb, context)
    return unet.out(h)


class AblationControlLDM(ControlLDM):
    """:class:`ControlLDM` whose condition network is an :class:`AblationControlNet`.

    Same constructor as ControlLDM plus ``variant`` (a key of :data:`VARIANTS`) and, for
    ``controlnet``, ``hint_encoder_channels``. Weight loading, freezing, export and the GM
    training task work as for ControlLDM. The ``controlnet`` variant reads the condition image
    ``cond["image"]``, which :meth:`condition` adds.
    """

    controlnet_class = AblationControlNet

    def __init__(
        self,
        unet_cfg: Mapping[str, Any],
        controlnet_cfg: Mapping[str, Any],
        vae_cfg: Mapping[str, Any],
        clip_cfg: Mapping[str, Any],
        latent_scale_factor: float = 0.18215,
        variant: str = "ircontrolnet",
        hint_encoder_channels: Sequence[int] = (16, 32, 96, 256),
    ):
        variant_spec(variant)
        controlnet_cfg = {
            **controlnet_cfg,
            "variant": variant,
            "hint_encoder_channels": tuple(hint_encoder_channels),
        }
        super().__init__(unet_cfg, controlnet_cfg, vae_cfg, clip_cfg, latent_scale_factor)
        self.variant = variant

    @classmethod
    def controlnet_arguments(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """As ControlLDM's, with a config's ``variant`` and ``hint_encoder_channels``."""
        cfg = dict(params["controlnet_cfg"])
        cfg.update({k: params[k] for k in ("variant", "hint_encoder_channels") if k in params})
        return unet_kwargs(cfg, "controlnet_cfg")

    @property
    def hint_key(self) -> str:
        return self.controlnet.hint_key

    def condition(
        self, text: Tensor, image: Tensor, latent: Tensor | None = None
    ) -> dict[str, Tensor]:
        """ControlLDM's ``{"text", "latent"}``, plus ``"image"`` (in [0, 1]) for ``controlnet``."""
        cond = super().condition(text, image, latent)
        if self.hint_key == "image":
            cond["image"] = image
        return cond

    def apply_controls(
        self, x_t: Tensor, t: Tensor, context: Tensor, controls: list[Tensor]
    ) -> Tensor:
        return unet_with_controls(self.unet, x_t, t, context, controls, self.controlnet.injection)
