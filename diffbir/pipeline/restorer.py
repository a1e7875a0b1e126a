"""The two-stage restoration of image tensors: stage 1 (:class:`~.cleaner.Cleaner`) makes the
condition image, stage 2 samples a latent towards it (:class:`~.sampling.LatentSampler`), the
VAE (:class:`~.codec.LatentCodec`) encodes and decodes, then the colour fix and the resize to
the output size. The Restorer knows nothing of files or command lines; the models it gets are
already placed (device and dtype are read from them).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffbir.diffusion.noise import NoiseStream, PerImageNoise
from diffbir.diffusion.schedule import NoiseSchedule, Parameterization
from diffbir.pipeline.cleaner import Cleaner, target_size
from diffbir.pipeline.codec import LatentCodec
from diffbir.pipeline.color import color_fix
from diffbir.pipeline.options import RestoreOptions
from diffbir.pipeline.resize import resize_bicubic
from diffbir.pipeline.sampling import LatentSampler, StepCallback


@dataclass
class RestoreResult:
    """``condition``: the stage-1 condition resized to the output size (B, 3, H, W);
    ``samples``: (B, S, 3, H, W); all in [0, 1], float32, CPU."""

    condition: Tensor
    samples: Tensor

    @property
    def images(self) -> Tensor:
        """The first sample of each input, (B, 3, H, W)."""
        return self.samples[:, 0]


class Restorer:
    """Two-stage restoration with a ControlLDM (see :mod:`diffbir.models.control_ldm`) and a
    stage-1 :class:`Cleaner`, both placed on their device in their dtypes beforehand.

    ``schedule`` (default: the SD linear one) and ``parameterization`` describe the model: what
    it was trained on and whether it predicts eps or v (v2.1: v, zero SNR).
    """

    def __init__(
        self,
        cldm: nn.Module,
        cleaner: Cleaner,
        *,
        schedule: NoiseSchedule | None = None,
        parameterization: Parameterization = "eps",
        compile: bool = False,
    ) -> None:
        self.cldm = cldm.eval().requires_grad_(False)
        self.cleaner = cleaner
        self.codec = LatentCodec(self.cldm)
        self.sampler = LatentSampler(
            self.cldm, schedule or NoiseSchedule.linear(), parameterization, compile=compile
        )

    def with_cleaner(self, cleaner: Cleaner) -> Restorer:
        """This restorer with another stage 1; the ControlLDM, codec and sampler are shared."""
        other = copy.copy(self)
        other.cleaner = cleaner
        return other

    @property
    def device(self) -> torch.device:
        """Where the UNet is (and every tensor of a restoration)."""
        return next(self.cldm.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet runs in (the precision of the run)."""
        return next(self.cldm.unet.parameters()).dtype

    @property
    def schedule(self) -> NoiseSchedule:
        return self.sampler.schedule

    @property
    def parameterization(self) -> Parameterization:
        return self.sampler.parameterization

    def condition(self, lq: Tensor, options: RestoreOptions) -> Tensor:
        """Stage 1: the condition images (B, 3, h, w) of low-quality images (B, 3, H, W)."""
        return self.cleaner.condition(lq.to(self.device), options)

    def condition_latent(self, cond: Tensor, options: RestoreOptions) -> Tensor:
        """The condition latents (padded) of condition images."""
        return self.codec.condition_latent(cond.to(self.device), options.tiles)

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        seeds: Sequence[int],
        options: RestoreOptions,
        pos_prompts: Sequence[str] | None = None,
        noise: NoiseStream | None = None,
        trace: dict[str, Tensor] | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """The final latents (padding cropped) for condition images (N, 3, h, w), a seed per
        item (``noise`` default: :class:`PerImageNoise` of ``seeds``; the official seed mode
        passes :class:`~diffbir.diffusion.noise.OfficialNoise`); ``pos_prompts``: one positive
        prompt per item (default: ``options.pos_prompt``). See :meth:`LatentSampler.sample`."""
        count = cond.shape[0]
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} condition images")
        if pos_prompts is None:
            pos_prompts = [options.pos_prompt] * count
        if len(pos_prompts) != count:
            raise ValueError(f"{len(pos_prompts)} prompts for {count} condition images")
        cond = cond.to(device=self.device, dtype=torch.float32)
        latent = self.codec.condition_latent(cond, options.tiles)
        noise = noise or PerImageNoise(seeds)
        return self.sampler.sample(
            cond, latent, pos_prompts, options, noise, trace=trace, callback=callback
        )

    @torch.no_grad()
    def finish(
        self, z: Tensor, cond: Tensor, options: RestoreOptions, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Final latents -> images in [0, 1] at ``size`` (default: the condition's size), as the
        official code: decode, crop the padding, colour-fix towards the (unclamped) condition
        ``cond``, resize (bicubic, antialiased), and clamp only then."""
        cond = cond.to(device=self.device, dtype=torch.float32)
        height, width = cond.shape[-2:]
        decoded = self.codec.decode(z, options.tiles)[..., :height, :width]
        image = color_fix((decoded + 1) / 2, cond, options.color_fix)
        return resize_bicubic(image, size or (height, width)).clamp(0, 1)

    def restore(
        self,
        lq: Tensor,
        seeds: Sequence[int | Sequence[int]],
        options: RestoreOptions,
        pos_prompts: Sequence[str] | None = None,
        noise: NoiseStream | None = None,
        callback: StepCallback | None = None,
    ) -> RestoreResult:
        """Restore a batch (B, 3, H, W) in [0, 1].

        ``seeds[b]`` is the seed of input ``b`` (one sample) or a list of seeds (one per sample).
        ``pos_prompts[b]``: the positive prompt of input ``b`` (default: ``options.pos_prompt``).
        ``noise`` and ``callback``: see :meth:`sample`.
        """
        seeds = [[s] if isinstance(s, int) else list(s) for s in seeds]
        if len(seeds) != lq.shape[0] or len({len(s) for s in seeds}) > 1:
            raise ValueError("seeds: expected one list of equally many seeds per input image")
        samples = len(seeds[0])
        size = target_size(*lq.shape[-2:], options.upscale)
        cond = self.condition(lq, options)
        flat_seeds = [s for per_image in seeds for s in per_image]
        flat_prompts = None
        if pos_prompts is not None:
            if len(pos_prompts) != lq.shape[0]:
                raise ValueError("pos_prompts: expected one prompt per input image")
            flat_prompts = [p for p in pos_prompts for _ in range(samples)]
        repeated = cond.repeat_interleave(samples, dim=0)
        z = self.sample(repeated, flat_seeds, options, flat_prompts, noise, callback=callback)
        out = self.finish(z, repeated, options, size)
        return RestoreResult(
            condition=resize_bicubic(cond, size).clamp(0, 1).cpu(),
            samples=out.cpu().view(lq.shape[0], samples, *out.shape[1:]),
        )
