"""The image operations synthetic degradations are made of: blur kernels (Gaussian,
generalised, plateau, sinc), resizing, Gaussian noise, JPEG, and the range and config helpers
of the degradation models.

Images are float32 HWC RGB arrays in [0, 1]; every random draw comes from the
`np.random.Generator` passed in, so a seed reproduces the output exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields

import cv2
import numpy as np

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def kernel_grid(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    half = kernel_size // 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    return np.meshgrid(ax, ax)


def _inverse_covariance(sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    cos, sin = math.cos(rotation), math.sin(rotation)
    rot = np.array([[cos, -sin], [sin, cos]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    return np.linalg.inv(cov)


def _quadratic_form(kernel_size: int, sigma_x: float, sigma_y: float, rotation: float):
    xx, yy = kernel_grid(kernel_size)
    inv = _inverse_covariance(sigma_x, sigma_y, rotation)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float | None = None, rotation: float = 0.0
) -> np.ndarray:
    """Normalised 2-D Gaussian kernel; isotropic when `sigma_y` is None."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    kernel = np.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, rotation))
    return (kernel / kernel.sum()).astype(np.float32)


def generalized_gaussian_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float
) -> np.ndarray:
    """exp(-0.5 * (x^T S^-1 x)^beta), normalised."""
    kernel = np.exp(-0.5 * np.power(_quadratic_form(kernel_size, sigma_x, sigma_y, rotation), beta))
    return (kernel / kernel.sum()).astype(np.float32)


def plateau_kernel(
    kernel_size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float
) -> np.ndarray:
    """1 / (1 + (x^T S^-1 x)^beta), normalised."""
    quad = _quadratic_form(kernel_size, sigma_x, sigma_y, rotation)
    kernel = 1.0 / (np.power(quad, beta) + 1.0)
    return (kernel / kernel.sum()).astype(np.float32)


def sinc_kernel(kernel_size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc / jinc) kernel with angular cutoff frequency `cutoff`."""
    from scipy.special import j1

    xx, yy = kernel_grid(kernel_size)
    radius = np.sqrt(xx * xx + yy * yy)
    safe = np.where(radius == 0, 1.0, radius)
    kernel = cutoff * j1(cutoff * safe) / (2 * np.pi * safe)
    kernel = np.where(radius == 0, cutoff**2 / (4 * np.pi), kernel)
    return (kernel / kernel.sum()).astype(np.float32)


def apply_kernel(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filter each channel with `kernel` (reflect borders)."""
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip an RGB [0, 1] image through cv2's JPEG codec at `quality`."""
    bgr = (np.clip(img, 0, 1) * 255.0).round().astype(np.uint8)[..., ::-1]
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for JPEG quality {quality}")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return decoded[..., ::-1].astype(np.float32) / 255.0


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise of std `sigma` on the 0-255 scale (no clipping)."""
    if sigma <= 0:
        return img
    return img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma / 255.0)


def resize(img: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    out = cv2.resize(
        img, (max(1, width), max(1, height)), interpolation=INTERPOLATIONS[interpolation]
    )
    return out.reshape(out.shape[0], out.shape[1], -1)


def uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    low, high = float(bounds[0]), float(bounds[1])
    return low if high <= low else float(rng.uniform(low, high))


def check_range(name: str, bounds: Sequence[float], low: float, high: float | None = None) -> None:
    if (
        len(bounds) != 2
        or bounds[0] > bounds[1]
        or bounds[0] < low
        or (high is not None and bounds[1] > high)
    ):
        upper = "" if high is None else f", <= {high}"
        raise ValueError(
            f"{name} must be [min, max] with min <= max, >= {low}{upper}; got {bounds}"
        )


def from_mapping(cls, cfg):
    """Build a dataclass from a dict or OmegaConf node; unknown keys raise ValueError."""
    if cfg is None:
        return cls()
    if not isinstance(cfg, Mapping):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(names)}"
        )
    return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()})


def check_image(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {img.shape}")


