"""Stage 2: sampling SD 2.1 + IRControlNet towards the condition latent.

The denoiser is built as a fixed chain, then one registry call: the model (tiled when asked)
-> classifier-free guidance (one batched forward) -> eps/v to x0 -> restoration guidance on x0;
``SAMPLERS[name].sample(denoise, x_T, grid, noise=...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffbir.diffusion.denoiser import ConditionalModel, GuidedModel, ModelDenoiser
from diffbir.diffusion.grids import Grid
from diffbir.diffusion.guidance import Guidance, RestorationGuidance, with_guidance
from diffbir.diffusion.noise import NoiseStream
from diffbir.diffusion.samplers import SAMPLERS
from diffbir.diffusion.schedule import NoiseSchedule, Parameterization, check_parameterization
from diffbir.pipeline.codec import latent_size
from diffbir.pipeline.options import LATENT_FACTOR, RestoreOptions
from diffbir.pipeline.tiling import TILE_WEIGHTS, TiledGuidance, TiledModel

StepCallback = Callable[[dict[str, Any]], None]


class LatentSampler:
    """Samples final latents with a ControlLDM, any sampler of the registry, CFG and optional
    restoration guidance; ``schedule`` and ``parameterization`` describe the model (what it
    was trained on, eps or v prediction); ``compile``: ``torch.compile`` UNet + IRControlNet."""

    def __init__(
        self,
        cldm: nn.Module,
        schedule: NoiseSchedule,
        parameterization: Parameterization,
        *,
        compile: bool = False,
    ) -> None:
        check_parameterization(parameterization)
        self.cldm = cldm
        self.forward: nn.Module = torch.compile(cldm) if compile else cldm
        self.schedule = schedule
        self.parameterization = parameterization
        self._grids: dict[tuple[str, int], Grid] = {}

    def grid(self, sampler: str, steps: int) -> Grid:
        """The level grid of ``sampler`` for ``steps`` (built once per sampler and step count)."""
        key = (sampler, steps)
        if key not in self._grids:
            self._grids[key] = SAMPLERS[sampler].make_grid(self.schedule, steps)
        return self._grids[key]

    def _guidance(
        self, target: Tensor, options: RestoreOptions, latent_hw: tuple[int, int]
    ) -> Guidance | None:
        g = options.guidance
        if g.scale <= 0:
            return None

        def make(image: Tensor) -> RestorationGuidance:
            return RestorationGuidance(
                image,
                g.scale,
                space=g.space,
                loss=g.loss,
                t_start=g.start,
                t_stop=g.stop,
                repeat=g.repeat,
                decode=lambda z: self.cldm.vae_decode(z).float(),
                encode=lambda img: self.cldm.vae_encode(img).float(),
            )

        tile = options.tiles.diffusion
        if tile is None:
            return make(target)
        stride = options.tiles.diffusion_stride or max(LATENT_FACTOR, tile // 2)
        f = LATENT_FACTOR
        return TiledGuidance(
            lambda y0, y1, x0, x1: make(target[..., f * y0 : f * y1, f * x0 : f * x1]),
            latent_hw,
            tile // f,
            stride // f,
            TILE_WEIGHTS[options.tiles.weights],
        )

    def _model_fn(self, options: RestoreOptions, dtype: torch.dtype) -> ConditionalModel:
        def model_fn(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            return self.forward(x.to(dtype), t, cond, control_strength=options.strength).float()

        tile = options.tiles.diffusion
        if tile is None:
            return model_fn
        stride = options.tiles.diffusion_stride or max(LATENT_FACTOR, tile // 2)
        weight = TILE_WEIGHTS[options.tiles.weights]
        return TiledModel(model_fn, tile // LATENT_FACTOR, stride // LATENT_FACTOR, weight)

    def _text_condition(self, pos_prompts: Sequence[str], neg_prompt: str) -> tuple[Tensor, Tensor]:
        """Text embeddings (N, 77, C) per item and of the negative prompt (1, 77, C), each
        distinct prompt encoded once, all in one batch."""
        distinct = list(dict.fromkeys([*pos_prompts, neg_prompt]))
        texts = self.cldm.encode_text(distinct)
        index = torch.tensor([distinct.index(p) for p in pos_prompts], device=texts.device)
        return texts[index], texts[distinct.index(neg_prompt)][None]

    def _diffused(self, latent: Tensor, t: int, noise: NoiseStream) -> Tensor:
        """``latent`` diffused to timestep ``t`` with a draw of ``noise``."""
        steps = torch.full((latent.shape[0],), t, dtype=torch.long, device=latent.device)
        return self.schedule.q_sample(latent, steps, noise(latent))

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        latent: Tensor,
        pos_prompts: Sequence[str],
        options: RestoreOptions,
        noise: NoiseStream,
        *,
        trace: dict[str, Tensor] | None = None,
        callback: StepCallback | None = None,
    ) -> Tensor:
        """The final latents (padding cropped) for condition images ``cond`` (N, 3, h, w) and
        their condition latents ``latent`` (:meth:`LatentCodec.condition_latent`).

        ``noise`` gives x_T, then the noise augmentation, then the sampler's draws, in the
        official order. ``trace`` (if given) receives ``cond_latent`` and ``x_T``; ``callback``
        gets ``{"i", "total", "x", "level", "denoised"}`` after each step.
        """
        count, _, height, width = cond.shape
        sampler = options.sampler
        dtype = next(self.cldm.unet.parameters()).dtype
        f = LATENT_FACTOR  # the condition image zero-padded to the latent's size, as official
        cond_pad = F.pad(cond, (0, f * latent.shape[-1] - width, 0, f * latent.shape[-2] - height))
        if sampler.start_point == "cond":
            x_T = self._diffused(latent, self.schedule.num_timesteps - 1, noise)
        else:
            x_T = noise(latent)
        if trace is not None:
            trace.update(cond_latent=latent, x_T=x_T)
        if sampler.noise_aug > 0:
            latent = self._diffused(latent, sampler.noise_aug, noise)
        pos_text, neg_text = self._text_condition(pos_prompts, options.neg_prompt)
        cond_dict = self.cldm.condition(pos_text, cond_pad, latent.to(dtype))
        uncond = {**cond_dict, "text": neg_text.expand(count, -1, -1)}

        grid = self.grid(sampler.name, options.steps)
        model = GuidedModel(
            self._model_fn(options, dtype),
            cond_dict,
            uncond,
            options.cfg_scale,
            rescale=sampler.rescale_cfg,
        )
        denoise = ModelDenoiser(model, grid, self.parameterization)
        guidance = self._guidance(cond_pad, options, latent.shape[-2:])
        if guidance is not None:
            denoise = with_guidance(denoise, guidance, grid)
        step = None
        if callback is not None:
            total = grid.num_steps

            def step(info: dict[str, Any]) -> None:
                callback({**info, "total": total})

        z = SAMPLERS[sampler.name].sample(
            denoise, x_T, grid, noise=noise, callback=step, **sampler.knobs
        )
        crop_h, crop_w = latent_size(height, width, options.tiles, sampled=False)
        return z[..., :crop_h, :crop_w]
