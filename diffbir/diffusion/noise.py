"""Noise sources: where every standard-normal draw of a sampling run comes from.

A source is called ``noise(like, level=None, next_level=None)`` once per draw and returns a
standard-normal tensor with the shape, device and dtype of ``like``. Samplers call it exactly
where the official code draws (even when the draw is unused), so that a recorded stream can be
fed in. The levels are the step's noise levels (EDM sigmas): the Gaussian streams ignore them,
a :class:`BrownianNoise` returns the normalised increment of its path between them.

A run's stream (:class:`NoiseStream`: per-image, official or recorded) also yields, when a
sampler that needs one starts, the Brownian path that sampler draws from
(:meth:`NoiseStream.brownian`); :meth:`~diffbir.diffusion.samplers.SamplerSpec.sample` asks
for it, so neither the samplers nor the pipeline know which sampler needs what.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Protocol

import torch
import torchsde
from torch import Tensor

# The official tree's seed: torch.randint(0, ENTROPY_HIGH, []) from the run's generator.
ENTROPY_HIGH = 2**63 - 1


class NoiseSource(Protocol):
    """What a sampler draws from: one standard-normal tensor like ``like`` per call."""

    def __call__(
        self, like: Tensor, level: float | None = None, next_level: float | None = None
    ) -> Tensor: ...


class NoiseStream(NoiseSource, Protocol):
    """A run's noise: Gaussian draws in order, and the Brownian path of an SDE sampler."""

    def brownian(self, like: Tensor, sigma_min: float, sigma_max: float) -> NoiseSource:
        """The source of a sampler that draws Brownian increments over [sigma_min, sigma_max]
        (called when that sampler starts, after x_T and the noise augmentation)."""
        ...


def draw_entropy(generator: torch.Generator) -> int:
    """A tree seed as the official draws it: ``torch.randint(0, 2**63 - 1, [])``."""
    return int(torch.randint(0, ENTROPY_HIGH, (), generator=generator, device=generator.device))


class BrownianNoise:
    """Normalised increments of Brownian paths over [sigma_min, sigma_max] (torchsde trees).

    ``entropy`` an int: one tree over ``like``'s whole batch (the official's); a sequence: one
    tree per batch item, each of one item's shape, outputs concatenated (an item's noise does
    not depend on its batch). The trees live on ``device`` in float32 (a CPU tree gives the
    same path whatever the device of ``like``). ``noise(like, a, b)`` is ``W(b) - W(a)`` over
    ``sqrt(|b - a|)``, as the official computes it (levels as float32, torchsde's defaults), so
    draws over overlapping intervals of one step are increments of one path.
    """

    def __init__(
        self,
        like: Tensor,
        sigma_min: float,
        sigma_max: float,
        entropy: int | Sequence[int],
        device: torch.device | str = "cpu",
    ) -> None:
        per_item = not isinstance(entropy, int)
        seeds = list(entropy) if per_item else [entropy]
        if per_item and len(seeds) != like.shape[0]:
            raise ValueError(f"noise: a batch of {like.shape[0]} for {len(seeds)} tree seeds")
        shape = (1, *like.shape[1:]) if per_item else like.shape
        w0 = torch.zeros(shape, dtype=torch.float32, device=device)
        low, high = float(sigma_min), float(sigma_max)
        self.trees = [torchsde.BrownianTree(low, w0, high, entropy=s) for s in seeds]

    def __call__(
        self, like: Tensor, level: float | None = None, next_level: float | None = None
    ) -> Tensor:
        if level is None or next_level is None:
            raise ValueError("Brownian noise: a draw needs the step's two noise levels")
        a = torch.tensor(level, dtype=torch.float32)  # the levels as the official's float32 grid
        b = torch.tensor(next_level, dtype=torch.float32)
        low, high, sign = (a, b, 1) if a < b else (b, a, -1)
        with warnings.catch_warnings():  # a float32 log/exp round trip may leave the range
            warnings.filterwarnings("ignore", "Should have", UserWarning)  # by an ulp: clamped
            increment = torch.cat([tree(low, high) for tree in self.trees]) * sign
        if increment.shape != like.shape:
            raise ValueError(
                f"Brownian noise: the path has shape {tuple(increment.shape)}, "
                f"a draw like {tuple(like.shape)} was asked"
            )
        increment = increment / (b - a).abs().sqrt()
        return increment.to(device=like.device, dtype=like.dtype)


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
    draw per image, so an image's noise does not depend on the batch it is in. The Brownian path
    is one tree per image, seeded by a draw of that image's generator."""

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

    def brownian(self, like: Tensor, sigma_min: float, sigma_max: float) -> NoiseSource:
        seeds = [draw_entropy(g) for g in self.generators]
        return BrownianNoise(like, sigma_min, sigma_max, seeds, self.generators[0].device)


class OfficialNoise:
    """One stream for the whole batch, drawn in the official order (``torch.manual_seed(seed)``
    then ``randn`` of the whole batch at each draw), from a seed or a given generator. The
    Brownian path is one tree over the whole batch, seeded by the next draw of the stream."""

    def __init__(self, seed: int | torch.Generator, device: torch.device | str = "cpu") -> None:
        if isinstance(seed, torch.Generator):
            self.generator = seed
        else:
            self.generator = torch.Generator(device).manual_seed(int(seed))

    def __call__(
        self, like: Tensor, level: float | None = None, next_level: float | None = None
    ) -> Tensor:
        return gaussian_noise(like.shape, self.generator, device=like.device, dtype=like.dtype)

    def brownian(self, like: Tensor, sigma_min: float, sigma_max: float) -> NoiseSource:
        seed = draw_entropy(self.generator)
        return BrownianNoise(like, sigma_min, sigma_max, seed, self.generator.device)


class RecordedNoise:
    """Replays recorded draws in order (tests); raises when asked for more than were recorded.
    ``remaining`` tells whether the stream was used up. Its Brownian path is itself: recorded
    increments replay in order like any draw."""

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

    def brownian(self, like: Tensor, sigma_min: float, sigma_max: float) -> NoiseSource:
        return self
