"""Noise schedules: the base DDPM schedule and its respaced (improved-DDPM) form.

All coefficients are computed once, in float64, when a schedule is built; samplers only index
them. ``SpacedSchedule.to`` moves every coefficient to a device/dtype in one go.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


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

    @classmethod
    def from_base(cls, base: NoiseSchedule, num_steps: int) -> SpacedSchedule:
        """Respace ``base`` to ``num_steps`` evenly spaced timesteps."""
        return cls.from_timesteps(base, spaced_timesteps(base.num_timesteps, num_steps))

    @classmethod
    def from_timesteps(cls, base: NoiseSchedule, timesteps: list[int]) -> SpacedSchedule:
        """Respace ``base`` to the given strictly increasing original timesteps."""
        kept = torch.as_tensor(timesteps, dtype=torch.int64)
        if kept.ndim != 1 or kept.numel() < 2:
            raise ValueError(f"timesteps: expected >= 2 values, got {timesteps}")
        if bool((kept[1:] <= kept[:-1]).any()) or kept[0] < 0 or kept[-1] >= base.num_timesteps:
            raise ValueError(
                f"timesteps: expected strictly increasing values in 0..{base.num_timesteps - 1}"
            )
        alphas_cumprod = base.alphas_cumprod[kept]
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
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

    @property
    def device(self) -> torch.device:
        return self.posterior_mean_coef1.device

    @property
    def dtype(self) -> torch.dtype:
        return self.posterior_mean_coef1.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SpacedSchedule:
        """A copy with every coefficient on ``device``/``dtype`` (timesteps stay int64).

        Returns ``self`` when nothing would change, so calling it once per sampling run is free.
        """
        device = self.device if device is None else torch.device(device)
        dtype = self.dtype if dtype is None else dtype
        if device == self.device and dtype == self.dtype:
            return self
        moved = {
            f.name: getattr(self, f.name).to(device=device, dtype=dtype)
            for f in dataclasses.fields(self)
            if f.name != "timesteps"
        }
        return SpacedSchedule(timesteps=self.timesteps.to(device), **moved)
