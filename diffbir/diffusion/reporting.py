"""What a sampler tells its caller after each step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

StepCallback = Callable[[dict[str, Any]], None]


def report(callback: StepCallback | None, i: int, x: Tensor, level: Any, denoised: Tensor) -> None:
    """``callback({"i", "x", "level", "denoised"})`` when there is a callback."""
    if callback is not None:
        callback({"i": i, "x": x, "level": level, "denoised": denoised})
