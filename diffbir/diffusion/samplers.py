"""Samplers over a respaced schedule, written as plain functions over a denoiser.

A *denoiser* is ``denoiser(x_t, t_model) -> model_output`` where ``t_model`` is a LongTensor (B,)
of original timesteps. A *guidance* is ``guidance(pred_x0, t_model: int, coef1: float) -> pred_x0``
(see ``RestorationGuidance``). Step index ``i`` runs from N-1 down to 0; the model sees
``schedule.timesteps[i]``; coefficients are taken at ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from diffbir.diffusion.schedule import SpacedSchedule

Denoiser = Callable[[Tensor, Tensor], Tensor]
ConditionalModel = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]
Guidance = Callable[[Tensor, int, float], Tensor]
StepCallback = Callable[[int, int, Tensor], None]
Parameterization = Literal["eps", "v"]


def gaussian_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise, drawn from ``generator`` when given (e.g. the initial x_T).

    The noise is drawn on the generator's device in float32 and then moved to ``device`` and
    ``dtype``, so a seeded CPU generator gives the same noise whatever device the sample is on.
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    noise = torch.randn(shape, generator=generator, device=generator.device)
    return noise.to(device=device, dtype=dtype)


def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise with the shape, device and dtype of ``x`` (see ``gaussian_noise``)."""
    return gaussian_noise(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def predict_x0_and_eps(
    schedule: SpacedSchedule,
    x_t: Tensor,
    index: int,
    model_output: Tensor,
    parameterization: Parameterization = "eps",
) -> tuple[Tensor, Tensor]:
    """``(pred_x0, pred_eps)`` at step ``index`` from an eps- or v-prediction ``model_output``."""
    if parameterization == "eps":
        pred_x0 = (
            schedule.sqrt_recip_alphas_cumprod[index] * x_t
            - schedule.sqrt_recipm1_alphas_cumprod[index] * model_output
        )
        return pred_x0, model_output
    if parameterization == "v":
        sqrt_ac = schedule.sqrt_alphas_cumprod[index]
        sqrt_one_minus = schedule.sqrt_one_minus_alphas_cumprod[index]
        pred_x0 = sqrt_ac * x_t - sqrt_one_minus * model_output
        pred_eps = sqrt_ac * model_output + sqrt_one_minus * x_t
        return pred_x0, pred_eps
    raise ValueError(f"parameterization: expected 'eps' or 'v', got {parameterization!r}")


def eps_from_x0(schedule: SpacedSchedule, x_t: Tensor, index: int, pred_x0: Tensor) -> Tensor:
    """The noise consistent with ``x_t`` and ``pred_x0`` at step ``index``."""
    return (x_t - schedule.sqrt_alphas_cumprod[index] * pred_x0) / (
        schedule.sqrt_one_minus_alphas_cumprod[index]
    )


def posterior_mean_variance(
    schedule: SpacedSchedule, x_t: Tensor, pred_x0: Tensor, index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and clipped log-variance of q(x_{i-1} | x_i, x0) at step ``index``."""
    mean = (
        schedule.posterior_mean_coef1[index] * pred_x0 + schedule.posterior_mean_coef2[index] * x_t
    )
    return (
        mean,
        schedule.posterior_variance[index],
        schedule.posterior_log_variance_clipped[index],
    )


def _guide(
    schedule: SpacedSchedule, pred_x0: Tensor, index: int, guidance: Guidance | None
) -> Tensor:
    if guidance is None:
        return pred_x0
    t_model = int(schedule.timesteps[index])
    return guidance(pred_x0, t_model, float(schedule.posterior_mean_coef1[index]))


@dataclass(frozen=True)
class StepOutput:
    """One sampler step: the next sample and the (guided) clean estimate it came from."""

    x_prev: Tensor
    pred_x0: Tensor


def spaced_ddpm_step(
    schedule: SpacedSchedule,
    x_t: Tensor,
    index: int,
    model_output: Tensor,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One ancestral DDPM step: x0 estimate, optional guidance on it, then sample the posterior.

    Noise with std exp(0.5 * posterior_log_variance_clipped) is added except at index 0.
    """
    pred_x0, _ = predict_x0_and_eps(schedule, x_t, index, model_output, parameterization)
    pred_x0 = _guide(schedule, pred_x0, index, guidance)
    mean, _, log_variance = posterior_mean_variance(schedule, x_t, pred_x0, index)
    if index == 0:
        return StepOutput(x_prev=mean, pred_x0=pred_x0)
    x_prev = mean + (0.5 * log_variance).exp() * noise_like(x_t, generator)
    return StepOutput(x_prev=x_prev, pred_x0=pred_x0)


def ddim_step(
    schedule: SpacedSchedule,
    x_t: Tensor,
    index: int,
    model_output: Tensor,
    *,
    eta: float = 0.0,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One DDIM step from index ``index`` to ``index - 1`` (alphas_cumprod_prev = 1 at index 0).

    With guidance, the noise estimate is recomputed from the guided x0 so both stay consistent.
    """
    pred_x0, pred_eps = predict_x0_and_eps(schedule, x_t, index, model_output, parameterization)
    if guidance is not None:
        pred_x0 = _guide(schedule, pred_x0, index, guidance)
        pred_eps = eps_from_x0(schedule, x_t, index, pred_x0)
    ac, ac_prev = schedule.alphas_cumprod[index], schedule.alphas_cumprod_prev[index]
    sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).sqrt()
    x_prev = ac_prev.sqrt() * pred_x0 + (1 - ac_prev - sigma**2).clamp(min=0).sqrt() * pred_eps
    if eta > 0 and index > 0:
        x_prev = x_prev + sigma * noise_like(x_t, generator)
    return StepOutput(x_prev=x_prev, pred_x0=pred_x0)


def _coefficients_for(schedule: SpacedSchedule, x: Tensor) -> SpacedSchedule:
    """The schedule on ``x``'s device, float64 for float64 samples and float32 otherwise."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return schedule.to(device=x.device, dtype=dtype)


def _run(
    step: Callable[..., StepOutput],
    denoiser: Denoiser,
    schedule: SpacedSchedule,
    x_T: Tensor,
    callback: StepCallback | None,
    **step_kwargs,
) -> Tensor:
    schedule = _coefficients_for(schedule, x_T)
    total = schedule.num_steps
    x = x_T
    for done, index in enumerate(reversed(range(total)), start=1):
        t_model = schedule.timesteps[index].repeat(x.shape[0])
        x = step(schedule, x, index, denoiser(x, t_model), **step_kwargs).x_prev
        if callback is not None:
            callback(done, total, x)
    return x


def sample_spaced_ddpm(
    denoiser: Denoiser,
    schedule: SpacedSchedule,
    x_T: Tensor,
    *,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling over all step indices N-1..0; returns x_0.

    ``callback(done, total, x)`` is called after each step (done = 1..total).
    """
    return _run(
        spaced_ddpm_step,
        denoiser,
        schedule,
        x_T,
        callback,
        parameterization=parameterization,
        guidance=guidance,
        generator=generator,
    )


def sample_ddim(
    denoiser: Denoiser,
    schedule: SpacedSchedule,
    x_T: Tensor,
    *,
    eta: float = 0.0,
    parameterization: Parameterization = "eps",
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DDIM sampling over all step indices N-1..0 (deterministic for ``eta == 0``)."""
    if eta < 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    return _run(
        ddim_step,
        denoiser,
        schedule,
        x_T,
        callback,
        eta=eta,
        parameterization=parameterization,
        guidance=guidance,
        generator=generator,
    )


def cfg_denoiser(
    model_fn: ConditionalModel,
    cond: Mapping[str, Tensor],
    uncond: Mapping[str, Tensor],
    scale: float,
) -> Denoiser:
    """Classifier-free guidance: ``out_u + scale * (out_c - out_u)``.

    ``model_fn(x, t, cond_dict)`` is run ONCE per call on the batch ``cat([cond, uncond])``
    (x and t duplicated); with ``scale == 1`` only the conditional branch is run.
    """
    if scale == 1:
        cond = dict(cond)
        return lambda x, t: model_fn(x, t, cond)
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond/uncond: expected the same keys, got {sorted(cond)} and {sorted(uncond)}"
        )
    both = {key: torch.cat([cond[key], uncond[key]]) for key in cond}

    def guided(x: Tensor, t: Tensor) -> Tensor:
        out_cond, out_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
