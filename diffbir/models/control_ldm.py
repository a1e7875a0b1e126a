"""ControlLDM: frozen Stable Diffusion 2.1 (UNet, VAE, text encoder) steered by IRControlNet.

The constructor takes the sub-configs in the official config format (``unet_cfg``,
``controlnet_cfg``, ``vae_cfg``, ``clip_cfg``), so a reference YAML can be used as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diffbir.checkpoint import load_weights, sub_state_dict
from diffbir.models.controlnet import IRControlNet
from diffbir.models.text_encoder import OpenCLIPTextEncoder
from diffbir.models.unet import UNet
from diffbir.models.vae import AutoencoderKL
from diffbir.schema import SettingError, check_arguments, checked_call

SD_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.model.",
}

# Keys of the official configs that do not change the computation, with the only value we support.
_FIXED_UNET_KEYS = {
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "legacy": False,
    "num_heads": -1,
}
_IGNORED_UNET_KEYS = {"image_size", "use_checkpoint", "use_fp16", "dropout"}


def unet_kwargs(cfg: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Official UNet/ControlNet config -> our constructor kwargs (checking unsupported options)."""
    kwargs = dict(cfg)
    for key, value in _FIXED_UNET_KEYS.items():
        if key in kwargs and kwargs.pop(key) != value:
            raise ValueError(f"{section}.{key}: only {value!r} is supported (SD 2.x architecture)")
    for key in _IGNORED_UNET_KEYS:
        kwargs.pop(key, None)
    return kwargs


def _vae_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    dd = dict(cfg["ddconfig"])
    if dd.get("attn_resolutions"):
        raise ValueError("vae_cfg.ddconfig.attn_resolutions: only [] is supported (SD VAE)")
    if not dd.get("double_z", True):
        raise ValueError("vae_cfg.ddconfig.double_z: only true is supported (KL autoencoder)")
    return {
        "embed_dim": cfg["embed_dim"],
        "ch": dd["ch"],
        "ch_mult": dd["ch_mult"],
        "num_res_blocks": dd["num_res_blocks"],
        "in_channels": dd["in_channels"],
        "out_ch": dd["out_ch"],
        "z_channels": dd["z_channels"],
    }


def _clip_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    text = cfg["text_cfg"]
    layer = cfg.get("layer", "penultimate")
    if layer not in ("penultimate", "last"):
        raise ValueError(f"clip_cfg.layer: expected 'penultimate' or 'last', got {layer!r}")
    return {
        "width": text["width"],
        "layers": text["layers"],
        "heads": text["heads"],
        "context_length": text.get("context_length", 77),
        "vocab_size": text.get("vocab_size", 49408),
        "embed_dim": cfg["embed_dim"],
        "skip_last_layers": 1 if layer == "penultimate" else 0,
    }


class ControlLDM(nn.Module):
    """Noise prediction ``eps(z_t, t, cond)`` of SD 2.1 + IRControlNet, and the VAE/text helpers.

    ``cond`` is the output of :meth:`prepare_condition` (or :meth:`condition`):
    ``{"text": (B,77,C), "latent": c_img}``. Subclasses swap the condition network through
    :attr:`controlnet_class` (built from ``controlnet_cfg``) and the way its controls enter the
    UNet through :meth:`apply_controls`.
    """

    controlnet_class: type[IRControlNet] = IRControlNet

    def __init__(
        self,
        unet_cfg: Mapping[str, Any],
        controlnet_cfg: Mapping[str, Any],
        vae_cfg: Mapping[str, Any],
        clip_cfg: Mapping[str, Any],
        latent_scale_factor: float = 0.18215,
    ):
        super().__init__()
        params = {"unet_cfg": unet_cfg, "controlnet_cfg": controlnet_cfg, "vae_cfg": vae_cfg,
                  "clip_cfg": clip_cfg}  # fmt: skip
        parts = {
            section: checked_call(part, kwargs, f"params.{section}")
            for section, (part, kwargs) in self.part_arguments(params).items()
        }
        self.unet = parts["unet_cfg"]
        self.controlnet = parts["controlnet_cfg"]
        self.vae = parts["vae_cfg"]
        self.text_encoder = parts["clip_cfg"]
        self.latent_scale_factor = float(latent_scale_factor)

    @classmethod
    def controlnet_arguments(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments of :attr:`controlnet_class` in a config's ``params``."""
        return unet_kwargs(params["controlnet_cfg"], "controlnet_cfg")

    @classmethod
    def part_arguments(cls, params: Mapping[str, Any]) -> dict[str, tuple[type, dict[str, Any]]]:
        """``{config section: (network class, its constructor arguments)}`` of a config's
        ``params`` (the official sub-configs mapped to our constructors)."""
        return {
            "unet_cfg": (UNet, unet_kwargs(params["unet_cfg"], "unet_cfg")),
            "controlnet_cfg": (cls.controlnet_class, cls.controlnet_arguments(params)),
            "vae_cfg": (AutoencoderKL, _vae_kwargs(params["vae_cfg"])),
            "clip_cfg": (OpenCLIPTextEncoder, _clip_kwargs(params["clip_cfg"])),
        }

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Unknown keys and wrong types anywhere in a config's ``params``, sub-configs included,
        without building anything (:class:`~diffbir.schema.SettingError` names the key)."""
        check_arguments(cls, params, "params")
        try:
            parts = cls.part_arguments(params)
        except KeyError as err:
            raise SettingError(f"params: missing section {err}") from err
        for section, (part, kwargs) in parts.items():
            check_arguments(part, kwargs, f"params.{section}")

    # ----- weights -----
    def load_sd_weights(
        self, sd: Mapping[str, Tensor], source: str, *, assign: bool = False
    ) -> None:
        """Load UNet, VAE and text encoder from an official SD 2.1 checkpoint's state dict.

        Other keys of the file (schedule buffers, ``model_ema.*``, ...) are ignored. ``assign``:
        the file's tensors become the parameters (see :func:`~diffbir.checkpoint.load_weights`).
        """
        for part, prefix in SD_PREFIXES.items():
            sub = sub_state_dict(sd, prefix)
            if not sub:
                raise ValueError(f"{source}: no '{prefix}*' keys; is this an SD 2.1 checkpoint?")
            load_weights(getattr(self, part), sub, f"{source} [{prefix}*]", assign=assign)

    def load_controlnet_weights(
        self, sd: Mapping[str, Tensor], source: str, *, assign: bool = False
    ) -> None:
        """Load IRControlNet from a flat state dict (the format of the official ``v2.pth``)."""
        load_weights(self.controlnet, sd, source, assign=assign)

    def init_controlnet_from_unet(self) -> None:
        """Initialise IRControlNet from the UNet encoder (paper §3.3)."""
        self.controlnet.init_from_unet(self.unet)

    def sd_state_dict(self) -> dict[str, Tensor]:
        """UNet, VAE and text encoder under the official SD checkpoint key names."""
        return {
            prefix + key: value
            for part, prefix in SD_PREFIXES.items()
            for key, value in getattr(self, part).state_dict().items()
        }

    def freeze_sd(self) -> None:
        """Put the SD parts in eval mode without gradients (IRControlNet stays trainable)."""
        for part in SD_PREFIXES:
            getattr(self, part).eval().requires_grad_(False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute UNet and IRControlNet block activations in the backward pass."""
        self.unet.gradient_checkpointing = enabled
        self.controlnet.gradient_checkpointing = enabled

    # ----- conditions -----
    def encode_text(self, prompts: list[str]) -> Tensor:
        """Prompts -> text context (B, 77, C) in the UNet's dtype (the text encoder may run in
        another), so that the sampling steps use it as it is."""
        return self.text_encoder(list(prompts)).to(self.unet.time_embed[0].weight.dtype)

    def vae_encode(
        self, image: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image in [-1, 1] -> scaled latent (posterior mode, or a sample when ``sample``)."""
        moments = self.vae.encode(image.to(self.vae.quant_conv.weight.dtype))
        return self.vae.posterior(moments, sample, generator) * self.latent_scale_factor

    def vae_decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in about [-1, 1]."""
        return self.vae.decode(
            z.to(self.vae.post_quant_conv.weight.dtype) / self.latent_scale_factor
        )

    @property
    def hint_key(self) -> str:
        """The condition entry the condition network reads ("latent": c_img)."""
        return "latent"

    def condition(
        self, text: Tensor, image: Tensor, latent: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The condition dict from a text context, the condition image (B, 3, H, W) in [0, 1]
        and its scaled latent (encoded here when None): ``{"text", "latent"}``."""
        if latent is None:
            latent = self.vae_encode(image * 2 - 1)
        return {"text": text, "latent": latent}

    def prepare_condition(self, image: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """:meth:`condition` for ``prompts`` and the stage-1 output ``image`` (B, 3, H, W) in
        [0, 1], H and W multiples of 8."""
        if len(prompts) != image.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for a batch of {image.shape[0]} images")
        return self.condition(self.encode_text(prompts), image)

    # ----- noise prediction -----
    def apply_controls(
        self, x_t: Tensor, t: Tensor, context: Tensor, controls: list[Tensor]
    ) -> Tensor:
        """The frozen UNet's prediction with the controls added to its skip features."""
        return self.unet(x_t, t, context, controls)

    def forward(
        self, x_t: Tensor, t: Tensor, cond: Mapping[str, Tensor], control_strength: float = 1.0
    ) -> Tensor:
        key = self.hint_key
        if key not in cond:
            raise ValueError(
                f"{type(self).__name__} reads cond[{key!r}] (see condition()), got keys "
                f"{sorted(cond)}"
            )
        context = cond["text"].to(x_t.dtype)
        controls = self.controlnet(x_t, cond[key], t, context)
        if control_strength != 1.0:
            controls = [c * control_strength for c in controls]
        return self.apply_controls(x_t, t, context, controls)
