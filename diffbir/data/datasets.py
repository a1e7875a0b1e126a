"""Training dataset: HQ crops with on-the-fly synthetic LQ.

Sources: a folder (searched recursively for image files) or a file list (one path per line,
relative paths resolved against the list's folder; an optional second tab-separated column is
the caption). Without a list caption, a sidecar `<stem>.txt` next to the image is used; else "".

Items: {"hq": (3, H, W) float32 tensor in [0, 1], "lq": (3, H, W) float32 in [0, 1],
"prompt": str}. Images with a side shorter than `out_size` are first resized up (bicubic) so
that the short side equals `out_size`, then cropped (random or center) and randomly flipped.
An LQ smaller than the crop (Real-ESRGAN's model degrades to HQ / scale) is resized back to the
crop size (bicubic).

Reproducibility: each item's generator is seeded from (seed, epoch, index), so results do not
depend on worker assignment or order; call `set_epoch(epoch)` before each epoch (and in every
DataLoader worker it reaches, since workers copy the dataset: with persistent workers re-create
the loader or pass the epoch through the sampler). DataLoader worker seeding does not matter.

An unreadable file is logged (warning with path and reason) and replaced by the next index
(index + 1, + 2, ... modulo length), deterministically. `skipped_files` counts such events in
this process only: with `num_workers > 0` each worker holds its own copy of the counter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from diffbir.data.degradation import FirstOrderDegradation, build_degradation
from diffbir.data.realesrgan import RealESRGANDegradation

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


def _read_image(path: str | Path) -> np.ndarray:
    """Read an image as float32 RGB HWC in [0, 1] (8/16-bit, gray->RGB, alpha dropped, EXIF)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:  # cv2.imdecode raises its own error type on empty data
        raise ValueError(f"empty image file {path}")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if img is None:
        raise ValueError(f"cannot decode image {path}")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
    return np.ascontiguousarray(img[..., ::-1], dtype=np.float32) / np.float32(scale)


def _list_folder(folder: Path) -> list[tuple[Path, str | None]]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    return [(p, None) for p in files]


def _read_file_list(list_path: Path) -> list[tuple[Path, str | None]]:
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read file list {list_path}: {err}") from err
    entries: list[tuple[Path, str | None]] = []
    for line in lines:
        if not line.strip():
            continue
        path_text, sep, caption = line.partition("\t")
        path = Path(path_text.strip())
        if not path.is_absolute():
            path = list_path.parent / path
        entries.append((path, caption.strip() if sep else None))
    return entries


class PairedDegradationDataset(Dataset):
    """HQ crops from a folder or file list with LQ from `degradation` (see module docstring)."""

    def __init__(
        self,
        source: str | Path,
        *,
        out_size: int = 512,
        crop: str = "random",
        flip: bool = True,
        degradation: FirstOrderDegradation | RealESRGANDegradation | Callable | dict | None = None,
        prompt_dropout: float = 0.0,
        use_captions: bool = True,
        seed: int = 0,
    ) -> None:
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"dataset source {source} does not exist (file list or folder)")
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        self.entries = _list_folder(source) if source.is_dir() else _read_file_list(source)
        if not self.entries:
            raise ValueError(f"empty dataset: no images found in {source}")
        if degradation is None or isinstance(degradation, dict) or hasattr(degradation, "keys"):
            degradation = build_degradation(degradation)
        self.degradation = degradation
        self.out_size = int(out_size)
        self.crop = crop
        self.flip = flip
        self.prompt_dropout = float(prompt_dropout)
        self.use_captions = use_captions
        self.seed = int(seed)
        self.epoch = 0
        self._skipped = 0

    @property
    def skipped_files(self) -> int:
        """Number of unreadable files replaced so far (in this process)."""
        return self._skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def _caption(self, path: Path, list_caption: str | None) -> str:
        if not self.use_captions:
            return ""
        if list_caption is not None:
            return list_caption
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
        return ""

    def _crop(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = self.out_size
        height, width = img.shape[:2]
        if min(height, width) < size:
            factor = size / min(height, width)
            new_w, new_h = max(size, round(width * factor)), max(size, round(height * factor))
            img = np.clip(cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC), 0, 1)
            height, width = img.shape[:2]
        if self.crop == "random":
            top = int(rng.integers(height - size + 1))
            left = int(rng.integers(width - size + 1))
        else:
            top, left = (height - size) // 2, (width - size) // 2
        return img[top : top + size, left : left + size]

    def _load(self, index: int) -> tuple[np.ndarray, str]:
        path, list_caption = self.entries[index]
        return _read_image(path), self._caption(path, list_caption)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        for attempt in range(len(self)):
            current = (int(index) + attempt) % len(self)
            try:
                hq, prompt = self._load(current)
                break
            except (OSError, ValueError) as err:
                self._skipped += 1
                logger.warning("skipping unreadable image %s: %s", self.entries[current][0], err)
        else:
            raise RuntimeError(f"no readable image in the dataset of {len(self)} files")
        hq = self._crop(hq, rng)
        if self.flip and rng.uniform() < 0.5:
            hq = hq[:, ::-1]
        hq = np.ascontiguousarray(hq, dtype=np.float32)
        lq = self.degradation.degrade(hq, rng)
        if lq.shape != hq.shape:
            lq = cv2.resize(lq, (self.out_size, self.out_size), interpolation=cv2.INTER_CUBIC)
            lq = np.clip(lq, 0.0, 1.0)
        if self.prompt_dropout > 0 and rng.uniform() < self.prompt_dropout:
            prompt = ""
        return {
            "hq": torch.from_numpy(hq.transpose(2, 0, 1).copy()),
            "lq": torch.from_numpy(np.ascontiguousarray(lq.transpose(2, 0, 1))),
            "prompt": prompt,
        }
