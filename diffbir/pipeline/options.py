"""Every option of a restoration, defined once.

Each field carries its :class:`~diffbir.schema.Setting` (flag, help, range or choices); from
these the command line (:mod:`diffbir.pipeline.arguments`), the preset keys and ``key=value``
overrides (:mod:`diffbir.pipeline.presets`), the demo's controls and the names in error messages
are generated. :class:`InferenceConfig` holds what decides the outputs (written to
``config.yaml`` beside them); :class:`RunOptions` how and where a run goes (input and output
folders, processes, progress bars). Values are checked when an instance is built, before
anything is read, written or loaded. (One field per option, about fifty with their help texts:
the module is long because it is the one home of every option.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from diffbir.captioning import CAPTIONER_NAMES
from diffbir.diffusion.samplers import SAMPLERS
from diffbir.faces.quirks import DEFAULT_QUIRKS, FACE_QUIRKS
from diffbir.pipeline.color import COLOR_FIXES
from diffbir.pipeline.device import PRECISIONS
from diffbir.pipeline.tiling import TILE_WEIGHTS
from diffbir.schema import SettingError, check_fields, name_of, setting
from diffbir.versions import (
    DEFAULT_VERSION,
    TASKS,
    UNALIGNED_FACE,
    V2_NEG_PROMPT,
    VERSION_NAMES,
    VERSIONS,
)

LATENT_FACTOR = 8  # image pixels per latent pixel
MAX_STEPS = 1000  # the training timesteps of every SD version: spaced sampling takes at most all
SEED_MODES = ("per-image", "official")
START_POINTS = ("noise", "cond")
VAE_SHARED_NORM = ("encoder", "decoder", "both", "none")
SAMPLER_KNOBS = ("s_churn", "s_tmin", "s_tmax", "s_noise", "eta", "order")

RESTORATION, SAMPLER, GUIDANCE, TILING = "restoration", "sampler", "restoration guidance", "tiling"
FACES = "faces in whole photos (--task unaligned_face)"
MODEL, WEIGHTS, DEVICE, IO, PROCESSES, CAPTIONS = (
    "model",
    "weights and configs",
    "device",
    "input and output",
    "many processes",
    "captions",
)


_guidance_opt = partial(setting, group=GUIDANCE)
_tile_opt = partial(setting, group=TILING)
_sampler_opt = partial(setting, group=SAMPLER)
_restore_opt = partial(setting, group=RESTORATION)
_weights_opt = partial(setting, group=WEIGHTS)
_model_opt = partial(setting, group=MODEL)
_io_opt = partial(setting, group=IO)
_device_opt = partial(setting, group=DEVICE)
_process_opt = partial(setting, group=PROCESSES)
_caption_opt = partial(setting, group=CAPTIONS)
_face_opt = partial(setting, group=FACES)


def _knob(help: str, **spec: Any):
    return _sampler_opt(
        None, flag=f"--{help.split(':')[0]}", help=help.split(": ", 1)[1], low=0.0, **spec
    )


def _guided(cfg: InferenceConfig) -> bool:
    return cfg.restore.guidance.scale > 0


def _vae_tiled(cfg: InferenceConfig) -> bool:
    tiles = cfg.restore.tiles
    return tiles.vae_encoder is not None or tiles.vae_decoder is not None


def _captioned(cfg: InferenceConfig) -> bool:
    return cfg.caption.name != "none"


def _caption_precisions() -> list[str]:
    from diffbir.captioning.llava import PRECISIONS as LLAVA_PRECISIONS

    return ["auto", *LLAVA_PRECISIONS]


def _unaligned_faces(cfg: InferenceConfig) -> bool:
    return cfg.task == UNALIGNED_FACE


_GUIDED = (_guided, "restoration guidance: add --guidance (or --g-scale > 0)")
_UNALIGNED = (_unaligned_faces, "--task unaligned_face")
_VAE_TILED = (_vae_tiled, "a tiled VAE: add --tiled (or --vae-encoder-tile/--vae-decoder-tile)")
_CAPTIONED = (_captioned, "a captioner: add --captioner llava (or clip-tags)")


@dataclass(frozen=True)
class GuidanceOptions:
    """Restoration guidance (paper §3.4); ``scale`` 0 turns it off (the official ``--g_*``)."""

    scale: float = _guidance_opt(
        0.0, flag="--g-scale", low=0.0, help="scale s, as the official --g_scale (0: off)"
    )
    loss: str = _guidance_opt(
        "w_mse",
        flag="--g-loss",
        needs=_GUIDED,
        choices=("w_mse", "mse"),
        help="region-adaptive weighted MSE, or plain MSE",
    )
    space: str = _guidance_opt(
        "rgb",
        flag="--g-space",
        needs=_GUIDED,
        choices=("rgb", "latent"),
        help="compare in pixel space (decoded) or in latent space",
    )
    start: int = _guidance_opt(
        1001, flag="--g-start", needs=_GUIDED, help="guide while t + 1 < this"
    )
    stop: int = _guidance_opt(-1, flag="--g-stop", needs=_GUIDED, help="guide while t + 1 > this")
    repeat: int = _guidance_opt(1, flag="--g-repeat", needs=_GUIDED, low=1, help="updates per step")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TileOptions:
    """Tile sizes in image pixels (``None``: untiled). Strides default to half the tile
    (stage 1, diffusion) or three quarters of it (VAE)."""

    stage1: int | None = _tile_opt(
        None, flag="--stage1-tile", low=1, help="stage-1 tile (input pixels)"
    )
    stage1_stride: int | None = _tile_opt(
        None, flag="--stage1-tile-stride", low=1, help="stage-1 tile stride"
    )
    vae_encoder: int | None = _tile_opt(
        None,
        flag="--vae-encoder-tile",
        multiple=LATENT_FACTOR,
        help="VAE encoder tile, a multiple of 8",
    )
    vae_decoder: int | None = _tile_opt(
        None,
        flag="--vae-decoder-tile",
        multiple=LATENT_FACTOR,
        help="VAE decoder tile, a multiple of 8",
    )
    diffusion: int | None = _tile_opt(
        None,
        flag="--diffusion-tile",
        multiple=LATENT_FACTOR,
        help="diffusion tile, a multiple of 8",
    )
    diffusion_stride: int | None = _tile_opt(
        None,
        flag="--diffusion-tile-stride",
        multiple=LATENT_FACTOR,
        help="diffusion tile stride, a multiple of 8",
    )
    vae_shared_norm: str = _tile_opt(
        "encoder",
        flag="--vae-shared-norm",
        needs=_VAE_TILED,
        choices=VAE_SHARED_NORM,
        help="tiled VAE parts whose GroupNorms use whole-image statistics (one extra pass)",
    )
    weights: str = _tile_opt(
        "official",
        flag="--tile-weights",
        choices=lambda: sorted(TILE_WEIGHTS),
        help="tile blending weights: official (Gaussian, sigma 0.1 of the tile) or wide "
        "(sigma 0.25)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        by_name = {f.name: f for f in fields(self)}
        for name in ("stage1", "diffusion"):
            tile, stride = getattr(self, name), getattr(self, f"{name}_stride")
            tile_flag, stride_flag = name_of(by_name[name]), name_of(by_name[f"{name}_stride"])
            if tile is None and stride is not None:
                raise SettingError(
                    f"{stride_flag}: only used with {tile_flag} (or --tiled), got {stride} "
                    "without it"
                )
            if tile is not None and stride is not None and stride > tile:
                raise SettingError(
                    f"{stride_flag}: expected <= {tile_flag} {tile} (a larger stride leaves "
                    f"gaps), got {stride}"
                )


@dataclass(frozen=True)
class SamplerOptions:
    """The sampler and its options (the official ``--sampler`` and friends).

    Knobs left ``None`` take the sampler's default (the official CLI's: s_churn 0, s_tmin 0,
    s_tmax 300, s_noise 1, eta 1, order 1); a knob the sampler lacks is an error. ``start_point``
    ``cond`` starts from the condition latent diffused to the last timestep; ``noise_aug`` T > 0
    diffuses the condition latent to timestep T (both branches of CFG).
    """

    name: str = _sampler_opt(
        "spaced", flag="--sampler", choices=lambda: list(SAMPLERS), help="the sampler"
    )
    s_churn: float | None = _knob("s-churn: churn (edm_euler, edm_heun, edm_dpm_2; default 0)")
    s_tmin: float | None = _knob("s-tmin: churn from this sigma (default 0)")
    s_tmax: float | None = _knob("s-tmax: churn up to this sigma (default 300)")
    s_noise: float | None = _knob("s-noise: noise scale of churn/ancestral steps (default 1)")
    eta: float | None = _knob("eta: ancestral/SDE noise amount (edm_*_a, *_sde; default 1)")
    order: int | None = _sampler_opt(None, flag="--order", low=1, help="edm_lms order (default 1)")
    rescale_cfg: bool = _sampler_opt(
        False, flag="--rescale-cfg", help="CFG scale rising from 1 at t = 999 to 1 + scale at t = 0"
    )
    start_point: str = _sampler_opt(
        "noise",
        flag="--start-point",
        choices=START_POINTS,
        help="x_T: pure noise, or the condition latent diffused to the last timestep",
    )
    noise_aug: int = _sampler_opt(
        0,
        flag="--noise-aug",
        low=0,
        high=MAX_STEPS - 1,
        help="diffuse the condition latent to timestep T (0: off)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        flags = {f.name: name_of(f) for f in fields(self)}
        SAMPLERS[self.name].check_knobs(self.knobs, flags)

    @property
    def knobs(self) -> dict[str, float]:
        """The knobs that were given (not None), as keyword arguments of the sampler."""
        return {k: getattr(self, k) for k in SAMPLER_KNOBS if getattr(self, k) is not None}


@dataclass(frozen=True)
class RestoreOptions:
    """Everything that decides a restoration besides the models and the seed (the defaults
    are the paper's, v2; :func:`~diffbir.pipeline.presets.default_config` gives a version's)."""

    upscale: float = _restore_opt(
        1.0, flag="--upscale", low=0.0, low_open=True, help="output size / input size"
    )
    steps: int = _restore_opt(50, flag="--steps", low=2, high=MAX_STEPS, help="sampling steps")
    cfg_scale: float = _restore_opt(4.0, flag="--cfg-scale", help="classifier-free guidance scale")
    pos_prompt: str = _restore_opt("", flag="--pos-prompt", help="positive prompt")
    neg_prompt: str = _restore_opt(V2_NEG_PROMPT, flag="--neg-prompt", help="negative prompt")
    strength: float = _restore_opt(1.0, flag="--strength", low=0.0, help="control strength")
    color_fix: str = _restore_opt(
        "wavelet", flag="--color-fix", choices=COLOR_FIXES, help="colour correction towards stage 1"
    )
    min_side: int = _restore_opt(
        512,
        flag="--min-side",
        low=0,
        help="stage 2 runs with the short side enlarged to at least this, then resizes back",
    )
    guidance: GuidanceOptions = setting(factory=GuidanceOptions)
    tiles: TileOptions = setting(factory=TileOptions)
    sampler: SamplerOptions = setting(factory=SamplerOptions)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class CaptionOptions:
    """Captions as positive prompts (the official ``--captioner``; ``llava`` is its default,
    ``none`` ours). Each input not listed in ``--prompts`` is captioned as read, before the
    restoration models load, and restored with the positive prompt ``caption, pos_prompt``;
    captions are kept in ``prompts.csv`` beside the outputs (see
    :mod:`diffbir.pipeline.captions`)."""

    name: str = _caption_opt(
        "none",
        flag="--captioner",
        choices=CAPTIONER_NAMES,
        help="caption each input and prepend the caption to its positive prompt. llava: "
        "LLaVA-1.5-7B, the official default (--captioner llava reproduces it); clip-tags: "
        "open_clip zero-shot tags (ours); ram: not provided (see the README)",
    )
    model: str | None = _caption_opt(
        None,
        flag="--captioner-model",
        metavar="DIR_OR_REPO",
        needs=_CAPTIONED,
        help="the captioner's model: a folder, or a Hub repository id in the Hugging Face cache "
        "(default: the official model; fetch it with diffbir-download --captioner NAME)",
    )
    precision: str = _caption_opt(
        "auto",
        flag="--captioner-precision",
        choices=_caption_precisions,
        needs=_CAPTIONED,
        help="the captioner's weights: auto is 4bit on CUDA (the official default) and fp32 "
        "elsewhere (4bit and 8bit need CUDA; clip-tags runs in fp32)",
    )
    batch_size: int = _caption_opt(
        1,
        flag="--captioner-batch-size",
        low=1,
        needs=_CAPTIONED,
        help="images per captioning call (1 as the official; more is faster on a GPU)",
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FaceOptions:
    """How the faces of whole photos are found and restored (``--task unaligned_face``)."""

    quirks: str = _face_opt(
        next(name for name, quirks in FACE_QUIRKS.items() if quirks == DEFAULT_QUIRKS),
        flag="--face-quirks",
        needs=_UNALIGNED,
        choices=lambda: list(FACE_QUIRKS),
        help="official: the official face helper's channel order and eye-distance measure; "
        "corrected: each network gets the channel order it was trained on, the real eye "
        "distance is measured (see the README)",
    )
    batch: int = _face_opt(
        1,
        flag="--faces-per-batch",
        needs=_UNALIGNED,
        low=1,
        help="faces restored at once (per-image seeds: same results; more memory)",
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class WeightsConfig:
    """Weight files and model configs; ``None``: the official file of the version and task.

    Official file names are looked for in ``dir`` (default ``$DIFFBIR_WEIGHTS_DIR`` or
    ``weights/``). ``train_config``: the GM training config of ``--version custom``.
    """

    dir: str | None = _weights_opt(
        None,
        flag="--weights-dir",
        metavar="DIR",
        help="folder of the official files ($DIFFBIR_WEIGHTS_DIR or weights/)",
    )
    sd: str | None = _weights_opt(
        None, flag="--sd-weights", metavar="PATH", help="Stable Diffusion checkpoint"
    )
    controlnet: str | None = _weights_opt(
        None,
        flag="--controlnet-weights",
        metavar="PATH",
        help="IRControlNet weights (custom: a GM checkpoint)",
    )
    stage1: str | None = _weights_opt(
        None, flag="--stage1-weights", metavar="PATH", help="stage-1 weights"
    )
    cldm_config: str | None = _weights_opt(
        None,
        flag="--cldm-config",
        metavar="NAME_OR_YAML",
        help="ControlLDM config name or YAML (default: control_ldm)",
    )
    stage1_config: str | None = _weights_opt(
        None,
        flag="--stage1-config",
        metavar="NAME_OR_YAML",
        help="stage-1 config name or YAML (default: the task's)",
    )
    train_config: str | None = _weights_opt(
        None,
        flag="--train-config",
        metavar="YAML",
        help="--version custom: the GM training config (configs/train/gm*.yaml)",
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class InferenceConfig:
    """Everything that decides the outputs of a run (its input and output folders aside);
    written to ``config.yaml`` beside them."""

    version: str = _model_opt(
        DEFAULT_VERSION,
        flag="--version",
        choices=VERSION_NAMES,
        help="model version (v2 is the paper's; custom: our training, with --train-config)",
    )
    task: str = _model_opt("sr", flag="--task", choices=TASKS, help="restoration task")
    seed: int = _restore_opt(231, flag="--seed", help="run seed (per-image seeds derive from it)")
    seed_mode: str = _restore_opt(
        "per-image",
        flag="--seed-mode",
        choices=SEED_MODES,
        help="per-image: each image's noise from a seed derived from --seed and its path (order "
        "and batch independent); official: one stream seeded once with --seed, drawn image by "
        "image in file-name order, as the official code (reproduces its outputs)",
    )
    num_samples: int = _io_opt(1, flag="--num-samples", low=1, help="restorations per input")
    batch_size: int = _io_opt(1, flag="--batch-size", low=1, help="same-size images per forward")
    precision: str = _device_opt(
        "fp32",
        flag="--precision",
        choices=lambda: sorted(PRECISIONS),
        help="dtype of the models (see the README)",
    )
    device: str = _device_opt(
        "auto",
        flag="--device",
        metavar="DEVICE",
        help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps",
    )
    prompts: str | None = _restore_opt(
        None,
        flag="--prompts",
        metavar="CSV",
        help="CSV of per-image positive prompts: image stem, prompt (header optional)",
    )
    weights: WeightsConfig = setting(factory=WeightsConfig)
    restore: RestoreOptions = setting(factory=RestoreOptions)
    caption: CaptionOptions = setting(factory=CaptionOptions)
    faces: FaceOptions = setting(factory=FaceOptions)

    def __post_init__(self) -> None:
        check_fields(self)
        version = VERSIONS.get(self.version)
        if version is not None and self.task not in version.tasks:
            raise SettingError(
                f"--task {self.task}: DiffBIR {self.version} has no such task (as in the "
                "official code); use --version v2 or v2.1"
            )
        if self.seed_mode == "official" and self.batch_size != 1:
            raise SettingError(
                "--batch-size: --seed-mode official restores image by image, expected 1, "
                f"got {self.batch_size}"
            )
        if self.seed_mode == "official" and self.faces.batch != 1:
            raise SettingError(
                "--faces-per-batch: --seed-mode official restores face by face, expected 1, "
                f"got {self.faces.batch}"
            )
        if self.weights.train_config and self.version != "custom":
            raise SettingError(
                f"--train-config is for --version custom, but --version {self.version} is selected"
            )


@dataclass
class RunOptions:
    """How and where a run goes; nothing here changes an output image."""

    input: str | None = _io_opt(
        None,
        flag="--input",
        metavar="PATH",
        help="an image file or a folder of images (default: a few degraded sample photos)",
    )
    output: str = _io_opt("results", flag="--output", metavar="DIR", help="output folder")
    recursive: bool = _io_opt(False, flag="--recursive", help="also search subfolders of --input")
    overwrite: bool = _io_opt(False, flag="--overwrite", help="redo inputs whose outputs exist")
    save_stage1: bool = _io_opt(
        False, flag="--save-stage1", help="also write stage1/<name>.png (the condition image)"
    )
    save_faces: bool = _io_opt(
        False,
        flag="--save-faces",
        help="--task unaligned_face: also write each photo's faces (cropped_faces/, "
        "restored_faces/: <name>_face<i>.png) and its restored background "
        "(restored_backgrounds/<name>.png)",
    )
    progress: bool = _io_opt(True, flag="--progress", help="progress bars")
    devices: str = _process_opt(
        "1",
        flag="--devices",
        metavar="N",
        help="processes per node: a number, or auto (every visible GPU; 1 on CPU); on CPU, N "
        "means N processes with the gloo backend",
    )
    num_nodes: int = _process_opt(1, flag="--num-nodes", low=1, help="number of nodes")
    strategy: str = _process_opt(
        "ddp", flag="--strategy", metavar="NAME", help="Lightning strategy when processes > 1"
    )
    system_malloc: bool = _device_opt(
        False,
        flag="--system-malloc",
        help="on CPU, leave malloc as it is (default: keep freed memory mapped for reuse: about "
        "10%% faster steps and 20%% faster VAE, 12%% more peak memory, held until exit)",
    )
    compile: bool = _device_opt(
        False,
        flag="--compile",
        help="torch.compile UNet + IRControlNet (the first step then takes minutes; for GPUs. "
        "Off by default: on our CPU it did not pay off, see the README's Benchmark section)",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.devices != "auto" and not (self.devices.isdigit() and int(self.devices) >= 1):
            raise SettingError(f"--devices: expected a number >= 1 or auto, got {self.devices!r}")


# What --tiled means: every part tiled at these sizes (image pixels) unless a tile flag says else.
TILED = TileOptions(
    stage1=512,
    stage1_stride=256,
    vae_encoder=256,
    vae_decoder=256,
    diffusion=512,
    diffusion_stride=256,
)
GUIDANCE_SCALE = 0.5  # --guidance without --g-scale: the official --g_scale example value


@dataclass(frozen=True)
class Shorthand:
    """A flag that stands for several config values, each with a flag of its own (given
    values win): ``expand(given)`` returns the ``{config key: value}`` it adds."""

    flag: str
    help: str
    expand: Callable[[Mapping[str, Any]], dict[str, Any]]
    group: str


def _tiled(given: Mapping[str, Any]) -> dict[str, Any]:
    sizes = (
        "stage1",
        "stage1_stride",
        "vae_encoder",
        "vae_decoder",
        "diffusion",
        "diffusion_stride",
    )
    keys = {f"restore.tiles.{name}": getattr(TILED, name) for name in sizes}
    return {key: value for key, value in keys.items() if key not in given}


def _guidance(given: Mapping[str, Any]) -> dict[str, Any]:
    return {} if "restore.guidance.scale" in given else {"restore.guidance.scale": GUIDANCE_SCALE}


SHORTHANDS = (
    Shorthand(
        "--tiled",
        "tile stage 1, the VAE and the diffusion (unset tiles: 512/256 stage 1 "
        "and diffusion, 256 VAE)",
        _tiled,
        TILING,
    ),
    Shorthand(
        "--guidance",
        f"enable restoration guidance (scale {GUIDANCE_SCALE} unless --g-scale)",
        _guidance,
        GUIDANCE,
    ),
)
