"""Noise schedules and the forward process.

The base DDPM schedule, its respaced (improved-DDPM) and DDIM-"uniform" forms, and the forward
process (``q_sample``, ``training_target``) that training and the ``cond`` start point share.
All coefficients are computed once, in float64, when a schedule is built; samplers only read
them (as Python floats, see :attr:`SpacedSchedule.levels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch
from torch import Tensor

# What the network predicts: the noise ("eps") or the velocity sqrt(abar) eps - sqrt(1-abar) x0.
Parameterization = Literal["eps", "v"]
PARAMETERIZATIONS = ("eps", "v")


def check_parameterization(value: str) -> None:
    """Raise a ValueError unless ``value`` is "eps" or "v"."""
    if value not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization: expected 'eps' or 'v', got {value!r}")


@dataclass(frozen=True)
class NoiseLevel:
    """What a denoiser needs at one noise level, as Python floats (no device reads per step).

    The sampler state ``x`` is scaled by ``c_in`` before the model sees it (1 for DDPM-family
    grids; ``1 / sqrt(sigma_edm^2 + 1)`` for EDM); the model input is then
    ``alpha * x0 + sigma * eps`` with ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``.
    ``t`` is the model timestep. ``x0_coef`` is the posterior-mean coefficient of x0 from this
    level to the next one of the grid (the ``c1`` of restoration guidance).
    """

    t: float
    alpha: float
    sigma: float
    c_in: float = 1.0
    x0_coef: float = 1.0


def posterior_x0_coef(abar: float, abar_next: float) -> float:
    """The coefficient of x0 in the mean of q(x_next | x_t, x0): ``beta sqrt(abar_next) /
    (1 - abar)`` with ``beta = 1 - abar / abar_next`` (1 when the next level is clean)."""
    if abar >= 1.0:
        return 1.0
    beta = 1.0 - abar / abar_next
    return beta * abar_next**0.5 / (1.0 - abar)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last value is 0 and the first is unchanged."""
    sqrt_ac = alphas_cumprod.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    return sqrt_ac**2


def _betas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Betas whose cumulative product of (1 - beta) is ``alphas_cumprod``."""
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM noise schedule (float64 ``betas`` and ``alphas_cumprod``, shape (T,))."""

    betas: Tensor
    alphas_cumprod: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> NoiseSchedule:
        """Build from betas; each must lie in (0, 1]."""
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(
                f"betas: expected a 1-D tensor of >= 2 values, got {tuple(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas: every value must lie in (0, 1]")
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def linear(
        cls,
        num_timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        """The SD "linear" schedule: betas = linspace(sqrt(start), sqrt(end), T) ** 2.

        ``zero_terminal_snr`` rescales it so that ``alphas_cumprod[-1] == 0`` (the last beta
        becomes 1; only a v-prediction model can then be sampled from the last step).
        """
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps: expected >= 2, got {num_timesteps}")
        if not 0 < linear_start <= linear_end < 1:
            raise ValueError(
                f"linear_start/linear_end: expected 0 < start <= end < 1, "
                f"got {linear_start}, {linear_end}"
            )
        betas = (
            torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64)
            ** 2
        )
        if not zero_terminal_snr:
            return cls.from_betas(betas)
        alphas_cumprod = rescale_zero_terminal_snr(torch.cumprod(1.0 - betas, dim=0))
        return cls(betas=_betas_from_alphas_cumprod(alphas_cumprod), alphas_cumprod=alphas_cumprod)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The forward process (paper Eq. 2): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``,
        ``t`` a LongTensor (B,) of timesteps."""
        sqrt_ac, sqrt_one_minus = self._forward_coefficients(t, x0)
        return sqrt_ac * x0 + sqrt_one_minus * noise

    def training_target(
        self, x0: Tensor, noise: Tensor, t: Tensor, parameterization: Parameterization
    ) -> Tensor:
        """What a model of ``parameterization`` must predict for ``q_sample(x0, t, noise)``:
        the noise, or the velocity ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
        check_parameterization(parameterization)
        if parameterization == "eps":
            return noise
        sqrt_ac, sqrt_one_minus = self._forward_coefficients(t, x0)
        return sqrt_ac * noise - sqrt_one_minus * x0

    def _forward_coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) shaped (B, 1, ...) on ``like``'s device/dtype."""
        alphas_cumprod = self._device_alphas_cumprod(like.device)[t]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (
            alphas_cumprod.sqrt().to(like.dtype).view(shape),
            (1.0 - alphas_cumprod).sqrt().to(like.dtype).view(shape),
        )

    def _device_alphas_cumprod(self, device: torch.device) -> Tensor:
        """alphas_cumprod on ``device`` (float64), copied there once."""
        cache = self.__dict__.setdefault("_on_device", {})
        if device not in cache:
            cache[device] = self.alphas_cumprod.to(device)
        return cache[device]


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """LDM's "uniform" DDIM discretisation: ``k * (T // N) + 1`` for k = 0..N-1
    (T = 1000, N = 5: 1, 201, 401, 601, 801). Not the respaced-DDPM set."""
    if not 2 <= num_steps < num_timesteps:
        raise ValueError(f"num_steps: expected 2..{num_timesteps - 1}, got {num_steps}")
    stride = num_timesteps // num_steps
    return [k * stride + 1 for k in range(num_steps)]


def spaced_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced original timesteps, ``round(k * (T - 1) / (N - 1))`` for k = 0..N-1.

    As in improved-DDPM respacing (which the reference uses), the position is accumulated by
    repeated float addition of the stride and then rounded with Python's ``round``; for some N
    (e.g. 21) this differs at exact .5 ties from multiplying k by the stride.
    """
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps: expected 2..{num_timesteps}, got {num_steps}")
    stride = (num_timesteps - 1) / (num_steps - 1)
    position, timesteps = 0.0, []
    for _ in range(num_steps):
        timesteps.append(round(position))
        position += stride
    return timesteps


@dataclass(frozen=True)
class SpacedSchedule:
    """A respaced schedule: per-step-index coefficients (shape (N,)) for DDPM and DDIM sampling.

    ``timesteps[i]`` is the original timestep the model sees at step index ``i`` (ascending,
    int64). ``posterior_mean_coef1`` multiplies x0 and ``posterior_mean_coef2`` multiplies x_t.
    """

    timesteps: Tensor
    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    cfg_on_denoised: ClassVar[bool] = False

    @classmethod
    def from_base(cls, base: NoiseSchedule, num_steps: int) -> SpacedSchedule:
        """Respace ``base`` to ``num_steps`` evenly spaced timesteps."""
        return cls.from_timesteps(base, spaced_timesteps(base.num_timesteps, num_steps))

    @classmethod
    def ddim(cls, base: NoiseSchedule, num_steps: int) -> SpacedSchedule:
        """The official DDIM grid: :func:`ddim_timesteps`, and ``abar_prev`` of the first step
        is ``abar[0]`` of ``base`` (not 1)."""
        return cls.from_timesteps(
            base,
            ddim_timesteps(base.num_timesteps, num_steps),
            final_alpha_cumprod=float(base.alphas_cumprod[0]),
        )

    @classmethod
    def from_timesteps(
        cls, base: NoiseSchedule, timesteps: list[int], final_alpha_cumprod: float = 1.0
    ) -> SpacedSchedule:
        """Respace ``base`` to the given strictly increasing original timesteps;
        ``final_alpha_cumprod`` is ``abar_prev`` of the first step (the level sampling ends at).
        """
        kept = torch.as_tensor(timesteps, dtype=torch.int64)
        if kept.ndim != 1 or kept.numel() < 2:
            raise ValueError(f"timesteps: expected >= 2 values, got {timesteps}")
        if bool((kept[1:] <= kept[:-1]).any()) or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(
                f"timesteps: expected strictly increasing values in 0..{base.num_timesteps - 1}"
            )
        alphas_cumprod = base.alphas_cumprod[kept]
        final = alphas_cumprod.new_full((1,), final_alpha_cumprod)
        alphas_cumprod_prev = torch.cat([final, alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
        one_minus = 1.0 - alphas_cumprod
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / one_minus
        log_variance = torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log()
        return cls(
            timesteps=kept,
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=one_minus.sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / one_minus,
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / one_minus,
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=log_variance,
        )

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    @cached_property
    def levels(self) -> tuple[NoiseLevel, ...]:
        """Per step index, the :class:`NoiseLevel` (model timestep, sqrt(abar), sqrt(1-abar),
        ``posterior_mean_coef1``) as Python floats, read once."""
        columns = zip(
            self.timesteps.tolist(),
            self.sqrt_alphas_cumprod.tolist(),
            self.sqrt_one_minus_alphas_cumprod.tolist(),
            self.posterior_mean_coef1.tolist(),
            strict=True,
        )
        return tuple(
            NoiseLevel(t=float(t), alpha=a, sigma=s, x0_coef=c1) for t, a, s, c1 in columns
        )

    def level(self, index: int) -> NoiseLevel:
        """The noise level of step ``index``."""
        return self.levels[index]
