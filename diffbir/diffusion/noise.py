"""Noise sources: where every standard-normal draw of a sampling run comes from.

A source is called ``noise(like, level=None, next_level=None)`` once per draw and returns a
standard-normal tensor with the shape, device and dtype of ``like``. Samplers call it exactly
where the official code draws (even when the draw is unused), so that a recorded stream can be
fed in. The levels are the step's noise levels; the sources here ignore them (a Brownian tree
would read them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor


class NoiseSource(Protocol):
    def __call__(
        self, like: Tensor, level: float | None = None, next_level: float | None = None
    ) -> Tensor: ...


def gaussian_noise(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise drawn on the generator's device in float32, then moved to
    ``device``/``dtype``: a seeded CPU generator gives the same noise whatever the device."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    return noise.to(device=device, dtype=dtype)


class PerImageNoise:
    """One generator per image (seeded from ``seeds``); each draw is the concatenation of one
    draw per image, so an image's noise does not depend on the batch it is in."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def __call__(
        self, like: Tensor, level: float | None = None, next_level: float | None = None
    ) -> Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"noise: a batch of {like.shape[0]} for {len(self.generators)} seeds")
        shape = (1, *like.shape[1:])
        return torch.cat(
            [
                gaussian_noise(shape, g, device=like.device, dtype=like.dtype)
                for g in self.generators
            ]
        )


class OfficialNoise:
    """One stream for the whole batch, drawn in the official order (``torch.manual_seed(seed)``
    then ``randn`` of the whole batch at each draw), from a seed or a given generator."""

    def __init__(self, seed: int | torch.Generator, device: torch.device | str = "cpu") -> None:
        if isinstance(seed, torch.Generator):
            self.generator = seed
        else:
            self.generator = torch.Generator(device).manual_seed(int(seed))

    def __call__(
        self, like: Tensor, level: float | None = None, next_level: float | None = None
    ) -> Tensor:
        return gaussian_noise(like.shape, self.generator, device=like.device, dtype=like.dtype)


class RecordedNoise:
    """Replays recorded draws in order (tests); raises when asked for more than were recorded.
    ``remaining`` tells whether the stream was used up."""

    def __init__(self, draws: Sequence[Tensor]) -> None:
        self.draws = list(draws)
        self.used = 0

    @property
    def remaining(self) -> int:
        return len(self.draws) - self.used

    def __call__(
        self, like: Tensor, level: float | None = None, next_level: float | None = None
    ) -> Tensor:
        if self.used == len(self.draws):
            raise RuntimeError(f"recorded noise: all {len(self.draws)} draws are used up")
        draw = self.draws[self.used]
        if draw.shape != like.shape:
            raise ValueError(
                f"recorded noise: draw {self.used} has shape {tuple(draw.shape)}, "
                f"expected {tuple(like.shape)}"
            )
        self.used += 1
        return draw.to(device=like.device, dtype=like.dtype)
