"""The two-stage restoration pipeline on image tensors.

Stage 1 (a cleaner such as BSRNet, SCUNet or SwinIR) removes the degradations; its output is the
condition of stage 2: sampling of SD 2.1 + IRControlNet with any sampler of
:data:`~diffbir.diffusion.samplers.SAMPLERS`, classifier-free guidance, optional restoration
guidance, then the colour fix and the resize to the output size. Sizes, resizes, padding and
clamps are the official ones (SPEC "Image sizes", :mod:`.resize`): the output is
``int(upscale * size)``; the condition is enlarged so that its short side is at least
``min_side`` (512); stage-2 inputs are zero-padded to a multiple of 64 (8 when the VAE encoder or
the diffusion is tiled) and cropped after decoding; nothing is clamped before the final image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from diffbir.diffusion.denoiser import ConditionalModel, GuidedModel, ModelDenoiser
from diffbir.diffusion.grids import Grid
from diffbir.diffusion.guidance import Guidance, RestorationGuidance, with_guidance
from diffbir.diffusion.noise import NoiseSource, PerImageNoise
from diffbir.diffusion.samplers import SAMPLERS
from diffbir.diffusion.schedule import NoiseSchedule, Parameterization, check_parameterization
from diffbir.pipeline.color import COLOR_FIXES, color_fix
from diffbir.pipeline.precision import place_models
from diffbir.pipeline.resize import (
    enlarge_short_side,
    pad_to_multiple,
    resize_bicubic,
    resize_pil_bicubic,
    scaled_size,
    short_side_size,
)
from diffbir.pipeline.tiling import TILE_WEIGHTS, TiledGuidance, TiledModel, run_tiled
from diffbir.versions import V2_NEG_PROMPT

DEFAULT_NEG_PROMPT = V2_NEG_PROMPT  # RestoreOptions defaults are the paper's (v2)
LATENT_FACTOR = 8
MAX_STEPS = 1000  # the training timesteps of every SD version: spaced sampling takes at most all

# options field -> the diffbir-infer flag that sets it, so that an error names what was typed
OPTION_FLAGS = {
    "upscale": "--upscale",
    "steps": "--steps",
    "cfg_scale": "--cfg-scale",
    "strength": "--strength",
    "min_side": "--min-side",
    "color_fix": "--color-fix",
    "scale": "--g-scale",
    "loss": "--g-loss",
    "space": "--g-space",
    "start": "--g-start",
    "stop": "--g-stop",
    "repeat": "--g-repeat",
}


def _check_number(
    options: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    """Raise ValueError ``<flag>: expected <range>, got <value>`` unless the field is a finite
    number (an int for int fields) in range."""
    value = getattr(options, name)
    flag = OPTION_FLAGS.get(name, name)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    wants_int = isinstance(low, int) or isinstance(high, int)
    if wants_int and not is_int:
        raise ValueError(f"{flag}: expected an integer, got {value!r}")
    if not (is_int or isinstance(value, float)) or not math.isfinite(value):
        raise ValueError(f"{flag}: expected a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        if low is not None and high is not None:
            expected = f"{low}..{high}"
        else:
            expected = f"> {low}" if low_open else f">= {low}" if low is not None else f"<= {high}"
        raise ValueError(f"{flag}: expected {expected}, got {value}")


def _check_choice(options: object, name: str, choices: Sequence[str]) -> None:
    value = getattr(options, name)
    if value not in choices:
        flag = OPTION_FLAGS.get(name, name)
        raise ValueError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class GuidanceOptions:
    """Restoration guidance (paper §3.4); ``scale`` 0 turns it off (the official ``--g_*``)."""

    scale: float = 0.0
    loss: str = "w_mse"
    space: str = "rgb"
    start: int = 1001
    stop: int = -1
    repeat: int = 1

    def __post_init__(self) -> None:
        _check_choice(self, "loss", ("w_mse", "mse"))
        _check_choice(self, "space", ("rgb", "latent"))
        _check_number(self, "scale", low=0.0)
        _check_number(self, "repeat", low=1)
        _check_number(self, "start")
        _check_number(self, "stop")


VAE_SHARED_NORM = ("encoder", "decoder", "both", "none")
_TILE_FLAGS = {
    "stage1": "--stage1-tile",
    "stage1_stride": "--stage1-tile-stride",
    "vae_encoder": "--vae-encoder-tile",
    "vae_decoder": "--vae-decoder-tile",
    "diffusion": "--diffusion-tile",
    "diffusion_stride": "--diffusion-tile-stride",
}


@dataclass(frozen=True)
class TileOptions:
    """Tile sizes in image pixels (``None``: untiled). Strides default to half the tile
    (stage 1, diffusion) or three quarters of it (VAE)."""

    stage1: int | None = None
    stage1_stride: int | None = None
    vae_encoder: int | None = None
    vae_decoder: int | None = None
    diffusion: int | None = None
    diffusion_stride: int | None = None
    # VAE parts whose GroupNorms use whole-image statistics when tiled (see run_tiled)
    vae_shared_norm: str = "encoder"
    # blending weights of overlapping tiles (tiling.TILE_WEIGHTS)
    weights: str = "official"

    def __post_init__(self) -> None:
        if self.weights not in TILE_WEIGHTS:
            raise ValueError(
                f"--tile-weights: expected one of {sorted(TILE_WEIGHTS)}, got {self.weights!r}"
            )
        if self.vae_shared_norm not in VAE_SHARED_NORM:
            raise ValueError(
                f"--vae-shared-norm: expected one of {VAE_SHARED_NORM}, "
                f"got {self.vae_shared_norm!r}"
            )
        for name in ("vae_encoder", "vae_decoder", "diffusion", "diffusion_stride"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % LATENT_FACTOR):
                raise ValueError(
                    f"{_TILE_FLAGS[name]}: expected a positive multiple of 8, got {value}"
                )
        for name in ("stage1", "stage1_stride"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{_TILE_FLAGS[name]}: expected > 0, got {value}")
        for name in ("stage1", "diffusion"):
            tile, stride = getattr(self, name), getattr(self, f"{name}_stride")
            if tile is None and stride is not None:
                raise ValueError(
                    f"{_TILE_FLAGS[f'{name}_stride']}: only used with {_TILE_FLAGS[name]} (or "
                    f"--tiled), got {stride} without it"
                )
            if tile is not None and stride is not None and stride > tile:
                raise ValueError(
                    f"{_TILE_FLAGS[f'{name}_stride']}: expected <= {_TILE_FLAGS[name]} {tile} "
                    f"(a larger stride leaves gaps), got {stride}"
                )


SAMPLER_KNOB_FLAGS = {
    "s_churn": "--s-churn",
    "s_tmin": "--s-tmin",
    "s_tmax": "--s-tmax",
    "s_noise": "--s-noise",
    "eta": "--eta",
    "order": "--order",
}
START_POINTS = ("noise", "cond")


@dataclass(frozen=True)
class SamplerOptions:
    """The sampler and its options (the official ``--sampler`` and friends).

    Knobs left ``None`` take the sampler's default (the official CLI's: s_churn 0, s_tmin 0,
    s_tmax 300, s_noise 1, eta 1, order 1); a knob the sampler lacks is an error. ``start_point``
    ``cond`` starts from the condition latent diffused to the last timestep; ``noise_aug`` T > 0
    diffuses the condition latent to timestep T (both branches of CFG).
    """

    name: str = "spaced"
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    eta: float | None = None
    order: int | None = None
    rescale_cfg: bool = False
    start_point: str = "noise"
    noise_aug: int = 0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {self.name!r}")
        SAMPLERS[self.name].check_knobs(self.knobs, SAMPLER_KNOB_FLAGS)
        for knob, value in self.knobs.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"{SAMPLER_KNOB_FLAGS[knob]}: expected a finite value >= 0, got {value}"
                )
        if self.order is not None and (int(self.order) != self.order or self.order < 1):
            raise ValueError(f"--order: expected an integer >= 1, got {self.order}")
        if self.start_point not in START_POINTS:
            raise ValueError(
                f"--start-point: expected one of {START_POINTS}, got {self.start_point!r}"
            )
        if not 0 <= self.noise_aug < 1000:
            raise ValueError(f"--noise-aug: expected a timestep in 0..999, got {self.noise_aug}")

    @property
    def knobs(self) -> dict[str, float]:
        """The knobs that were given (not None), as keyword arguments of the sampler."""
        return {k: getattr(self, k) for k in SAMPLER_KNOB_FLAGS if getattr(self, k) is not None}


@dataclass(frozen=True)
class RestoreOptions:
    """Everything that decides a restoration besides the models and the seed."""

    upscale: float = 1.0
    steps: int = 50
    cfg_scale: float = 4.0
    pos_prompt: str = ""
    neg_prompt: str = DEFAULT_NEG_PROMPT
    strength: float = 1.0
    guidance: GuidanceOptions = field(default_factory=GuidanceOptions)
    color_fix: str = "wavelet"
    min_side: int = 512
    tiles: TileOptions = field(default_factory=TileOptions)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    progress: bool = False

    def __post_init__(self) -> None:
        _check_number(self, "upscale", low=0.0, low_open=True)
        _check_number(self, "steps", low=2, high=MAX_STEPS)
        _check_number(self, "cfg_scale")
        _check_number(self, "strength", low=0.0)
        _check_number(self, "min_side", low=0)
        _check_choice(self, "color_fix", COLOR_FIXES)


@dataclass
class Stage1:
    """A stage-1 cleaner (``None``: the input is only resized), run as the official code runs it.

    ``resize_first``: a same-size cleaner (SwinIR, SCUNet): the input is first resized to the
    output size (PIL bicubic on the 8-bit image); otherwise (BSRNet x4) the model's output is
    resized, once, to the stage-2 size. ``enlarge_first``: a condition whose short side is below
    ``min_side`` is enlarged before the model (SwinIR, when not tiled) instead of after it.
    The model's ``size_multiple`` attribute (default 1; SwinIR: 64) is the multiple its input
    is zero-padded to; the output is cropped back.
    """

    model: nn.Module | None
    resize_first: bool = False
    enlarge_first: bool = False


@dataclass
class RestoreResult:
    """``stage1``: the stage-1 condition resized to the output size (B, 3, H, W);
    ``samples``: (B, S, 3, H, W); all in [0, 1], float32, CPU."""

    stage1: Tensor
    samples: Tensor

    @property
    def images(self) -> Tensor:
        """The first sample of each input, (B, 3, H, W)."""
        return self.samples[:, 0]


def target_size(height: int, width: int, upscale: float) -> tuple[int, int]:
    """The output size for an input of ``height`` x ``width`` (official: truncated)."""
    return scaled_size(height, width, upscale)


def pad_multiple(tiles: TileOptions) -> int:
    """Stage-2 condition images are zero-padded to this multiple: 64, or 8 when the VAE encoder
    or the diffusion is tiled (official)."""
    return LATENT_FACTOR if tiles.vae_encoder is not None or tiles.diffusion is not None else 64


def latent_size(
    height: int, width: int, tiles: TileOptions, sampled: bool = True
) -> tuple[int, int]:
    """The latent size of a condition of ``height`` x ``width`` zero-padded to
    :func:`pad_multiple`; ``sampled``: the size sampled at, where (official) the latent is also
    zero-padded to a multiple of 8 unless the diffusion is tiled."""
    multiple = pad_multiple(tiles)
    size = [-(-side // multiple) * multiple // LATENT_FACTOR for side in (height, width)]
    if sampled and tiles.diffusion is None:
        size = [-(-side // 8) * 8 for side in size]
    return size[0], size[1]


class Restorer:
    """Two-stage restoration with a ControlLDM (see :mod:`diffbir.models.control_ldm`)."""

    def __init__(
        self,
        cldm: nn.Module,
        stage1: Stage1,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        schedule: NoiseSchedule | None = None,
        parameterization: Parameterization = "eps",
        compile: bool = False,
    ) -> None:
        """``schedule`` (default: the SD linear one) and ``parameterization`` describe the
        model: what it was trained on and whether it predicts eps or v (v2.1: v, zero SNR)."""
        check_parameterization(parameterization)
        self.device = torch.device(device)
        self.dtype = dtype
        self.cldm = cldm.eval().requires_grad_(False)
        place_models(self.cldm, stage1.model, self.device, dtype)
        # UNet + IRControlNet forward; torch.compile'd with ``compile``
        self.denoiser: nn.Module = torch.compile(self.cldm) if compile else self.cldm
        self.stage1_spec = stage1
        self.base_schedule = schedule or NoiseSchedule.linear()
        self.parameterization = parameterization
        self._grids: dict[tuple[str, int], Grid] = {}

    # ----- stage 1 -----
    def _clean(self, x: Tensor) -> Tensor:
        model = self.stage1_spec.model
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, getattr(model, "size_multiple", 1))
        y = model(padded.to(next(model.parameters()).dtype)).float()
        out_h = round(height * y.shape[-2] / padded.shape[-2])
        out_w = round(width * y.shape[-1] / padded.shape[-1])
        return y[..., :out_h, :out_w]

    @torch.no_grad()
    def stage1(self, lq: Tensor, options: RestoreOptions) -> Tensor:
        """The condition of stage 2 (B, 3, h, w), float32, not clamped: the stage-1 output at
        the output size, its short side enlarged to ``options.min_side`` if shorter."""
        lq = lq.to(device=self.device, dtype=torch.float32)
        size = target_size(*lq.shape[-2:], options.upscale)
        spec, min_side = self.stage1_spec, options.min_side
        if spec.model is None or spec.resize_first:
            lq = resize_pil_bicubic(lq, size)
        if spec.model is None:
            return enlarge_short_side(lq, min_side)
        tile = options.tiles.stage1
        if tile is not None and min(lq.shape[-2:]) < tile:
            tile = None  # as the official: an input smaller than a tile is not tiled
        if spec.enlarge_first and tile is None:
            lq = enlarge_short_side(lq, min_side)
        weight = TILE_WEIGHTS[options.tiles.weights]
        out = run_tiled(self._clean, lq, tile, options.tiles.stage1_stride, weight=weight)
        if spec.resize_first:
            return enlarge_short_side(out, min_side)
        if min(size) < min_side:
            return resize_bicubic(out, short_side_size(*out.shape[-2:], min_side))
        return resize_bicubic(out, size)

    # ----- VAE -----
    def _encode(self, image: Tensor, tiles: TileOptions) -> Tensor:
        tile = tiles.vae_encoder
        stride = None if tile is None else max(8, tile * 3 // 4 // 8 * 8)
        shared = self.cldm.vae.encoder if tiles.vae_shared_norm in ("encoder", "both") else None
        weight = TILE_WEIGHTS[tiles.weights]
        return run_tiled(self.cldm.vae_encode, image, tile, stride, LATENT_FACTOR, shared, weight)

    def _decode(self, z: Tensor, tiles: TileOptions) -> Tensor:
        tile = None if tiles.vae_decoder is None else tiles.vae_decoder // LATENT_FACTOR
        stride = None if tile is None else max(1, tile * 3 // 4)
        shared = self.cldm.vae.decoder if tiles.vae_shared_norm in ("decoder", "both") else None
        weight = TILE_WEIGHTS[tiles.weights]
        return run_tiled(self.cldm.vae_decode, z, tile, stride, shared_norms=shared, weight=weight)

    # ----- stage 2 -----
    def grid(self, sampler: str, steps: int) -> Grid:
        """The level grid of ``sampler`` for ``steps`` (built once per sampler and step count)."""
        key = (sampler, steps)
        if key not in self._grids:
            self._grids[key] = SAMPLERS[sampler].make_grid(self.base_schedule, steps)
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

    def _model_fn(self, options: RestoreOptions) -> ConditionalModel:
        def model_fn(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            x = x.to(self.dtype)
            return self.denoiser(x, t, cond, control_strength=options.strength).float()

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

    def _diffused(self, latent: Tensor, t: int, noise: NoiseSource) -> Tensor:
        """``latent`` diffused to timestep ``t`` with a draw of ``noise``."""
        steps = torch.full((latent.shape[0],), t, dtype=torch.long, device=latent.device)
        return self.base_schedule.q_sample(latent, steps, noise(latent))

    @torch.no_grad()
    def stage2(
        self,
        cond: Tensor,
        seeds: Sequence[int],
        options: RestoreOptions,
        size: tuple[int, int] | None = None,
        pos_prompts: Sequence[str] | None = None,
        noise: NoiseSource | None = None,
    ) -> Tensor:
        """One restoration per condition image (N, 3, h, w) (the output of :meth:`stage1`):
        :meth:`sample`, then :meth:`finish` at ``size`` (default h x w); in [0, 1]."""
        z = self.sample(cond, seeds, options, pos_prompts, noise)
        return self.finish(z, cond, options, size)

    @torch.no_grad()
    def condition_latent(self, cond: Tensor, options: RestoreOptions) -> Tensor:
        """The condition latent (c_img) of condition images (N, 3, h, w), float32, padded as the
        official pads it (:func:`latent_size`)."""
        tiles = options.tiles
        cond = cond.to(device=self.device, dtype=torch.float32)
        latent = self._encode(pad_to_multiple(cond, pad_multiple(tiles)) * 2 - 1, tiles)
        height, width = latent_size(*cond.shape[-2:], tiles)
        return F.pad(latent, (0, width - latent.shape[-1], 0, height - latent.shape[-2]))

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        seeds: Sequence[int],
        options: RestoreOptions,
        pos_prompts: Sequence[str] | None = None,
        noise: NoiseSource | None = None,
        trace: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """The final latents (padding cropped) for condition images (N, 3, h, w), seed per item.

        ``pos_prompts``: one positive prompt per item (default: ``options.pos_prompt``).
        ``noise`` (default: :class:`PerImageNoise` of ``seeds``; the official seed mode passes
        :class:`~diffbir.diffusion.noise.OfficialNoise`) gives x_T, then the noise augmentation,
        then the sampler's draws, in the official order. The denoiser is built as a fixed chain:
        model (tiled when asked) -> classifier-free guidance (one batched forward) -> eps/v to
        x0 -> restoration guidance on x0; then one registry call. ``trace`` (if given) receives
        the padded condition latent ``cond_latent`` and ``x_T``.
        """
        count, _, height, width = cond.shape
        if len(seeds) != count:
            raise ValueError(f"{len(seeds)} seeds for {count} condition images")
        if pos_prompts is None:
            pos_prompts = [options.pos_prompt] * count
        if len(pos_prompts) != count:
            raise ValueError(f"{len(pos_prompts)} prompts for {count} condition images")
        noise = noise or PerImageNoise(seeds)
        sampler = options.sampler
        cond = cond.to(device=self.device, dtype=torch.float32)
        latent = self.condition_latent(cond, options)
        f = LATENT_FACTOR  # the condition image zero-padded to the latent's size, as official
        cond_pad = F.pad(cond, (0, f * latent.shape[-1] - width, 0, f * latent.shape[-2] - height))
        if sampler.start_point == "cond":
            x_T = self._diffused(latent, self.base_schedule.num_timesteps - 1, noise)
        else:
            x_T = noise(latent)
        if trace is not None:
            trace.update(cond_latent=latent, x_T=x_T)
        if sampler.noise_aug > 0:
            latent = self._diffused(latent, sampler.noise_aug, noise)
        pos_text, neg_text = self._text_condition(pos_prompts, options.neg_prompt)
        cond_dict = self.cldm.condition(pos_text, cond_pad, latent.to(self.dtype))
        uncond = {**cond_dict, "text": neg_text.expand(count, -1, -1)}

        grid = self.grid(sampler.name, options.steps)
        model = GuidedModel(
            self._model_fn(options),
            cond_dict,
            uncond,
            options.cfg_scale,
            rescale=sampler.rescale_cfg,
        )
        denoise = ModelDenoiser(model, grid, self.parameterization)
        guidance = self._guidance(cond_pad, options, latent.shape[-2:])
        if guidance is not None:
            denoise = with_guidance(denoise, guidance, grid)
        with tqdm(
            total=grid.num_steps, desc="sampling", leave=False, disable=not options.progress
        ) as bar:
            z = SAMPLERS[sampler.name].fn(
                denoise, x_T, grid, noise=noise, callback=lambda _: bar.update(), **sampler.knobs
            )
        crop_h, crop_w = latent_size(height, width, options.tiles, sampled=False)
        return z[..., :crop_h, :crop_w]

    @torch.no_grad()
    def finish(
        self, z: Tensor, cond: Tensor, options: RestoreOptions, size: tuple[int, int] | None = None
    ) -> Tensor:
        """Final latents -> images in [0, 1] at ``size`` (default: the condition's size), as the
        official code: decode, crop the padding, colour-fix towards the (unclamped) condition
        ``cond``, resize (bicubic, antialiased), and clamp only then."""
        cond = cond.to(device=self.device, dtype=torch.float32)
        height, width = cond.shape[-2:]
        decoded = self._decode(z, options.tiles)[..., :height, :width]
        image = color_fix((decoded + 1) / 2, cond, options.color_fix)
        return resize_bicubic(image, size or (height, width)).clamp(0, 1)

    def restore(
        self,
        lq: Tensor,
        seeds: Sequence[int | Sequence[int]],
        options: RestoreOptions,
        pos_prompts: Sequence[str] | None = None,
        noise: NoiseSource | None = None,
    ) -> RestoreResult:
        """Restore a batch (B, 3, H, W) in [0, 1].

        ``seeds[b]`` is the seed of input ``b`` (one sample) or a list of seeds (one per sample).
        ``pos_prompts[b]``: the positive prompt of input ``b`` (default: ``options.pos_prompt``).
        ``noise``: see :meth:`sample`.
        """
        seeds = [[s] if isinstance(s, int) else list(s) for s in seeds]
        if len(seeds) != lq.shape[0] or len({len(s) for s in seeds}) > 1:
            raise ValueError("seeds: expected one list of equally many seeds per input image")
        samples = len(seeds[0])
        size = target_size(*lq.shape[-2:], options.upscale)
        cond = self.stage1(lq, options)
        flat_seeds = [s for per_image in seeds for s in per_image]
        flat_prompts = None
        if pos_prompts is not None:
            if len(pos_prompts) != lq.shape[0]:
                raise ValueError("pos_prompts: expected one prompt per input image")
            flat_prompts = [p for p in pos_prompts for _ in range(samples)]
        out = self.stage2(
            cond.repeat_interleave(samples, dim=0), flat_seeds, options, size, flat_prompts, noise
        )
        return RestoreResult(
            stage1=resize_bicubic(cond, size).clamp(0, 1).cpu(),
            samples=out.cpu().view(lq.shape[0], samples, *out.shape[1:]),
        )
