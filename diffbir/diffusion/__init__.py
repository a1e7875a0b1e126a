"""Diffusion math: noise schedules, samplers and restoration guidance."""

from diffbir.diffusion.guidance import RestorationGuidance, region_weight_map
from diffbir.diffusion.samplers import (
    StepOutput,
    cfg_denoiser,
    ddim_step,
    eps_from_x0,
    gaussian_noise,
    noise_like,
    posterior_mean_variance,
    predict_x0_and_eps,
    sample_ddim,
    sample_spaced_ddpm,
    spaced_ddpm_step,
)
from diffbir.diffusion.schedule import (
    NoiseSchedule,
    SpacedSchedule,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

__all__ = [
    "NoiseSchedule",
    "RestorationGuidance",
    "SpacedSchedule",
    "StepOutput",
    "cfg_denoiser",
    "ddim_step",
    "eps_from_x0",
    "gaussian_noise",
    "noise_like",
    "posterior_mean_variance",
    "predict_x0_and_eps",
    "region_weight_map",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_spaced_ddpm",
    "spaced_ddpm_step",
    "spaced_timesteps",
]
