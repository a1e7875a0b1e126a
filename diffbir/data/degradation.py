"""Synthetic degradations: the paper's first-order model (Eq. 9) here, Real-ESRGAN's
second-order one in :mod:`.realesrgan`; their operations in :mod:`.operations`.

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
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from diffbir.data.operations import (
    INTERPOLATIONS,
    add_gaussian_noise,
    apply_kernel,
    check_image,
    check_range,
    from_mapping,
    gaussian_kernel,
    jpeg_compress,
    kernel_grid,
    resize,
    uniform,
)
from diffbir.data.realesrgan import RealESRGANDegradation

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
        kernel_grid(self.kernel_size)
        bad = [t for t in self.kernel_types if t not in ("iso", "aniso")]
        if bad or not self.kernel_types:
            raise ValueError(
                f"kernel_types must be a non-empty subset of ['iso', 'aniso'], got {bad}"
            )
        if len(self.kernel_probs) != len(self.kernel_types) or sum(self.kernel_probs) <= 0:
            raise ValueError("kernel_probs must have one positive weight per entry of kernel_types")
        check_range("sigma_range", self.sigma_range, 1e-6)
        check_range("rotation_range", self.rotation_range, -math.inf)
        check_range("downsample_range", self.downsample_range, 1.0)
        check_range("noise_range", self.noise_range, 0.0)
        check_range("jpeg_range", self.jpeg_range, 0, 100)
        for name in [*self.downsample_interpolations, self.upsample_interpolation]:
            if name not in INTERPOLATIONS:
                raise ValueError(f"interpolation {name!r} not in {sorted(INTERPOLATIONS)}")

    @classmethod
    def from_config(cls, cfg: Mapping | object | None) -> FirstOrderDegradation:
        """Build from a dict / OmegaConf node with the field names above."""
        return from_mapping(cls, cfg)

    def sample_params(self, rng: np.random.Generator) -> FirstOrderParams:
        probs = np.asarray(self.kernel_probs, dtype=np.float64)
        kernel_type = self.kernel_types[int(rng.choice(len(probs), p=probs / probs.sum()))]
        sigma_x = uniform(rng, self.sigma_range)
        if kernel_type == "iso":
            sigma_y, rotation = sigma_x, 0.0
        else:
            sigma_y = uniform(rng, self.sigma_range)
            rotation = uniform(rng, self.rotation_range)
        downsample = uniform(rng, self.downsample_range)
        interp = self.downsample_interpolations[
            int(rng.integers(len(self.downsample_interpolations)))
        ]
        noise_sigma = uniform(rng, self.noise_range)
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
        img = resize(
            img,
            round(width / params.downsample),
            round(height / params.downsample),
            params.downsample_interpolation,
        )
        img = add_gaussian_noise(img, params.noise_sigma, rng)
        img = jpeg_compress(np.clip(img, 0.0, 1.0), params.jpeg_quality)
        img = resize(img, width, height, self.upsample_interpolation)
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    def degrade(self, hq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """HWC RGB float32 [0, 1] -> LQ of the same size."""
        check_image(hq)
        return self.apply(hq, self.sample_params(rng), rng)

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
