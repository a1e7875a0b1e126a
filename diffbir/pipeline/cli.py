"""``diffbir-infer``: restore a file or a folder of images with the two-stage pipeline.

Bad input files are reported and skipped, outputs are written atomically and existing ones
are skipped (so an interrupted run resumes), and each image's seed is derived from the run seed
and its path relative to the input, so results do not depend on order or batch size
(``--seed-mode official`` draws from one stream in file order instead, as the official code).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from diffbir.checkpoint import CheckpointError
from diffbir.diffusion.noise import OfficialNoise
from diffbir.diffusion.samplers import SAMPLERS
from diffbir.files import check_output_folder, remove_stale_temp_files
from diffbir.pipeline.checks import blocking_file
from diffbir.pipeline.color import COLOR_FIXES
from diffbir.pipeline.device import add_device_arguments, resolve_device, retain_cpu_heap
from diffbir.pipeline.image_io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_inputs,
    read_image,
    to_tensor,
    write_png,
    write_text,
)
from diffbir.pipeline.predict import (
    Recipe,
    add_distributed_arguments,
    die_with_parent,
    placement_device,
    process_count,
    run_distributed,
    run_local,
)
from diffbir.pipeline.presets import (
    CONFIG_FILE,
    SEED_MODES,
    TILED,
    InferenceConfig,
    build_from_config,
    default_config,
    differing_keys,
    dump,
    resolve_config,
)
from diffbir.pipeline.prompts import PROMPTS_FILE, prompts_csv, read_prompts
from diffbir.pipeline.restorer import (
    SAMPLER_KNOB_FLAGS,
    START_POINTS,
    VAE_SHARED_NORM,
    RestoreOptions,
    Restorer,
    TileOptions,
    latent_size,
)
from diffbir.pipeline.samples import SAMPLE_NAMES, load_sample
from diffbir.pipeline.tiling import TILE_WEIGHTS
from diffbir.versions import DEFAULT_VERSION, TASKS, VERSION_NAMES
from diffbir.weights import WEIGHTS_ENV, MissingWeightsError

STAGE1_DIR = "stage1"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
SAMPLE_INPUTS_DIR = "inputs"


def derive_seed(run_seed: int, key: str, sample: int = 0) -> int:
    """A 63-bit seed from the run seed, an image's relative path and the sample index."""
    digest = hashlib.sha256(f"{run_seed}\0{key}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class NoInputImagesError(ValueError):
    """An input folder without a single image file."""


@dataclass
class Job:
    """One input image: ``key`` (relative path, seeds the RNG), how to load it, where it goes."""

    key: str
    source: str
    load: Callable[[], np.ndarray]
    outputs: list[Path]
    stage1_output: Path | None

    @property
    def stem(self) -> str:
        """The key without its extension: how ``--prompts`` names this input."""
        return Path(self.key).with_suffix("").as_posix()

    def done(self) -> bool:
        paths = [*self.outputs, *([self.stage1_output] if self.stage1_output else [])]
        return all(p.is_file() for p in paths)


@dataclass
class Report:
    """What happened to each input, for the summary and the exit status."""

    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def fail(self, source: str, reason: str) -> None:
        self.failed.append((source, reason))
        tqdm.write(f"failed: {source}: {reason}", file=sys.stderr)

    def summary(self) -> str:
        lines = [
            f"summary: {len(self.restored)} restored, {len(self.skipped)} skipped (output exists; "
            f"--overwrite to redo), {len(self.failed)} failed, {len(self.ignored)} ignored "
            "(not image files, hidden, folders without --recursive, or inside --output)"
        ]
        lines += [f"  failed: {source}: {reason}" for source, reason in self.failed]
        return "\n".join(lines)


# flag dest -> config key (InferenceConfig); flags default to None: given = not None
FLAG_KEYS = {
    "version": "version",
    "task": "task",
    "prompts": "prompts",
    "seed": "seed",
    "seed_mode": "seed_mode",
    "num_samples": "num_samples",
    "batch_size": "batch_size",
    "precision": "precision",
    "device": "device",
    "weights_dir": "weights.dir",
    "sd_weights": "weights.sd",
    "controlnet_weights": "weights.controlnet",
    "stage1_weights": "weights.stage1",
    "cldm_config": "weights.cldm_config",
    "stage1_config": "weights.stage1_config",
    "train_config": "weights.train_config",
    "upscale": "restore.upscale",
    "steps": "restore.steps",
    "cfg_scale": "restore.cfg_scale",
    "pos_prompt": "restore.pos_prompt",
    "neg_prompt": "restore.neg_prompt",
    "strength": "restore.strength",
    "color_fix": "restore.color_fix",
    "min_side": "restore.min_side",
    "g_loss": "restore.guidance.loss",
    "g_space": "restore.guidance.space",
    "g_scale": "restore.guidance.scale",
    "g_start": "restore.guidance.start",
    "g_stop": "restore.guidance.stop",
    "g_repeat": "restore.guidance.repeat",
    "stage1_tile": "restore.tiles.stage1",
    "stage1_tile_stride": "restore.tiles.stage1_stride",
    "vae_encoder_tile": "restore.tiles.vae_encoder",
    "vae_decoder_tile": "restore.tiles.vae_decoder",
    "diffusion_tile": "restore.tiles.diffusion",
    "diffusion_tile_stride": "restore.tiles.diffusion_stride",
    "vae_shared_norm": "restore.tiles.vae_shared_norm",
    "tile_weights": "restore.tiles.weights",
    "sampler": "restore.sampler.name",
    **{knob: f"restore.sampler.{knob}" for knob in SAMPLER_KNOB_FLAGS},
    "rescale_cfg": "restore.sampler.rescale_cfg",
    "start_point": "restore.sampler.start_point",
    "noise_aug": "restore.sampler.noise_aug",
}
# --guidance without --g-scale: the official --g_scale example value
GUIDANCE_SCALE = 0.5


def _default(key: str) -> str:
    """The default of a config key that no version changes, for the help text."""
    value: object = default_config()
    for part in key.split("."):
        value = getattr(value, part)
    return f"(default: {value})"


VERSION_DEFAULT = "(default: the version's, see configs/inference/)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``diffbir-infer``; every restoration flag defaults to ``None``
    (not given), the defaults live in :class:`~diffbir.pipeline.presets.InferenceConfig`."""
    p = argparse.ArgumentParser(
        prog="diffbir-infer",
        description="Blind image restoration with DiffBIR (stage-1 cleaner + IRControlNet on "
        "Stable Diffusion 2.1). Without --input, restores degraded scikit-image sample photos. "
        "Settings: the defaults of --version, then --config PRESET, then key=value overrides "
        "(e.g. restore.steps=20), then flags.",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)"
    )
    p.add_argument(
        "--config", help="inference preset: a YAML file, or a name in configs/inference/ (v2.1)"
    )
    p.add_argument(
        "--version",
        choices=VERSION_NAMES,
        help=f"model version (default: {DEFAULT_VERSION}; v2 is the paper's; custom: our "
        "training, with --train-config)",
    )
    p.add_argument(
        "--prompts", help="CSV of per-image positive prompts: image stem, prompt (header optional)"
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input", help="an image file or a folder of images")
    io.add_argument("--recursive", action="store_true", help="also search subfolders of --input")
    io.add_argument("--output", default="results", help="output folder (default: results)")
    io.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs exist")
    io.add_argument(
        "--save-stage1", action="store_true", help=f"also write {STAGE1_DIR}/<name>.png"
    )
    io.add_argument(
        "--num-samples", type=int, help=f"restorations per input {_default('num_samples')}"
    )
    io.add_argument(
        "--batch-size", type=int, help=f"same-size images per forward {_default('batch_size')}"
    )
    io.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = p.add_argument_group("restoration")
    r.add_argument("--task", choices=TASKS, help="(default: sr)")
    r.add_argument("--upscale", type=float, help="output size / input size (default: sr 4, else 1)")
    r.add_argument("--steps", type=int, help=f"sampling steps {VERSION_DEFAULT}")
    r.add_argument(
        "--cfg-scale", type=float, help=f"classifier-free guidance scale {VERSION_DEFAULT}"
    )
    r.add_argument("--pos-prompt", help=f"positive prompt {VERSION_DEFAULT}")
    r.add_argument("--neg-prompt", help=f"negative prompt {VERSION_DEFAULT}")
    r.add_argument(
        "--strength", type=float, help=f"control strength {_default('restore.strength')}"
    )
    r.add_argument(
        "--seed", type=int, help=f"run seed (per-image seeds derive from it) {_default('seed')}"
    )
    r.add_argument(
        "--seed-mode",
        choices=SEED_MODES,
        help="per-image: each image's noise from a seed derived from --seed and its path (order "
        "and batch independent); official: one stream seeded once with --seed, drawn image by "
        "image in file-name order, as the official code (reproduces its outputs) "
        + _default("seed_mode"),
    )
    r.add_argument("--color-fix", choices=COLOR_FIXES, help=_default("restore.color_fix"))
    r.add_argument(
        "--min-side",
        type=int,
        help="stage 2 runs with the short side enlarged to at least this, then resizes back "
        + _default("restore.min_side"),
    )

    s = p.add_argument_group("sampler (knobs left out take the sampler's default)")
    s.add_argument("--sampler", choices=list(SAMPLERS), help=VERSION_DEFAULT)
    s.add_argument("--s-churn", type=float, help="churn (edm_euler, edm_heun, edm_dpm_2; def. 0)")
    s.add_argument("--s-tmin", type=float, help="churn from this sigma (default 0)")
    s.add_argument("--s-tmax", type=float, help="churn up to this sigma (default 300)")
    s.add_argument("--s-noise", type=float, help="noise scale of churn/ancestral steps (def. 1)")
    s.add_argument("--eta", type=float, help="ancestral/SDE noise amount (edm_*_a, *_sde; def. 1)")
    s.add_argument("--order", type=int, help="edm_lms order (default 1)")
    s.add_argument(
        "--rescale-cfg",
        action="store_true",
        default=None,
        help="CFG scale rising from 1 at t = 999 to 1 + scale at t = 0",
    )
    s.add_argument(
        "--start-point",
        choices=START_POINTS,
        help="x_T: pure noise, or the condition latent diffused to the last timestep "
        + _default("restore.sampler.start_point"),
    )
    s.add_argument(
        "--noise-aug",
        type=int,
        help="diffuse the condition latent to timestep T " + _default("restore.sampler.noise_aug"),
    )

    g = p.add_argument_group("restoration guidance (paper §3.4)")
    g.add_argument(
        "--guidance",
        action="store_true",
        help=f"enable restoration guidance (scale {GUIDANCE_SCALE} unless --g-scale)",
    )
    g.add_argument("--g-loss", choices=("w_mse", "mse"), help=_default("restore.guidance.loss"))
    g.add_argument("--g-space", choices=("rgb", "latent"), help=_default("restore.guidance.space"))
    g.add_argument("--g-scale", type=float, help="scale s (as the official --g_scale; 0: off)")
    g.add_argument(
        "--g-start", type=int, help=f"guide while t + 1 < this {_default('restore.guidance.start')}"
    )
    g.add_argument(
        "--g-stop", type=int, help=f"guide while t + 1 > this {_default('restore.guidance.stop')}"
    )
    g.add_argument(
        "--g-repeat", type=int, help=f"updates per step {_default('restore.guidance.repeat')}"
    )

    t = p.add_argument_group("tiling (memory bounded by the tile; sizes in image pixels)")
    t.add_argument(
        "--tiled",
        action="store_true",
        help=f"tile stage 1, the VAE and the diffusion (unset tiles: {TILED})",
    )
    t.add_argument("--stage1-tile", type=int, help="stage-1 tile (input pixels)")
    t.add_argument("--stage1-tile-stride", type=int)
    t.add_argument("--vae-encoder-tile", type=int, help="multiple of 8")
    t.add_argument("--vae-decoder-tile", type=int, help="multiple of 8")
    t.add_argument("--diffusion-tile", type=int, help="multiple of 8")
    t.add_argument("--diffusion-tile-stride", type=int, help="multiple of 8")
    t.add_argument(
        "--vae-shared-norm",
        choices=VAE_SHARED_NORM,
        help="tiled VAE parts whose GroupNorms use whole-image statistics (one extra pass) "
        + _default("restore.tiles.vae_shared_norm"),
    )
    t.add_argument(
        "--tile-weights",
        choices=sorted(TILE_WEIGHTS),
        help="tile blending weights: official (Gaussian, sigma 0.1 of the tile) or wide "
        "(sigma 0.25) "
        + _default("restore.tiles.weights"),
    )

    device = p.add_argument_group("device")
    add_device_arguments(device)
    p.set_defaults(precision=None, device=None)  # given or not: the config decides
    add_distributed_arguments(p)

    w = p.add_argument_group("weights and configs (default: the official files of the version)")
    w.add_argument(
        "--weights-dir", help=f"folder of the official files (${WEIGHTS_ENV} or weights/)"
    )
    w.add_argument("--sd-weights", help="Stable Diffusion checkpoint")
    w.add_argument("--controlnet-weights", help="IRControlNet weights (custom: a GM checkpoint)")
    w.add_argument("--stage1-weights", help="stage-1 weights")
    w.add_argument("--cldm-config", help="ControlLDM config name or YAML (default: control_ldm)")
    w.add_argument("--stage1-config", help="stage-1 config name or YAML (default: the task's)")
    w.add_argument(
        "--train-config", help="--version custom: the GM training config (configs/train/gm*.yaml)"
    )
    return p


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """``{config key: value}`` of the flags given on the command line."""
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.items()}
    flags = {key: value for key, value in flags.items() if value is not None}
    if args.guidance and "restore.guidance.scale" not in flags:
        flags["restore.guidance.scale"] = GUIDANCE_SCALE
    if args.tiled:
        for f in dataclasses.fields(TileOptions):
            key = f"restore.tiles.{f.name}"
            if key not in flags and f.name not in ("vae_shared_norm", "weights"):
                flags[key] = getattr(TILED, f.name)
    if args.no_progress:
        flags["restore.progress"] = False
    return flags


def config_from_args(args: argparse.Namespace) -> tuple[InferenceConfig, DictConfig]:
    """The effective config of a command line (ValueError names the bad flag or key)."""
    flags = flag_values(args)
    flags.setdefault("restore.progress", True)
    cfg, node = resolve_config(args.config, args.overrides, flags)
    refuse_unused_flags(args, cfg)
    return cfg, node


_GUIDANCE_KNOBS = ("g_loss", "g_space", "g_start", "g_stop", "g_repeat")


def refuse_unused_flags(args: argparse.Namespace, cfg: InferenceConfig) -> None:
    """A flag that this run's config would not use is an error, never silently dropped."""
    knobs = [f"--{d.replace('_', '-')}" for d in _GUIDANCE_KNOBS if getattr(args, d) is not None]
    if knobs and cfg.restore.guidance.scale == 0:
        raise ValueError(
            f"{', '.join(knobs)}: only used with restoration guidance; add --guidance (or "
            "--g-scale > 0) or drop them"
        )
    tiles = cfg.restore.tiles
    if args.vae_shared_norm is not None and tiles.vae_encoder is None and tiles.vae_decoder is None:
        raise ValueError(
            "--vae-shared-norm: only used with a tiled VAE; add --tiled (or --vae-encoder-tile/"
            "--vae-decoder-tile) or drop it"
        )


def _output_paths(
    output: Path, key: str, samples: int, save_stage1: bool
) -> tuple[list[Path], Path | None]:
    rel = Path(key).with_suffix("")
    if samples == 1:
        outputs = [output / rel.with_name(f"{rel.name}.png")]
    else:
        outputs = [output / rel.with_name(f"{rel.name}_{k}.png") for k in range(samples)]
    stage1 = output / STAGE1_DIR / rel.with_name(f"{rel.name}.png") if save_stage1 else None
    return outputs, stage1


def plan_jobs(
    args: argparse.Namespace, report: Report, upscale: float, num_samples: int
) -> list[Job]:
    """The jobs of this run (input files or sample photos); name clashes are failures."""
    output = Path(args.output)
    jobs: list[Job] = []
    if args.input is None:
        inputs_dir = output / SAMPLE_INPUTS_DIR
        for name in SAMPLE_NAMES:
            outs, s1 = _output_paths(output, name, num_samples, args.save_stage1)
            jobs.append(
                Job(
                    name,
                    f"skimage.data.{name}",
                    _sample_loader(name, upscale, inputs_dir),
                    outs,
                    s1,
                )
            )
        return jobs
    root = Path(args.input)
    candidates, ignored = list_inputs(root, args.recursive)
    report.ignored.extend(str(p) for p in ignored)
    out_abs = _real(output)
    if root.is_dir() and out_abs == _real(root):
        raise ValueError(
            f"--output: expected a folder other than --input (results would mix with the "
            f"inputs they are made from), got {args.output}"
        )
    # an output folder inside a recursive input: the files in it are ours, not inputs
    output_in_input = root.is_dir() and _real(root) in out_abs.parents
    inside = [p for p in candidates if output_in_input and out_abs in _real(p).parents]
    report.ignored.extend(str(p) for p in inside)
    candidates = [p for p in candidates if p not in inside]
    inputs = {_real(p) for p in candidates}
    owner: dict[Path, str] = {}
    for path in candidates:
        key = path.name if root.is_file() else path.relative_to(root).as_posix()
        outs, s1 = _output_paths(output, key, num_samples, args.save_stage1)
        paths = [*outs, *([s1] if s1 else [])]
        problem = _path_problem(paths, owner, inputs, output)
        if problem:
            report.fail(str(path), problem)
            continue
        owner.update({p: str(path) for p in paths})
        jobs.append(Job(key, str(path), lambda p=path: read_image(p), outs, s1))
    return jobs


def _real(path: Path) -> Path:
    """``path`` with its folders' links resolved (the file itself may be a link)."""
    return path.parent.resolve() / path.name


def _path_problem(
    paths: list[Path], owner: dict[Path, str], inputs: set[Path], output: Path
) -> str | None:
    """Why an input's output paths cannot be written, or None."""
    for p in paths:
        if p in owner:
            return f"output {p} would clash with an output of {owner[p]}"
        if _real(p) in inputs:
            return f"output {p} would overwrite an input image"
        if p.is_dir():
            return f"output {p} is a folder"
        blocker = blocking_file(p, output)
        if blocker is not None:
            return f"output {p} needs a folder where the file {blocker} is"
    return None


def _sample_loader(name: str, upscale: float, inputs_dir: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        img = load_sample(name, scale=max(upscale, 1.0))
        path = inputs_dir / f"{name}.png"
        if not path.is_file():
            write_png(path, (img * 255).round().astype(np.uint8))
        return img

    return load


def job_prompts(cfg: InferenceConfig, jobs: list[Job]) -> dict[str, str]:
    """The positive prompt of each job's stem: from ``--prompts`` when listed there, else
    ``restore.pos_prompt``. Stems of the CSV that match no input are reported."""
    listed = read_prompts(cfg.prompts) if cfg.prompts else {}
    stems = {job.stem for job in jobs}
    unused = [stem for stem in listed if stem not in stems]
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        print(f"warning: --prompts: {len(unused)} stem(s) match no input: {shown}", file=sys.stderr)
    return {job.stem: listed.get(job.stem, cfg.restore.pos_prompt) for job in jobs}


def record_run(
    output: Path,
    cfg: DictConfig,
    prompts: dict[str, str],
    jobs: list[Job],
    todo: list[Job],
    overwrite: bool,
) -> None:
    """Write ``config.yaml`` and ``prompts.csv`` beside the outputs before any work.

    Outputs already in the folder were made with the ``config.yaml`` there: a run with other
    settings is refused (unless ``--overwrite``), so one folder never mixes configurations.
    Rows of ``prompts.csv`` for skipped inputs keep the prompt they were made with.
    """
    config_path = output / CONFIG_FILE
    made = any(path.is_file() for job in jobs for path in job.outputs)
    if config_path.is_file() and made and not overwrite:
        try:
            previous = OmegaConf.load(config_path)
        except Exception as err:  # a damaged file: yaml and omegaconf raise their own errors
            raise ValueError(f"{config_path}: unreadable ({err}); use --overwrite") from err
        changed = differing_keys(previous, cfg)
        if changed:
            raise ValueError(
                f"--output {output}: its {CONFIG_FILE} was written by a run with other settings "
                f"({', '.join(changed)}); its outputs would mix with this run's. Use another "
                "--output, or --overwrite to redo every output"
            )
    write_text(config_path, dump(cfg))
    prompts_path = output / PROMPTS_FILE
    rows = read_prompts(prompts_path) if prompts_path.is_file() and not overwrite else {}
    redone = {job.stem for job in todo}
    for stem, prompt in prompts.items():
        if stem in redone or stem not in rows:
            rows[stem] = prompt
    write_text(prompts_path, prompts_csv(rows))


def draws_per_restoration(restorer: Restorer, options: RestoreOptions) -> int:
    """How many draws one restoration takes from its noise source: x_T, the noise augmentation
    and the sampler's (counted by running the sampler on a one-pixel latent)."""
    sampler, count = options.sampler, [0]

    def counting(like: torch.Tensor, *levels: object) -> torch.Tensor:
        count[0] += 1
        return torch.zeros_like(like)

    grid = restorer.grid(sampler.name, options.steps)
    SAMPLERS[sampler.name].fn(
        lambda x, level: torch.zeros_like(x), torch.zeros(1, 1, 1, 1), grid,
        noise=counting, **sampler.knobs,
    )  # fmt: skip
    return count[0] + 1 + (sampler.noise_aug > 0)


def _run_official(
    restorer: Restorer,
    jobs: list[Job],
    todo: list[Job],
    cfg: InferenceConfig,
    prompts: dict[str, str],
    report: Report,
) -> None:
    """``--seed-mode official``: ``torch.manual_seed(--seed)`` once, then every image in file
    order, one sample at a time, each drawing from that one stream in the official order. A
    finished image is not redone, but its draws are taken from the stream, so that the images
    after it get the noise of a complete run."""
    options = cfg.restore
    noise = OfficialNoise(cfg.seed)
    pending = {id(job) for job in todo}
    last = max(i for i, job in enumerate(jobs) if id(job) in pending)
    for job in tqdm(jobs[: last + 1], desc="images", unit="img", disable=not options.progress):
        try:
            lq = to_tensor(job.load())
        except ImageReadError as err:
            if id(job) in pending:
                report.fail(job.source, err.reason)
            continue  # the official code cannot read it either: no draws
        if id(job) not in pending:
            cond = restorer.stage1(lq, options)
            like = torch.empty(1, 4, *latent_size(*cond.shape[-2:], options.tiles))
            for _ in range(cfg.num_samples * draws_per_restoration(restorer, options)):
                noise(like)
            continue
        try:
            for k, path in enumerate(job.outputs):
                result = restorer.restore(lq, [[cfg.seed]], options, [prompts[job.stem]], noise)
                if k == 0 and job.stage1_output is not None:
                    write_png(job.stage1_output, result.stage1[0])
                write_png(path, result.images[0])
            report.restored.append(job.source)
        except (RuntimeError, ValueError, OSError) as err:
            report.fail(job.source, f"restoration failed: {err}")


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line; returns the exit status.

    Everything that can be checked without the models is checked before they load: config,
    device, input listing, output folder and paths. Ctrl-C keeps the finished outputs, prints
    the summary so far and returns 130.
    """
    started = time.time()
    cfg, cfg_node = config_from_args(args)
    device = resolve_device(cfg.device)
    report = Report()
    jobs = plan_jobs(args, report, cfg.restore.upscale, cfg.num_samples)
    refused = len(report.failed)  # inputs failed while planning (name clashes)
    if args.input is not None and not jobs and not refused:
        raise NoInputImagesError(
            f"--input: no image files in {args.input} (expected extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; {len(report.ignored)} entries ignored"
            f"{'' if args.recursive else ', subfolders need --recursive'})"
        )
    prompts = job_prompts(cfg, jobs)
    check_output_folder(args.output)
    remove_stale_temp_files(args.output, older_than=started)
    todo = []
    for job in jobs:
        if job.done() and not args.overwrite:
            report.skipped.append(job.source)
        else:
            todo.append(job)
    record_run(Path(args.output), cfg_node, prompts, jobs, todo, args.overwrite)
    processes = process_count(args, device)
    if processes > 1:
        die_with_parent()
    if todo or processes > 1:  # every rank takes part, even with nothing left to do
        if device.type == "cpu" and not args.system_malloc:
            retain_cpu_heap()
        restorer = build_from_config(
            cfg, placement_device(device, processes), compile=args.compile
        )
        job_prompt = {job.key: prompts[job.stem] for job in jobs}
        recipe = Recipe(cfg.restore, cfg.seed, cfg.num_samples, derive_seed, job_prompt)
        if cfg.seed_mode == "official":
            if processes > 1:
                raise ValueError(
                    "--seed-mode official: one noise stream in file order needs one process"
                )
            _run_official(restorer, jobs, todo, cfg, prompts, report)
            print(report.summary())
            return 1 if report.failed else 0
        if processes > 1:
            return run_distributed(
                args, restorer, todo, jobs, recipe, report, device, cfg.batch_size
            )
        try:
            run_local(restorer, todo, recipe, report, cfg.batch_size)
        except KeyboardInterrupt:
            done = len(report.restored) + len(report.skipped) + len(report.failed) - refused
            print(
                f"interrupted: {len(jobs) - done} input(s) not processed; "
                "finished outputs are kept, run the same command again to continue",
                file=sys.stderr,
            )
            print(report.summary())
            return EXIT_INTERRUPTED
    print(report.summary())
    return 1 if report.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffbir-infer``; returns the exit status (0 ok, 1 failures, 2 usage,
    130 interrupted)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow flags
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted (before any image was restored)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MissingWeightsError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
