"""Real-ESRGAN's second-order degradation (benchmark LQ synthesis and the Table 8 training),
with its published default settings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from diffbir.data.operations import (
    apply_kernel,
    check_image,
    from_mapping,
    gaussian_kernel,
    generalized_gaussian_kernel,
    jpeg_compress,
    plateau_kernel,
    resize,
    sinc_kernel,
    uniform,
)

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
        return from_mapping(cls, cfg)

    def _random_kernel(
        self, rng: np.random.Generator, sigma: Sequence[float], sinc_prob: float
    ) -> np.ndarray:
        size = int(rng.choice(REALESRGAN_KERNEL_SIZES))
        if rng.uniform() < sinc_prob:
            low = math.pi / 3 if size < 13 else math.pi / 5
            return sinc_kernel(size, uniform(rng, [low, math.pi]))
        probs = np.asarray(self.kernel_probs, dtype=np.float64)
        kind = REALESRGAN_KERNEL_TYPES[int(rng.choice(len(probs), p=probs / probs.sum()))]
        sigma_x = uniform(rng, sigma)
        if kind.endswith("iso") and not kind.endswith("aniso"):
            sigma_y, rotation = sigma_x, 0.0
        else:
            sigma_y, rotation = uniform(rng, sigma), uniform(rng, [-math.pi, math.pi])
        if kind.startswith("generalized"):
            return generalized_gaussian_kernel(
                size, sigma_x, sigma_y, rotation, uniform(rng, self.betag_range)
            )
        if kind.startswith("plateau"):
            return plateau_kernel(size, sigma_x, sigma_y, rotation, uniform(rng, self.betap_range))
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
            sigma = uniform(rng, sigma_range) / 255.0
            shape = (*img.shape[:2], 1) if gray else img.shape
            noise = rng.standard_normal(shape).astype(np.float32) * sigma
        else:
            scale = uniform(rng, poisson_range)
            src = img.mean(axis=2, keepdims=True) if gray else img
            src = np.clip(src, 0.0, 1.0)
            levels = len(np.unique((src * 255.0).round()))
            vals = 2.0 ** math.ceil(math.log2(max(levels, 2)))
            noise = (rng.poisson(src * vals) / vals - src).astype(np.float32) * scale
        return np.clip(img + noise, 0.0, 1.0)

    def _randomresize(
        self,
        img: np.ndarray,
        rng: np.random.Generator,
        probs: Sequence[float],
        scale_range: Sequence[float],
    ) -> np.ndarray:
        mode = int(rng.choice(3, p=np.asarray(probs) / np.sum(probs)))
        if mode == 0:
            factor = uniform(rng, [1.0, scale_range[1]])
        elif mode == 1:
            factor = uniform(rng, [scale_range[0], 1.0])
        else:
            factor = 1.0
        interp = ("area", "linear", "cubic")[int(rng.integers(3))]
        height, width = img.shape[:2]
        return resize(img, int(width * factor), int(height * factor), interp)

    def degrade(self, hq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """HWC RGB float32 [0, 1] (H, W divisible by `scale`) -> LQ of size (H/scale, W/scale)."""
        check_image(hq)
        height, width = hq.shape[:2]
        if height % self.scale or width % self.scale:
            raise ValueError(f"image size {width}x{height} is not divisible by scale {self.scale}")
        img = apply_kernel(
            hq.astype(np.float32), self._random_kernel(rng, self.blur_sigma, self.sinc_prob)
        )
        img = self._randomresize(img, rng, self.resize_prob, self.resize_range)
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
            uniform(rng, [1.0, self.resize_range2[1]])
            if mode == 0
            else uniform(rng, [self.resize_range2[0], 1.0])
            if mode == 1
            else 1.0
        )
        interp = ("area", "linear", "cubic")[int(rng.integers(3))]
        img = resize(
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
            final_kernel = sinc_kernel(size, uniform(rng, [math.pi / 3, math.pi]))
        else:
            final_kernel = None
        quality = int(rng.integers(self.jpeg_range2[0], self.jpeg_range2[1] + 1))

        def resize_and_sinc(x: np.ndarray) -> np.ndarray:
            x = resize(x, out_w, out_h, final_interp)
            return x if final_kernel is None else apply_kernel(x, final_kernel)

        if rng.uniform() < 0.5:  # resize + sinc, then JPEG
            img = jpeg_compress(resize_and_sinc(img), quality)
        else:  # JPEG, then resize + sinc
            img = resize_and_sinc(jpeg_compress(img, quality))
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    __call__ = degrade


