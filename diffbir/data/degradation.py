"""Synthetic degradations: the paper's first-order model (Eq. 9) and Real-ESRGAN's second-order one.

Images are float32 HWC RGB arrays in [0, 1]; every random draw comes from the
`np.random.Generator` passed in, so a seed reproduces the output exactly.

`FirstOrderDegradation` config fields (all optional; build with `FirstOrderDegradation.from_config`
from a dict or an OmegaConf node):

- `kernel_size` (int, 41): Gaussian kernel size (odd).
- `kernel_types` (list[str], ["iso", "aniso"]) and `kernel_probs` (list[float], [0.5, 0.5]).
- `sigma_range` ([0.1, 12]): blur sigma (each axis for anisotropic kernels).
- `rotation_range` ([-pi, pi]): rotation of anisotropic kernels, radians.
- `downsample_range` ([1, 12]): downsampling factor r.
- `downsample_interpolations` (["area", "linear", "cubic"]): one is drawn uniformly.
- `noise_range` ([0, 15]): Gaussian noise std delta on the 0-255 scale.
- `jpeg_range` ([30, 100]): JPEG quality q (integer, both ends included).
- `upsample_interpolation` ("linear"): interpolation used to resize back to the HQ size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

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


def _grid(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
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
    xx, yy = _grid(kernel_size)
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

    xx, yy = _grid(kernel_size)
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


def _resize(img: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    out = cv2.resize(
        img, (max(1, width), max(1, height)), interpolation=INTERPOLATIONS[interpolation]
    )
    return out.reshape(out.shape[0], out.shape[1], -1)


def _uniform(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    low, high = float(bounds[0]), float(bounds[1])
    return low if high <= low else float(rng.uniform(low, high))


def _check_range(name: str, bounds: Sequence[float], low: float, high: float | None = None) -> None:
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


def _from_mapping(cls, cfg):
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


# ---------------------------------------------------------------------------------------------
# First-order degradation (paper Eq. 9)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstOrderParams:
    """One draw of the first-order degradation parameters."""

    kernel_type: str
    sigma_x: float
    sigma_y: float
    rotation: float
    downsample: float
    downsample_interpolation: str
    noise_sigma: float  # 0-255 scale
    jpeg_quality: int


@dataclass
class FirstOrderDegradation:
    """I_lq = {[(I_hq * k_sigma) down_r + n_delta]_JPEG_q} up_r  (paper Eq. 9)."""

    kernel_size: int = 41
    kernel_types: list[str] = field(default_factory=lambda: ["iso", "aniso"])
    kernel_probs: list[float] = field(default_factory=lambda: [0.5, 0.5])
    sigma_range: list[float] = field(default_factory=lambda: [0.1, 12.0])
    rotation_range: list[float] = field(default_factory=lambda: [-math.pi, math.pi])
    downsample_range: list[float] = field(default_factory=lambda: [1.0, 12.0])
    downsample_interpolations: list[str] = field(
        default_factory=lambda: ["area", "linear", "cubic"]
    )
    noise_range: list[float] = field(default_factory=lambda: [0.0, 15.0])
    jpeg_range: list[int] = field(default_factory=lambda: [30, 100])
    upsample_interpolation: str = "linear"

    def __post_init__(self) -> None:
        _grid(self.kernel_size)
        bad = [t for t in self.kernel_types if t not in ("iso", "aniso")]
        if bad or not self.kernel_types:
            raise ValueError(
                f"kernel_types must be a non-empty subset of ['iso', 'aniso'], got {bad}"
            )
        if len(self.kernel_probs) != len(self.kernel_types) or sum(self.kernel_probs) <= 0:
            raise ValueError("kernel_probs must have one positive weight per entry of kernel_types")
        _check_range("sigma_range", self.sigma_range, 1e-6)
        _check_range("rotation_range", self.rotation_range, -math.inf)
        _check_range("downsample_range", self.downsample_range, 1.0)
        _check_range("noise_range", self.noise_range, 0.0)
        _check_range("jpeg_range", self.jpeg_range, 0, 100)
        for name in [*self.downsample_interpolations, self.upsample_interpolation]:
            if name not in INTERPOLATIONS:
                raise ValueError(f"interpolation {name!r} not in {sorted(INTERPOLATIONS)}")

    @classmethod
    def from_config(cls, cfg: Mapping | object | None) -> FirstOrderDegradation:
        """Build from a dict / OmegaConf node with the field names above."""
        return _from_mapping(cls, cfg)

    def sample_params(self, rng: np.random.Generator) -> FirstOrderParams:
        probs = np.asarray(self.kernel_probs, dtype=np.float64)
        kernel_type = self.kernel_types[int(rng.choice(len(probs), p=probs / probs.sum()))]
        sigma_x = _uniform(rng, self.sigma_range)
        if kernel_type == "iso":
            sigma_y, rotation = sigma_x, 0.0
        else:
            sigma_y = _uniform(rng, self.sigma_range)
            rotation = _uniform(rng, self.rotation_range)
        downsample = _uniform(rng, self.downsample_range)
        interp = self.downsample_interpolations[
            int(rng.integers(len(self.downsample_interpolations)))
        ]
        noise_sigma = _uniform(rng, self.noise_range)
        quality = int(rng.integers(int(self.jpeg_range[0]), int(self.jpeg_range[1]) + 1))
        return FirstOrderParams(
            kernel_type, sigma_x, sigma_y, rotation, downsample, interp, noise_sigma, quality
        )

    def apply(
        self, hq: np.ndarray, params: FirstOrderParams, rng: np.random.Generator
    ) -> np.ndarray:
        """Degrade `hq` with fixed parameters (`rng` draws the noise only)."""
        height, width = hq.shape[:2]
        kernel = gaussian_kernel(self.kernel_size, params.sigma_x, params.sigma_y, params.rotation)
        img = apply_kernel(hq.astype(np.float32), kernel)
        img = _resize(
            img,
            round(width / params.downsample),
            round(height / params.downsample),
            params.downsample_interpolation,
        )
        img = add_gaussian_noise(img, params.noise_sigma, rng)
        img = jpeg_compress(np.clip(img, 0.0, 1.0), params.jpeg_quality)
        img = _resize(img, width, height, self.upsample_interpolation)
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    def degrade(self, hq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """HWC RGB float32 [0, 1] -> LQ of the same size."""
        _check_image(hq)
        return self.apply(hq, self.sample_params(rng), rng)

    __call__ = degrade


def _check_image(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {img.shape}")


# ---------------------------------------------------------------------------------------------
# Real-ESRGAN second-order degradation (benchmark LQ synthesis)
# ---------------------------------------------------------------------------------------------

# Real-ESRGAN's published default degradation settings (facts from its training options):
REALESRGAN_KERNEL_TYPES = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
REALESRGAN_KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
REALESRGAN_KERNEL_SIZES = tuple(range(7, 22, 2))  # odd sizes 7..21


@dataclass
class RealESRGANDegradation:
    """Second-order degradation; defaults are Real-ESRGAN's published x4 settings."""

    scale: int = 4
    kernel_probs: list[float] = field(default_factory=lambda: list(REALESRGAN_KERNEL_PROBS))
    betag_range: list[float] = field(default_factory=lambda: [0.5, 4.0])
    betap_range: list[float] = field(default_factory=lambda: [1.0, 2.0])
    # first round
    sinc_prob: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.2, 3.0])
    resize_prob: list[float] = field(default_factory=lambda: [0.2, 0.7, 0.1])  # up, down, keep
    resize_range: list[float] = field(default_factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = 0.5
    noise_range: list[float] = field(default_factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = field(default_factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = 0.4
    jpeg_range: list[int] = field(default_factory=lambda: [30, 95])
    # second round
    second_blur_prob: float = 0.8
    sinc_prob2: float = 0.1
    blur_sigma2: list[float] = field(default_factory=lambda: [0.2, 1.5])
    resize_prob2: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: list[float] = field(default_factory=lambda: [0.3, 1.2])
    gaussian_noise_prob2: float = 0.5
    noise_range2: list[float] = field(default_factory=lambda: [1.0, 25.0])
    poisson_scale_range2: list[float] = field(default_factory=lambda: [0.05, 2.5])
    gray_noise_prob2: float = 0.4
    jpeg_range2: list[int] = field(default_factory=lambda: [30, 95])
    # final
    final_sinc_prob: float = 0.8

    @classmethod
    def from_config(cls, cfg: Mapping | object | None) -> RealESRGANDegradation:
        return _from_mapping(cls, cfg)

    def _random_kernel(
        self, rng: np.random.Generator, sigma: Sequence[float], sinc_prob: float
    ) -> np.ndarray:
        size = int(rng.choice(REALESRGAN_KERNEL_SIZES))
        if rng.uniform() < sinc_prob:
            low = math.pi / 3 if size < 13 else math.pi / 5
            return sinc_kernel(size, _uniform(rng, [low, math.pi]))
        probs = np.asarray(self.kernel_probs, dtype=np.float64)
        kind = REALESRGAN_KERNEL_TYPES[int(rng.choice(len(probs), p=probs / probs.sum()))]
        sigma_x = _uniform(rng, sigma)
        if kind.endswith("iso") and not kind.endswith("aniso"):
            sigma_y, rotation = sigma_x, 0.0
        else:
            sigma_y, rotation = _uniform(rng, sigma), _uniform(rng, [-math.pi, math.pi])
        if kind.startswith("generalized"):
            return generalized_gaussian_kernel(
                size, sigma_x, sigma_y, rotation, _uniform(rng, self.betag_range)
            )
        if kind.startswith("plateau"):
            return plateau_kernel(size, sigma_x, sigma_y, rotation, _uniform(rng, self.betap_range))
        return gaussian_kernel(size, sigma_x, sigma_y, rotation)

    @staticmethod
    def _add_noise(
        img: np.ndarray,
        rng: np.random.Generator,
        gaussian_prob: float,
        sigma_range: Sequence[float],
        poisson_range: Sequence[float],
        gray_prob: float,
    ) -> np.ndarray:
        gray = rng.uniform() < gray_prob
        if rng.uniform() < gaussian_prob:
            sigma = _uniform(rng, sigma_range) / 255.0
            shape = (*img.shape[:2], 1) if gray else img.shape
            noise = rng.standard_normal(shape).astype(np.float32) * sigma
        else:
            scale = _uniform(rng, poisson_range)
            src = img.mean(axis=2, keepdims=True) if gray else img
            src = np.clip(src, 0.0, 1.0)
            levels = len(np.unique((src * 255.0).round()))
            vals = 2.0 ** math.ceil(math.log2(max(levels, 2)))
            noise = (rng.poisson(src * vals) / vals - src).astype(np.float32) * scale
        return np.clip(img + noise, 0.0, 1.0)

    def _random_resize(
        self,
        img: np.ndarray,
        rng: np.random.Generator,
        probs: Sequence[float],
        scale_range: Sequence[float],
    ) -> np.ndarray:
        mode = int(rng.choice(3, p=np.asarray(probs) / np.sum(probs)))
        if mode == 0:
            factor = _uniform(rng, [1.0, scale_range[1]])
        elif mode == 1:
            factor = _uniform(rng, [scale_range[0], 1.0])
        else:
            factor = 1.0
        interp = ("area", "linear", "cubic")[int(rng.integers(3))]
        height, width = img.shape[:2]
        return _resize(img, int(width * factor), int(height * factor), interp)

    def degrade(self, hq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """HWC RGB float32 [0, 1] (H, W divisible by `scale`) -> LQ of size (H/scale, W/scale)."""
        _check_image(hq)
        height, width = hq.shape[:2]
        if height % self.scale or width % self.scale:
            raise ValueError(f"image size {width}x{height} is not divisible by scale {self.scale}")
        img = apply_kernel(
            hq.astype(np.float32), self._random_kernel(rng, self.blur_sigma, self.sinc_prob)
        )
        img = self._random_resize(img, rng, self.resize_prob, self.resize_range)
        img = self._add_noise(
            img,
            rng,
            self.gaussian_noise_prob,
            self.noise_range,
            self.poisson_scale_range,
            self.gray_noise_prob,
        )
        img = jpeg_compress(img, int(rng.integers(self.jpeg_range[0], self.jpeg_range[1] + 1)))

        if rng.uniform() < self.second_blur_prob:
            img = apply_kernel(img, self._random_kernel(rng, self.blur_sigma2, self.sinc_prob2))
        mode = int(rng.choice(3, p=np.asarray(self.resize_prob2) / np.sum(self.resize_prob2)))
        factor = (
            _uniform(rng, [1.0, self.resize_range2[1]])
            if mode == 0
            else _uniform(rng, [self.resize_range2[0], 1.0])
            if mode == 1
            else 1.0
        )
        interp = ("area", "linear", "cubic")[int(rng.integers(3))]
        img = _resize(
            img, int(width / self.scale * factor), int(height / self.scale * factor), interp
        )
        img = self._add_noise(
            img,
            rng,
            self.gaussian_noise_prob2,
            self.noise_range2,
            self.poisson_scale_range2,
            self.gray_noise_prob2,
        )

        out_w, out_h = width // self.scale, height // self.scale
        final_interp = ("area", "linear", "cubic")[int(rng.integers(3))]
        if rng.uniform() < self.final_sinc_prob:
            size = int(rng.choice(REALESRGAN_KERNEL_SIZES))
            final_kernel = sinc_kernel(size, _uniform(rng, [math.pi / 3, math.pi]))
        else:
            final_kernel = None
        quality = int(rng.integers(self.jpeg_range2[0], self.jpeg_range2[1] + 1))

        def resize_and_sinc(x: np.ndarray) -> np.ndarray:
            x = _resize(x, out_w, out_h, final_interp)
            return x if final_kernel is None else apply_kernel(x, final_kernel)

        if rng.uniform() < 0.5:  # resize + sinc, then JPEG
            img = jpeg_compress(resize_and_sinc(img), quality)
        else:  # JPEG, then resize + sinc
            img = resize_and_sinc(jpeg_compress(img, quality))
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    __call__ = degrade


DEGRADATIONS = {"first_order": FirstOrderDegradation, "realesrgan": RealESRGANDegradation}


def build_degradation(
    cfg: Mapping | object | None,
) -> FirstOrderDegradation | RealESRGANDegradation:
    """Build from a mapping whose optional ``type`` (default ``first_order``) picks the model
    in :data:`DEGRADATIONS`; the other keys are that model's fields."""
    if cfg is not None and not isinstance(cfg, Mapping):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg or {})
    kind = cfg.pop("type", "first_order")
    if kind not in DEGRADATIONS:
        raise ValueError(f"degradation type {kind!r} is not one of {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[kind].from_config(cfg)
