"""Captioners: a text per input image, which becomes (part of) its positive prompt.

``build_captioner(name, ...)`` gives a :class:`Captioner`; ``caption(images)`` or
``caption_stream(images)`` return one text per image; ``close()`` (or a ``with`` block) frees
the model. :func:`join_prompt` joins a caption and the user's positive prompt as the official
run does. Names: ``none``, ``llava`` (the official default), ``ram`` (not provided: a clear
error) and ``clip-tags`` (ours). Model files come from a folder or the Hugging Face cache;
``diffbir-download --captioner NAME`` fetches them.
"""

from diffbir.captioning.base import (
    Captioner,
    CaptionerError,
    CaptionerUnavailableError,
    MissingCaptionerFilesError,
    NoCaptioner,
    join_prompt,
)
from diffbir.captioning.registry import (
    CAPTIONER_NAMES,
    OFFICIAL_CAPTIONER,
    RAM_UNAVAILABLE,
    build_captioner,
    check_captioner,
    hub_model,
    resolve_precision,
)

__all__ = [
    "CAPTIONER_NAMES",
    "OFFICIAL_CAPTIONER",
    "RAM_UNAVAILABLE",
    "Captioner",
    "CaptionerError",
    "CaptionerUnavailableError",
    "MissingCaptionerFilesError",
    "NoCaptioner",
    "build_captioner",
    "check_captioner",
    "hub_model",
    "join_prompt",
    "resolve_precision",
]
