"""Sample photos shipped with scikit-image, degraded on the fly, for a first run without data."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

SAMPLE_NAMES = ("astronaut", "chelsea", "coffee")


def name_rng(name: str, seed: int = 0) -> np.random.Generator:
    """A generator seeded from ``seed`` and ``name`` (stable across runs and platforms)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def degrade(hq: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """A mild real-world-like degradation of float RGB in [0, 1]: blur, downscale by ``scale``,
    Gaussian noise and JPEG compression."""
    img = cv2.GaussianBlur(hq, (0, 0), sigmaX=float(rng.uniform(0.8, 1.6)))
    height, width = img.shape[:2]
    if scale > 1:
        size = (max(8, round(width / scale)), max(8, round(height / scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    img = img + rng.normal(0.0, float(rng.uniform(3, 10)) / 255.0, img.shape).astype(np.float32)
    img8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    quality = int(rng.integers(40, 70))
    ok, buf = cv2.imencode(".jpg", img8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding of a sample image failed")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255.0


def load_sample(name: str, scale: float, max_side: int | None = None) -> np.ndarray:
    """The scikit-image photo ``name`` (optionally shrunk to ``max_side``), degraded."""
    import skimage.data

    hq = getattr(skimage.data, name)()
    if hq.ndim == 2:
        hq = np.repeat(hq[..., None], 3, axis=2)
    hq = hq[..., :3].astype(np.float32) / 255.0
    if max_side and max(hq.shape[:2]) > max_side:
        factor = max_side / max(hq.shape[:2])
        size = (max(1, round(hq.shape[1] * factor)), max(1, round(hq.shape[0] * factor)))
        hq = cv2.resize(hq, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(degrade(hq, scale, name_rng(name)))
