"""Every sampler, as a plain function over a clean-estimate denoiser, and their registry
(the DDPM family here, the EDM family in :mod:`.edm`).

Each sampler is ``sample_<name>(denoise, x, grid, *, noise, callback=None, <knobs>) -> x_0``:

- ``denoise(x, level) -> x0`` (batched; see :class:`~diffbir.diffusion.denoiser.ModelDenoiser`):
  ``level`` is a step index on a :class:`SpacedSchedule` or :class:`DpmSolverGrid`, an EDM sigma
  on an :class:`EdmGrid`.
- ``x`` is the unit-variance start noise x_T (EDM samplers scale it by ``sqrt(1 + sigma_0^2)``).
- ``noise(like, level, next_level)`` is called for every draw, where the official code draws,
  even when the draw is unused (see :mod:`diffbir.diffusion.noise`). The SDE samplers draw
  increments of one Brownian path: :meth:`SamplerSpec.sample` starts that path from the run's
  stream, as the official builds its tree when the sampler starts.
- ``callback({"i", "x", "level", "denoised"})`` after each step.

Coefficients are Python floats read off the grid (no device reads in the loop); multistep
history stays local. The EDM samplers follow k-diffusion's definitions (Karras et al. 2022), as
the official code does; ``dpm++_m2`` is DPM-Solver++ multistep of order 2 (Lu et al. 2022).
Name -> :class:`SamplerSpec` in :data:`SAMPLERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from diffbir.diffusion.denoiser import Denoiser
from diffbir.diffusion.edm import (
    sample_edm_dpm_2,
    sample_edm_dpm_2_a,
    sample_edm_dpmpp_2m,
    sample_edm_dpmpp_2m_sde,
    sample_edm_dpmpp_2s_a,
    sample_edm_dpmpp_3m_sde,
    sample_edm_dpmpp_sde,
    sample_edm_euler,
    sample_edm_euler_a,
    sample_edm_heun,
    sample_edm_lms,
)
from diffbir.diffusion.grids import DpmSolverGrid, EdmGrid, Grid
from diffbir.diffusion.noise import NoiseSource, NoiseStream
from diffbir.diffusion.reporting import StepCallback, report
from diffbir.diffusion.schedule import NoiseSchedule, SpacedSchedule

# ---------------------------------------------------------------- DDPM family


def sample_spaced(
    denoise: Denoiser,
    x: Tensor,
    grid: SpacedSchedule,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling of the respaced DDPM: posterior mean of the clean estimate plus
    ``exp(0.5 * log_variance_clipped)`` noise. One draw per step; the last is unused."""
    coef1 = grid.posterior_mean_coef1.tolist()
    coef2 = grid.posterior_mean_coef2.tolist()
    std = (0.5 * grid.posterior_log_variance_clipped).exp().tolist()
    for step, i in enumerate(reversed(range(grid.num_steps))):
        x0 = denoise(x, i)
        z = noise(x, i, i - 1)
        mean = coef1[i] * x0 + coef2[i] * x
        x = mean + std[i] * z if i > 0 else mean
        report(callback, step, x, i, x0)
    return x


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    grid: SpacedSchedule,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
) -> Tensor:
    """Deterministic DDIM (eta 0) on the official "uniform" grid (:meth:`SpacedSchedule.ddim`).
    The noise consistent with the (possibly guided) clean estimate points to the next level.
    One (unused) draw per step, as the official code draws."""
    prev = grid.alphas_cumprod_prev.tolist()
    for step, i in enumerate(reversed(range(grid.num_steps))):
        lv = grid.level(i)
        x0 = denoise(x, i)
        eps = (x - lv.alpha * x0) / lv.sigma
        noise(x, i, i - 1)
        x = prev[i] ** 0.5 * x0 + (1.0 - prev[i]) ** 0.5 * eps
        report(callback, step, x, i, x0)
    return x


def sample_dpmpp_m2(
    denoise: Denoiser,
    x: Tensor,
    grid: DpmSolverGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++ multistep, order 2 (data prediction): the first step, and the last one when
    there are fewer than 10 steps, are first order. No draws."""
    lam, alpha, sigma = grid.lambdas, grid.alphas, grid.sigmas
    steps, x0_prev = grid.num_steps, None
    for i in range(steps):
        x0 = denoise(x, i)
        h = lam[i + 1] - lam[i]
        phi = alpha[i + 1] * math.expm1(-h)
        x_next = (sigma[i + 1] / sigma[i]) * x - phi * x0
        if x0_prev is not None and not (steps < 10 and i == steps - 1):
            r = (lam[i] - lam[i - 1]) / h
            x_next = x_next - (0.5 * phi) * ((x0 - x0_prev) / r)
        x, x0_prev = x_next, x0
        report(callback, i, x, i, x0)
    return x


# ---------------------------------------------------------------- registry

GridBuilder = Callable[[NoiseSchedule, int], Grid]
CHURN_KNOBS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
ANCESTRAL_KNOBS = ("eta", "s_noise")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler: its function, how to build its grid for N steps, its knobs, and whether it
    draws Brownian increments (``brownian``: the official SDE samplers' torchsde tree)."""

    name: str
    fn: Callable[..., Tensor]
    make_grid: GridBuilder
    knobs: tuple[str, ...] = ()
    brownian: bool = False

    def sample(
        self,
        denoise: Denoiser,
        x: Tensor,
        grid: Grid,
        *,
        noise: NoiseStream,
        callback: StepCallback | None = None,
        **knobs: Any,
    ) -> Tensor:
        """Run the sampler from ``x`` as the official runs it: a Brownian sampler first takes
        its path from ``noise`` over the grid's positive sigmas (the official draws the tree's
        seed here, after x_T and the noise augmentation), the others draw from ``noise``."""
        if self.brownian:
            positive = [s for s in grid.sigmas if s > 0]
            noise = noise.brownian(x, min(positive), max(positive))
        return self.fn(denoise, x, grid, noise=noise, callback=callback, **knobs)

    def check_knobs(
        self, knobs: Mapping[str, Any], names: Mapping[str, str] | None = None
    ) -> None:
        """Raise a ValueError naming the sampler and the first knob it does not have
        (``names``: how to call each knob in the message, e.g. its CLI flag)."""
        names = names or {}
        for knob in knobs:
            if knob not in self.knobs:
                has = ", ".join(names.get(k, k) for k in self.knobs) or "none"
                raise ValueError(
                    f"{names.get(knob, knob)}: sampler {self.name!r} has no such knob "
                    f"(its knobs: {has})"
                )


def _spec(name: str, fn: Callable[..., Tensor], make_grid: GridBuilder, knobs=()) -> SamplerSpec:
    return SamplerSpec(name, fn, make_grid, tuple(knobs))


def _sde(name: str, fn: Callable[..., Tensor]) -> SamplerSpec:
    """An EDM SDE sampler: ancestral knobs, noise from a Brownian path."""
    return SamplerSpec(name, fn, EdmGrid.from_base, ANCESTRAL_KNOBS, brownian=True)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        _spec("spaced", sample_spaced, SpacedSchedule.from_base),
        _spec("ddim", sample_ddim, SpacedSchedule.ddim),
        _spec("dpm++_m2", sample_dpmpp_m2, DpmSolverGrid.from_base),
        _spec("edm_euler", sample_edm_euler, EdmGrid.from_base, CHURN_KNOBS),
        _spec("edm_euler_a", sample_edm_euler_a, EdmGrid.from_base, ANCESTRAL_KNOBS),
        _spec("edm_heun", sample_edm_heun, EdmGrid.from_base, CHURN_KNOBS),
        _spec("edm_dpm_2", sample_edm_dpm_2, EdmGrid.from_base, CHURN_KNOBS),
        _spec("edm_dpm_2_a", sample_edm_dpm_2_a, EdmGrid.from_base, ANCESTRAL_KNOBS),
        _spec("edm_lms", sample_edm_lms, EdmGrid.from_base, ("order",)),
        _spec("edm_dpm++_2s_a", sample_edm_dpmpp_2s_a, EdmGrid.from_base, ANCESTRAL_KNOBS),
        _sde("edm_dpm++_sde", sample_edm_dpmpp_sde),
        _spec("edm_dpm++_2m", sample_edm_dpmpp_2m, EdmGrid.from_base),
        _sde("edm_dpm++_2m_sde", sample_edm_dpmpp_2m_sde),
        _sde("edm_dpm++_3m_sde", sample_edm_dpmpp_3m_sde),
    )
}
