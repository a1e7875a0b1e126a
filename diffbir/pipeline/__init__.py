"""Inference: the two-stage restoration (cleaner, latent codec, sampler), the options, the one
runner behind every way of running it, and the ``diffbir-infer`` CLI."""

from diffbir.pipeline.cleaner import Cleaner
from diffbir.pipeline.device import PRECISIONS, resolve_device, retain_cpu_heap
from diffbir.pipeline.faces import FaceRestorer
from diffbir.pipeline.loading import (
    TASKS,
    WeightPaths,
    build_from_config,
    build_restorer,
    resolve_weight_paths,
)
from diffbir.pipeline.options import (
    CaptionOptions,
    FaceOptions,
    GuidanceOptions,
    InferenceConfig,
    RestoreOptions,
    RunOptions,
    SamplerOptions,
    TileOptions,
)
from diffbir.pipeline.restorer import Restorer, RestoreResult

__all__ = [
    "PRECISIONS",
    "TASKS",
    "CaptionOptions",
    "Cleaner",
    "FaceOptions",
    "FaceRestorer",
    "GuidanceOptions",
    "InferenceConfig",
    "RestoreOptions",
    "RestoreResult",
    "Restorer",
    "RunOptions",
    "SamplerOptions",
    "TileOptions",
    "WeightPaths",
    "build_from_config",
    "build_restorer",
    "resolve_device",
    "resolve_weight_paths",
    "retain_cpu_heap",
]
