"""Reading input images robustly, listing inputs, and writing results atomically."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from diffbir.files import atomic_path

# Formats read by this pipeline (via Pillow).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
# Image formats we recognise but do not read: reported as unsupported, not silently ignored.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {".gif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".exr", ".hdr", ".raw", ".dng", ".cr2",
     ".nef", ".arw", ".svg", ".ico", ".ppm", ".pgm", ".pbm", ".psd"}
)  # fmt: skip
_ORIENTATION = 0x0112  # EXIF tag


class ImageReadError(ValueError):
    """An input file that cannot be used; ``reason`` says why (for the run summary)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def list_inputs(path: str | os.PathLike, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """``(candidates, ignored)`` for an input file or folder, both sorted; together they hold
    every entry of the folder (of its subfolders too when ``recursive``).

    Candidates are entries with an image extension (readable, recognised-unsupported, or a
    broken symbolic link: reading them reports why); a single file given directly is always a
    candidate. Other files, hidden entries and (unless ``recursive``) subfolders are ignored.
    """
    path = Path(path)
    if path.is_file():
        return [path], []
    if path.exists() and not path.is_dir():
        raise ValueError(f"--input: expected an image file or a folder, got a special file {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"--input: no such file or folder: {path}")
    pattern = path.rglob("*") if recursive else path.glob("*")
    candidates, ignored = [], []
    for p in sorted(pattern):
        parts = p.relative_to(path).parts
        if any(part.startswith(".") for part in parts[:-1]):
            continue  # inside a hidden folder, which is counted itself
        if parts[-1].startswith("."):
            ignored.append(p)
        elif p.is_dir():
            if not recursive or p.is_symlink():  # rglob does not enter folder links
                ignored.append(p)
        else:
            ext = p.suffix.lower()
            known = ext in IMAGE_EXTENSIONS or ext in UNSUPPORTED_IMAGE_EXTENSIONS
            (candidates if known else ignored).append(p)
    return candidates, ignored


def _to_float_rgb(img: Image.Image) -> np.ndarray:
    """Pillow image -> float32 RGB HWC in [0, 1] (gray expanded, alpha dropped, 16-bit scaled)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


def _read_16bit_color(path: Path) -> np.ndarray | None:
    """16-bit colour PNG/TIFF at full precision (Pillow reads them as 8-bit); else ``None``."""
    if path.suffix.lower() not in (".png", ".tif", ".tiff"):
        return None
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.fromfile(path, dtype=np.uint8), flags)
    if img is None or img.dtype != np.uint16 or img.ndim != 3:
        return None
    return img[..., 2::-1].astype(np.float32) / np.float32(65535.0)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as float32 RGB (H, W, 3) in [0, 1], upright per its EXIF orientation.

    Gray is expanded to RGB, alpha is dropped, 16-bit images are scaled by 1/65535.

    Raises :class:`ImageReadError` with a short reason for empty, unsupported, unreadable or
    truncated files.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if path.is_symlink() and not path.exists():
        raise ImageReadError(path, f"broken symbolic link (to {os.readlink(path)})")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageReadError(path, f"unreadable ({err.strerror or err})") from err
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if ext in UNSUPPORTED_IMAGE_EXTENSIONS:
        raise ImageReadError(
            path, f"unsupported format {ext!r}; use one of {sorted(IMAGE_EXTENSIONS)}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                upright = img.getexif().get(_ORIENTATION, 1) == 1
                deep = _read_16bit_color(path) if upright and img.mode in ("RGB", "RGBA") else None
                arr = deep if deep is not None else _to_float_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError as err:
        raise ImageReadError(path, "not a recognised image (unsupported or corrupt data)") from err
    except (OSError, SyntaxError, ValueError) as err:
        reason = str(err)
        if "truncated" in reason.lower():
            raise ImageReadError(path, f"truncated file ({reason})") from err
        raise ImageReadError(path, f"unreadable or corrupt ({reason})") from err
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageReadError(path, f"too large ({err})") from err
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(path, f"has no pixels (size {arr.shape[1]}x{arr.shape[0]})")
    return np.ascontiguousarray(arr)


def to_tensor(img: np.ndarray) -> Tensor:
    """(H, W, 3) float array -> (1, 3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0).float()


def to_uint8(img: Tensor) -> np.ndarray:
    """(3, H, W) or (1, 3, H, W) tensor in [0, 1] -> (H, W, 3) uint8 array (rounded)."""
    if img.ndim == 4:
        img = img[0]
    arr = img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def _write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write(handle)`` atomically (see :mod:`diffbir.files`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)
    return path


def write_png(path: str | os.PathLike, img: Tensor | np.ndarray) -> Path:
    """Write an RGB image as PNG atomically: a temporary file in the same folder, then rename."""
    arr = to_uint8(img) if isinstance(img, Tensor) else img
    return _write_atomic(path, lambda handle: Image.fromarray(arr).save(handle, format="PNG"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically (as :func:`write_png`)."""
    return _write_atomic(path, lambda handle: handle.write(text.encode()))
