"""The EDM samplers (Karras et al. 2022, k-diffusion's definitions, as the official code uses
them): plain functions over a clean-estimate denoiser on an :class:`~.grids.EdmGrid`, sigma as
the level. Registered in :data:`diffbir.diffusion.samplers.SAMPLERS`. (The eleven official EDM
samplers side by side, sharing their step helpers: hence a little over 400 lines.)"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffbir.diffusion.denoiser import Denoiser
from diffbir.diffusion.grids import EdmGrid
from diffbir.diffusion.noise import NoiseSource
from diffbir.diffusion.reporting import StepCallback, report

SQRT2_MINUS_1 = 2**0.5 - 1

# ---------------------------------------------------------------- EDM family (k-diffusion)
#
# The step sizes are computed in float32 from the float32 grid sigmas, as the official sampler
# does: with sigma_0 = 1e4 the first step cancels x (~1e4) down to ~sigma_1, so its rounding
# decides the result at the parity tolerance. Scalars are 0-d float32 CPU tensors (no device
# reads); branches read the grid's Python floats.


def _f32(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _edm_start(x: Tensor, grid: EdmGrid) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The start ``x_T sqrt(1 + sigma_0^2)`` and the grid sigmas as float32 scalars."""
    sigmas = tuple(_f32(s) for s in grid.sigmas)
    return x * torch.sqrt(1.0 + sigmas[0] ** 2.0), sigmas


def _ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step from ``sigma`` to ``sigma_next``."""
    if not eta:
        return sigma_next, _f32(0.0)
    up = eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    up = torch.minimum(sigma_next, up)
    return (sigma_next**2 - up**2) ** 0.5, up


def _churn(
    x: Tensor,
    sigmas: tuple[Tensor, ...],
    i: int,
    noise: NoiseSource,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> tuple[Tensor, Tensor]:
    """Karras' churn: raise sigma_i to sigma_hat = sigma_i (1 + gamma) with fresh noise. The
    draw is made at every step (the official samplers do), used only when gamma > 0."""
    sigma = sigmas[i]
    churned = s_tmin <= float(sigma) <= s_tmax
    gamma = min(s_churn / (len(sigmas) - 1), SQRT2_MINUS_1) if churned else 0.0
    z = noise(x, float(sigma), float(sigma) * (gamma + 1)) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + z * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The Karras ODE derivative ``(x - D(x)) / sigma``."""
    return (x - denoised) / sigma


def _draw(noise: NoiseSource, x: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    return noise(x, float(sigma), float(sigma_next))


def sample_edm_euler(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 300.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps with churn (Karras Alg. 2). One draw per step."""
    x, sigmas = _edm_start(x, grid)
    for i in range(grid.num_steps):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoise(x, float(sigma_hat))
        x = x + _to_d(x, sigma_hat, x0) * (sigmas[i + 1] - sigma_hat)
        report(callback, i, x, float(sigma_hat), x0)
    return x


def sample_edm_heun(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 300.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun steps with churn (Karras Alg. 2); Euler for the last step. One draw per step."""
    x, sigmas = _edm_start(x, grid)
    for i in range(grid.num_steps):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoise(x, float(sigma_hat))
        d = _to_d(x, sigma_hat, x0)
        dt = sigmas[i + 1] - sigma_hat
        if grid.sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], denoise(x_2, grid.sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        report(callback, i, x, float(sigma_hat), x0)
    return x


def _log_midpoint(a: Tensor, b: Tensor) -> Tensor:
    return a.log().lerp(b.log(), 0.5).exp()


def sample_edm_dpm_2(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = 300.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2-like midpoint steps (in log sigma) with churn; Euler for the last step.
    One draw per step."""
    x, sigmas = _edm_start(x, grid)
    for i in range(grid.num_steps):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x0 = denoise(x, float(sigma_hat))
        d = _to_d(x, sigma_hat, x0)
        if grid.sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, sigmas[i + 1])
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = _to_d(x_2, sigma_mid, denoise(x_2, float(sigma_mid)))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
        report(callback, i, x, float(sigma_hat), x0)
    return x


def sample_edm_euler_a(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler steps. One draw per step but the last."""
    x, sigmas = _edm_start(x, grid)
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _to_d(x, sigmas[i], x0) * (sigma_down - sigmas[i])
        if grid.sigmas[i + 1] > 0:
            x = x + _draw(noise, x, sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, grid.sigmas[i], x0)
    return x


def sample_edm_dpm_2_a(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver-2-like steps. One draw per step but the last."""
    x, sigmas = _edm_start(x, grid)
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _to_d(x, sigmas[i], x0)
        if float(sigma_down) == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigma_down)
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, denoise(x_2, float(sigma_mid)))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + _draw(noise, x, sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, grid.sigmas[i], x0)
    return x


def lms_coefficients(sigmas: tuple[float, ...], order: int) -> list[list[float]]:
    """Per step i, the linear-multistep weights of the last ``min(i + 1, order)`` derivatives
    (newest first): integrals over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomials
    through the previous sigmas, exact (the polynomials are integrated in closed form)."""
    coefficients = []
    for i in range(len(sigmas) - 1):
        current = min(i + 1, order)
        row = []
        for j in range(current):
            basis = np.polynomial.Polynomial([1.0])
            for k in range(current):
                if k != j:
                    denominator = sigmas[i - j] - sigmas[i - k]
                    basis = basis * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / denominator
            antiderivative = basis.integ()
            row.append(float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])))
        coefficients.append(row)
    return coefficients


def sample_edm_lms(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    order: int = 1,
) -> Tensor:
    """Linear multistep of ``order`` over the Karras ODE. No draws."""
    if order < 1:
        raise ValueError(f"order: expected >= 1, got {order}")
    x, sigmas = _edm_start(x, grid)
    weights = lms_coefficients(grid.sigmas, order)
    derivatives: list[Tensor] = []
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        derivatives = [_to_d(x, sigmas[i], x0), *derivatives][:order]
        x = x + sum(w * d for w, d in zip(weights[i], derivatives, strict=True))
        report(callback, i, x, grid.sigmas[i], x0)
    return x


def _t(sigma: Tensor) -> Tensor:
    """log-SNR time ``-log sigma``."""
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def sample_edm_dpmpp_2s_a(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver++(2S). One draw per step but the last."""
    x, sigmas = _edm_start(x, grid)
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if float(sigma_down) == 0:
            x = x + _to_d(x, sigmas[i], x0) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * x0
            x0_2 = denoise(x_2, float(_sigma(s)))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * x0_2
        if grid.sigmas[i + 1] > 0:
            x = x + _draw(noise, x, sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        report(callback, i, x, grid.sigmas[i], x0)
    return x


def sample_edm_dpmpp_sde(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++ (stochastic, midpoint r = 1/2). Two draws per step but the last."""
    x, sigmas = _edm_start(x, grid)
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        if grid.sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], x0) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            s = t + (t_next - t) * 0.5
            down, up = _ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = _t(down)
            x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * x0
            x_2 = x_2 + _draw(noise, x, _sigma(t), _sigma(s)) * s_noise * up
            # with r = 1/2 the second stage uses the midpoint estimate alone
            x0_2 = denoise(x_2, float(_sigma(s)))
            down, up = _ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(down)
            x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * x0_2
            x = x + _draw(noise, x, _sigma(t), _sigma(t_next)) * s_noise * up
        report(callback, i, x, grid.sigmas[i], x0)
    return x


def sample_edm_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M); first order for the first and the last step. No draws."""
    x, sigmas = _edm_start(x, grid)
    x0_prev = None
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        x0_d = x0
        if x0_prev is not None and grid.sigmas[i + 1] > 0:
            r = (t - _t(sigmas[i - 1])) / h
            x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * x0_d
        x0_prev = x0
        report(callback, i, x, grid.sigmas[i], x0)
    return x


def sample_edm_dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant. One draw per step but the last (none when
    ``eta`` is 0); the last step returns the clean estimate."""
    x, sigmas = _edm_start(x, grid)
    x0_prev, h = None, None
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        if grid.sigmas[i + 1] == 0:
            x = x0
        else:
            h_last, h = h, _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            decay = (-h - eta_h).expm1().neg()
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + decay * x0
            if x0_prev is not None:
                x = x + 0.5 * decay * (1 / (h_last / h)) * (x0 - x0_prev)
            if eta:
                z = _draw(noise, x, sigmas[i], sigmas[i + 1])
                x = x + z * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        x0_prev = x0
        report(callback, i, x, grid.sigmas[i], x0)
    return x


def sample_edm_dpmpp_3m_sde(
    denoise: Denoiser,
    x: Tensor,
    grid: EdmGrid,
    *,
    noise: NoiseSource,
    callback: StepCallback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE. One draw per step but the last (none when ``eta`` is 0); the
    last step returns the clean estimate."""
    x, sigmas = _edm_start(x, grid)
    x0_1 = x0_2 = None
    h = h_1 = h_2 = None
    for i in range(grid.num_steps):
        x0 = denoise(x, grid.sigmas[i])
        if grid.sigmas[i + 1] == 0:
            x = x0
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * x0
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((x0 - x0_1) / (h_1 / h))
            if eta:
                z = _draw(noise, x, sigmas[i], sigmas[i + 1])
                x = x + z * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        x0_1, x0_2 = x0, x0_1
        h_1, h_2 = h, h_1
        report(callback, i, x, grid.sigmas[i], x0)
    return x


