"""Inference: the two-stage pipeline, tiling, image I/O and the ``diffbir-infer`` CLI."""

from diffbir.pipeline.device import PRECISIONS, resolve_device, retain_cpu_heap
from diffbir.pipeline.loading import TASKS, WeightPaths, build_restorer, resolve_weight_paths
from diffbir.pipeline.restorer import (
    DEFAULT_NEG_PROMPT,
    GuidanceOptions,
    RestoreOptions,
    Restorer,
    RestoreResult,
    SamplerOptions,
    Stage1,
    TileOptions,
)

__all__ = [
    "DEFAULT_NEG_PROMPT",
    "PRECISIONS",
    "GuidanceOptions",
    "RestoreOptions",
    "RestoreResult",
    "Restorer",
    "SamplerOptions",
    "Stage1",
    "TASKS",
    "TileOptions",
    "WeightPaths",
    "build_restorer",
    "resolve_device",
    "resolve_weight_paths",
    "retain_cpu_heap",
]
