"""The level grids of the EDM samplers and of DPM-Solver++, built once per (schedule, steps).

The DDPM-family grid is :class:`~diffbir.diffusion.schedule.SpacedSchedule`. Every grid maps
the level a sampler passes to its denoiser (a step index, or an EDM sigma) to a
:class:`~diffbir.diffusion.schedule.NoiseLevel` with ``level(key)``; all values are Python
floats, so samplers branch on CPU numbers only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from diffbir.diffusion.schedule import NoiseLevel, NoiseSchedule, posterior_x0_coef

# The official EDM grid replaces abar of its first timestep by this (zero-SNR safe).
EDM_FIRST_ALPHA_CUMPROD = 1e-8
# DPM-Solver's discrete schedule drops the last timesteps whose half-log-SNR is below this.
DPM_CLIPPED_LAMBDA = -5.1


class Grid(Protocol):
    num_steps: int
    cfg_on_denoised: bool

    def level(self, key: float) -> NoiseLevel: ...


@dataclass(frozen=True)
class EdmGrid:
    """Karras sigmas of the official EDM sampler for N steps (N + 1 values, the last 0).

    Timesteps ``int(linspace(T - 1, 0, N, endpoint=False))``; ``sigma = sqrt((1 - abar) /
    abar)`` at them, with abar of the first replaced by 1e-8, rounded to float32 as the official
    grid is; a final (sigma, t) = (0, 0). A sigma maps to the model timestep of the nearest
    grid sigma.
    """

    sigmas: tuple[float, ...]
    timesteps: tuple[int, ...]
    cfg_on_denoised: ClassVar[bool] = True

    @classmethod
    def from_base(cls, base: NoiseSchedule, num_steps: int) -> EdmGrid:
        if not 1 <= num_steps <= base.num_timesteps:
            raise ValueError(f"steps: expected 1..{base.num_timesteps}, got {num_steps}")
        start = base.num_timesteps - 1
        stride = -start / num_steps
        timesteps = [int(k * stride + start) for k in range(num_steps)]
        abar = base.alphas_cumprod[timesteps].tolist()
        abar[0] = EDM_FIRST_ALPHA_CUMPROD
        sigmas = torch.tensor([((1.0 - a) / a) ** 0.5 for a in abar], dtype=torch.float32)
        return cls(sigmas=(*sigmas.tolist(), 0.0), timesteps=(*timesteps, 0))

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def level(self, sigma: float) -> NoiseLevel:
        """Model timestep of the nearest grid sigma; ``c_in = 1 / sqrt(sigma^2 + 1)``; for
        guidance, ``x0_coef`` = :func:`posterior_x0_coef` from abar(sigma) = 1 / (1 + sigma^2)
        to abar of the next grid sigma below ``sigma``."""
        nearest = min(range(len(self.sigmas)), key=lambda j: abs(sigma - self.sigmas[j]))
        below = next((s for s in self.sigmas if s < sigma), 0.0)
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return NoiseLevel(
            t=float(self.timesteps[nearest]),
            alpha=c_in,
            sigma=sigma * c_in,
            c_in=c_in,
            x0_coef=posterior_x0_coef(c_in * c_in, 1.0 / (1.0 + below * below)),
        )


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through (xs, ys), extended by the outer segments."""
    j = min(max(1, sum(1 for v in xs if v < x)), len(xs) - 1)
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


@dataclass(frozen=True)
class DpmSolverGrid:
    """DPM-Solver's continuous view of a discrete schedule, at N + 1 time-uniform points.

    log alpha(t) is piecewise linear through ``(i + 1) / T', 0.5 * log(abar_i)``, where the T'
    kept timesteps drop the trailing ones whose half-log-SNR is below -5.1 (zero SNR); the
    times run ``linspace(1, 1 / T', N + 1)`` and the model sees ``(t - 1 / T') * 1000``.
    Per point: ``alphas`` (sqrt abar), ``sigmas`` (sqrt(1 - abar)), ``lambdas`` (log alpha -
    log sigma) and the model ``timesteps`` (floats).
    """

    timesteps: tuple[float, ...]
    alphas: tuple[float, ...]
    sigmas: tuple[float, ...]
    lambdas: tuple[float, ...]
    cfg_on_denoised: ClassVar[bool] = False

    @classmethod
    def from_base(cls, base: NoiseSchedule, num_steps: int) -> DpmSolverGrid:
        if num_steps < 2:
            raise ValueError(f"steps: expected >= 2, got {num_steps}")
        log_alphas = (0.5 * (1.0 - base.betas).log().cumsum(0)).tolist()
        kept = [
            a
            for a in log_alphas
            if a > -math.inf and a - 0.5 * math.log(-math.expm1(2 * a)) >= DPM_CLIPPED_LAMBDA
        ]
        if len(kept) < 2:
            raise ValueError("DPM-Solver grid: the schedule keeps fewer than 2 timesteps")
        total = len(kept)
        knots = [(i + 1) / total for i in range(total)]
        first, last = 1.0, 1.0 / total
        times = [first + k * (last - first) / num_steps for k in range(num_steps)] + [last]
        timesteps, alphas, sigmas, lambdas = [], [], [], []
        for t in times:
            log_alpha = _interpolate(t, knots, kept)
            sigma = math.sqrt(-math.expm1(2 * log_alpha))
            timesteps.append((t - 1.0 / total) * 1000.0)
            alphas.append(math.exp(log_alpha))
            sigmas.append(sigma)
            lambdas.append(log_alpha - math.log(sigma))
        return cls(tuple(timesteps), tuple(alphas), tuple(sigmas), tuple(lambdas))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) - 1

    def level(self, index: int) -> NoiseLevel:
        """The level of grid point ``index`` (0 = the noisiest; ``x0_coef`` towards the next)."""
        abar = self.alphas[index] ** 2
        x0_coef = 1.0
        if index < self.num_steps:
            x0_coef = posterior_x0_coef(abar, self.alphas[index + 1] ** 2)
        return NoiseLevel(
            t=self.timesteps[index],
            alpha=self.alphas[index],
            sigma=self.sigmas[index],
            x0_coef=x0_coef,
        )
