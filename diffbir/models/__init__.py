"""Networks of DiffBIR, built by registry name (see :func:`diffbir.config.build_model`)."""

from __future__ import annotations

import importlib

from torch import nn

# registry name -> "module:Class"; imported on first use so that building one model does not
# import every other one.
MODEL_REGISTRY: dict[str, str] = {
    "unet": "diffbir.models.unet:UNet",
    "ircontrolnet": "diffbir.models.controlnet:IRControlNet",
    "autoencoder_kl": "diffbir.models.vae:AutoencoderKL",
    "openclip_text": "diffbir.models.text_encoder:OpenCLIPTextEncoder",
    "control_ldm": "diffbir.models.control_ldm:ControlLDM",
    "swinir": "diffbir.models.swinir:SwinIR",
    "bsrnet": "diffbir.models.bsrnet:RRDBNet",
    "scunet": "diffbir.models.scunet:SCUNet",
    "control_ldm_ablation": "diffbir.models.ablation:AblationControlLDM",
}


def model_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``."""
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model name {name!r}; expected one of {sorted(MODEL_REGISTRY)}")
    module_name, class_name = MODEL_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
