"""Diffusion math: schedules and grids, samplers, denoisers, noise sources and guidance."""

from diffbir.diffusion.denoiser import GuidedModel, ModelDenoiser, rescaled_cfg_scale
from diffbir.diffusion.grids import DpmSolverGrid, EdmGrid
from diffbir.diffusion.guidance import RestorationGuidance, region_weight_map, with_guidance
from diffbir.diffusion.noise import (
    BrownianNoise,
    OfficialNoise,
    PerImageNoise,
    RecordedNoise,
    gaussian_noise,
)
from diffbir.diffusion.samplers import SAMPLERS, SamplerSpec
from diffbir.diffusion.schedule import (
    NoiseLevel,
    NoiseSchedule,
    Parameterization,
    SpacedSchedule,
    ddim_timesteps,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

__all__ = [
    "SAMPLERS",
    "BrownianNoise",
    "DpmSolverGrid",
    "EdmGrid",
    "GuidedModel",
    "ModelDenoiser",
    "NoiseLevel",
    "NoiseSchedule",
    "OfficialNoise",
    "Parameterization",
    "PerImageNoise",
    "RecordedNoise",
    "RestorationGuidance",
    "SamplerSpec",
    "SpacedSchedule",
    "ddim_timesteps",
    "gaussian_noise",
    "region_weight_map",
    "rescale_zero_terminal_snr",
    "rescaled_cfg_scale",
    "spaced_timesteps",
    "with_guidance",
]
