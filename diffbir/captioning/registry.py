"""Captioner names and :func:`build_captioner`, the one entry point the runner calls."""

from __future__ import annotations

import os

import torch

from diffbir.captioning.base import (
    Captioner,
    CaptionerError,
    CaptionerUnavailableError,
    NoCaptioner,
)
from diffbir.captioning.hub import HubModel


def _hub_models() -> dict[str, HubModel]:
    from diffbir.captioning.clip_tags import CLIP_TAGS
    from diffbir.captioning.llava import LLAVA

    return {"llava": LLAVA, "clip-tags": CLIP_TAGS}


RAM_UNAVAILABLE = (
    "captioner ram: Recognize Anything Plus (ram_plus_swin_large_14m.pth) is not provided: its "
    "code is not published on PyPI (only as a GitHub repository, not installable here) and pins "
    "transformers 4.25.1, timm 0.4.12 and fairscale 0.4.4, which conflict with this package's "
    "dependencies; rebuilding its Swin-L and tagging head ourselves could not be checked against "
    "the official outputs. Use `clip-tags` (an open_clip zero-shot tagger over a fixed "
    "vocabulary, a different model with different tags) or `llava` (the official default)."
)

CAPTIONER_NAMES = ("none", "llava", "ram", "clip-tags")
OFFICIAL_CAPTIONER = "llava"
AUTO_PRECISION = "auto"


def resolve_precision(name: str, precision: str, device: str | torch.device) -> str:
    """``precision`` with ``auto`` replaced: for ``llava`` on CUDA the official 4bit, else
    fp32 (bitsandbytes' 4/8-bit needs CUDA; half precision is slow on most CPUs)."""
    if precision != AUTO_PRECISION:
        return precision
    if name == "llava" and torch.device(device).type == "cuda":
        from diffbir.captioning.llava import OFFICIAL_PRECISION

        return OFFICIAL_PRECISION
    return "fp32"


def hub_model(name: str) -> HubModel:
    """The model files of captioner ``name`` (``llava``, ``clip-tags``)."""
    models = _hub_models()
    if name not in models:
        raise CaptionerError(
            f"captioner {name!r} has no model files to fetch; expected one of {sorted(models)}"
        )
    return models[name]


def _model(name: str, model: str | os.PathLike | None) -> str | os.PathLike:
    return model if model is not None else hub_model(name).repo_id


def _check_name(name: str) -> None:
    if name == "ram":
        raise CaptionerUnavailableError(RAM_UNAVAILABLE)
    if name not in CAPTIONER_NAMES:
        raise CaptionerError(
            f"captioner: expected one of {', '.join(CAPTIONER_NAMES)}, got {name!r}"
        )


def _check_clip_tags_precision(precision: str) -> None:
    if precision != "fp32":
        raise CaptionerError(f"--captioner-precision: clip-tags runs in fp32, got {precision!r}")


def check_captioner(
    name: str,
    *,
    model: str | os.PathLike | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """What :func:`build_captioner` would refuse, checked without loading a model (name,
    precision on ``device``, packages, every model file), so that a run can fail before it
    writes anything."""
    _check_name(name)
    precision = resolve_precision(name, precision, device)
    if name == "llava":
        from diffbir.captioning.llava import check_llava

        check_llava(
            _model(name, model), precision=precision, device=torch.device(device),
            cache_dir=cache_dir,
        )  # fmt: skip
    elif name == "clip-tags":
        from diffbir.captioning.clip_tags import check_clip_tags

        _check_clip_tags_precision(precision)
        check_clip_tags(_model(name, model), cache_dir=cache_dir)


def build_captioner(
    name: str,
    *,
    model: str | os.PathLike | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> Captioner:
    """The captioner ``name`` ready to caption (use it in a ``with`` block, or call ``close``).

    ``model``: a folder holding the model, or a Hub repository id looked up in the Hub cache
    (``cache_dir``, default the Hub's usual cache); default: the official model's repository.
    Nothing is downloaded (``diffbir-download --captioner NAME`` does that). ``precision``:
    4bit, 8bit (CUDA only), fp16, bf16 or fp32 (``llava``), or ``auto``
    (:func:`resolve_precision`); ``clip-tags`` runs in fp32.
    """
    _check_name(name)
    precision = resolve_precision(name, precision, device)
    if name == "llava":
        from diffbir.captioning.llava import LlavaCaptioner

        return LlavaCaptioner(
            _model(name, model),
            precision=precision,
            device=device,
            batch_size=batch_size,
            cache_dir=cache_dir,
        )
    if name == "clip-tags":
        from diffbir.captioning.clip_tags import ClipTagger

        _check_clip_tags_precision(precision)
        return ClipTagger(
            _model(name, model), device=device, batch_size=batch_size, cache_dir=cache_dir
        )
    return NoCaptioner(batch_size)
