"""What every captioner shares: the interface, input checks, the prompt join and the errors.

A captioner turns images as read (H x W x 3 RGB) into one text each, in order. It holds a model
until :meth:`Captioner.close` (or the end of a ``with`` block), so that a run can caption a
whole folder first and free that memory before the restoration models load.
"""

from __future__ import annotations

import gc
import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import numpy as np
import torch
from tqdm import tqdm

from diffbir.weights import MissingWeightsError

CAPTION_EXTRA = "caption"


class CaptionerError(ValueError):
    """A captioner option that cannot work (name, precision, device, batch size, model path)."""


class CaptionerUnavailableError(RuntimeError):
    """A captioner that cannot be built here: a missing package, or a model we do not provide."""


class MissingCaptionerFilesError(MissingWeightsError):
    """A captioner's model files are not on this machine; the message says which, where they
    were looked for, and the command that fetches them."""


def join_prompt(caption: str, pos_prompt: str) -> str:
    """The positive prompt of an image as the official run builds it: the caption, then the
    user's positive prompt, joined by ``", "`` with empty parts dropped."""
    return ", ".join(t for t in (caption, pos_prompt) if t)


def require_packages(*modules: str, extra: str = CAPTION_EXTRA) -> None:
    """Import ``modules`` or raise :class:`CaptionerUnavailableError` naming the extra that
    installs them."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise CaptionerUnavailableError(
                f"captioning needs the Python package {module!r} ({err}); install it with "
                f"`pip install 'diffbir[{extra}]'`"
            ) from err


def as_rgb_uint8(image: np.ndarray, index: int) -> np.ndarray:
    """``image`` as an H x W x 3 uint8 array: uint8 is taken as is, float images in [0, 1]
    (as :func:`diffbir.pipeline.image_io.read_image` returns) are rounded to 8 bits, which gives
    back the file's values for 8-bit files. Anything else is a :class:`CaptionerError`."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise CaptionerError(f"image {index}: expected an H x W x 3 RGB array, got {shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise CaptionerError(f"image {index}: has no pixels (shape {image.shape})")
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise CaptionerError(f"image {index}: expected float values in [0, 1]")
        return np.round(image * 255).astype(np.uint8)
    raise CaptionerError(f"image {index}: expected uint8 or float in [0, 1], got {image.dtype}")


def _batches(items: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


class Captioner(ABC):
    """Captions images in batches of ``batch_size``; holds its model until :meth:`close`."""

    name: str = ""

    def __init__(self, batch_size: int = 1) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CaptionerError(
                f"--captioner-batch-size: expected an integer >= 1, got {batch_size!r}"
            )
        self.batch_size = batch_size
        self.closed = False

    @abstractmethod
    def _caption_batch(self, images: list[np.ndarray]) -> list[str]:
        """One caption per H x W x 3 uint8 image of one batch."""

    @abstractmethod
    def _release(self) -> None:
        """Drop the references to the model, so that its memory can be freed."""

    def caption_stream(
        self, images: Iterable[np.ndarray], *, total: int | None = None, progress: bool = False
    ) -> Iterator[str]:
        """Caption ``images`` lazily, in order: a caption is yielded as soon as its batch is
        done (a caller can record it at once), with a progress bar over images if asked."""
        if self.closed:
            raise RuntimeError(f"captioner {self.name}: used after close()")
        offset = 0
        with tqdm(
            total=total, unit="image", desc=f"caption ({self.name})", disable=not progress
        ) as bar:
            for batch in _batches(images, self.batch_size):
                checked = [as_rgb_uint8(im, offset + i) for i, im in enumerate(batch)]
                captions = self._caption_batch(checked)
                offset += len(batch)
                bar.update(len(batch))
                yield from captions

    def caption(self, images: Sequence[np.ndarray], *, progress: bool = False) -> list[str]:
        """One caption per image (H x W x 3 RGB, uint8 or float in [0, 1]), in order."""
        return list(self.caption_stream(images, total=len(images), progress=progress))

    def close(self) -> None:
        """Free the model's memory (CPU and GPU); the captioner cannot be used afterwards."""
        if self.closed:
            return
        self._release()
        self.closed = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoCaptioner(Captioner):
    """``none``: an empty caption for every image, so the positive prompt is used alone."""

    name = "none"

    def _caption_batch(self, images: list[np.ndarray]) -> list[str]:
        return ["" for _ in images]

    def _release(self) -> None:
        """Nothing is held."""
