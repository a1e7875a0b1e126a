"""``diffbir-infer``: restore a file or a folder of images with the two-stage pipeline.

Bad input files are reported and skipped, outputs are written atomically and existing ones
are skipped (so an interrupted run resumes), and each image's seed is derived from the run seed
and its path relative to the input, so results do not depend on order or batch size.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffbir.checkpoint import CheckpointError
from diffbir.pipeline.color import COLOR_FIXES
from diffbir.pipeline.device import add_device_arguments, resolve_device, retain_cpu_heap
from diffbir.pipeline.image_io import ImageReadError, list_inputs, read_image, to_tensor, write_png
from diffbir.pipeline.loading import TASKS, build_restorer, resolve_weight_paths
from diffbir.pipeline.restorer import (
    DEFAULT_NEG_PROMPT,
    VAE_SHARED_NORM,
    GuidanceOptions,
    RestoreOptions,
    Restorer,
    TileOptions,
)
from diffbir.pipeline.samples import SAMPLE_NAMES, load_sample
from diffbir.weights import WEIGHTS_ENV, MissingWeightsError

STAGE1_DIR = "stage1"
SAMPLE_INPUTS_DIR = "inputs"


def derive_seed(run_seed: int, key: str, sample: int = 0) -> int:
    """A 63-bit seed from the run seed, an image's relative path and the sample index."""
    digest = hashlib.sha256(f"{run_seed}\0{key}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Job:
    """One input image: ``key`` (relative path, seeds the RNG), how to load it, where it goes."""

    key: str
    source: str
    load: Callable[[], np.ndarray]
    outputs: list[Path]
    stage1_output: Path | None

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
            "(not image files)"
        ]
        lines += [f"  failed: {source}: {reason}" for source, reason in self.failed]
        return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``diffbir-infer``."""
    p = argparse.ArgumentParser(
        prog="diffbir-infer",
        description="Blind image restoration with DiffBIR (stage-1 cleaner + IRControlNet on "
        "Stable Diffusion 2.1). Without --input, restores degraded scikit-image sample photos.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--input", help="an image file or a folder of images")
    io.add_argument("--recursive", action="store_true", help="also search subfolders of --input")
    io.add_argument("--output", default="results", help="output folder (PNG per input)")
    io.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs exist")
    io.add_argument(
        "--save-stage1", action="store_true", help=f"also write {STAGE1_DIR}/<name>.png"
    )
    io.add_argument("--num-samples", type=int, default=1, help="restorations per input")
    io.add_argument("--batch-size", type=int, default=1, help="same-size images per forward")
    io.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = p.add_argument_group("restoration")
    r.add_argument("--task", choices=sorted(TASKS), default="sr")
    r.add_argument("--upscale", type=float, help="output size / input size (default: sr 4, else 1)")
    r.add_argument("--steps", type=int, default=50, help="spaced-DDPM sampling steps")
    r.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale")
    r.add_argument("--pos-prompt", default="", help="positive prompt")
    r.add_argument("--neg-prompt", default=DEFAULT_NEG_PROMPT, help="negative prompt")
    r.add_argument("--strength", type=float, default=1.0, help="control strength")
    r.add_argument(
        "--seed", type=int, default=231, help="run seed (per-image seeds derive from it)"
    )
    r.add_argument("--color-fix", choices=COLOR_FIXES, default="none")
    r.add_argument(
        "--min-side",
        type=int,
        default=512,
        help="stage 2 runs with the short side enlarged to at least this, then resizes back",
    )

    g = p.add_argument_group("restoration guidance (paper §3.4)")
    g.add_argument("--guidance", action="store_true", help="enable restoration guidance")
    g.add_argument("--g-loss", choices=("w_mse", "mse"), default="w_mse")
    g.add_argument("--g-space", choices=("rgb", "latent"), default="rgb")
    g.add_argument("--g-scale", type=float, default=0.5, help="scale s (as the official --g_scale)")
    g.add_argument("--g-start", type=int, default=1001, help="guide while t + 1 < this")
    g.add_argument("--g-stop", type=int, default=-1, help="guide while t + 1 > this")
    g.add_argument("--g-repeat", type=int, default=1, help="guidance updates per step")

    t = p.add_argument_group("tiling (memory bounded by the tile)")
    t.add_argument("--tiled", action="store_true", help="tile stage 1, the VAE and the diffusion")
    t.add_argument("--stage1-tile", type=int, default=512, help="stage-1 tile (input pixels)")
    t.add_argument("--stage1-tile-stride", type=int, default=256)
    t.add_argument("--vae-encoder-tile", type=int, default=256, help="pixels, multiple of 8")
    t.add_argument("--vae-decoder-tile", type=int, default=256, help="pixels, multiple of 8")
    t.add_argument("--diffusion-tile", type=int, default=512, help="pixels, multiple of 8")
    t.add_argument("--diffusion-tile-stride", type=int, default=256, help="multiple of 8")
    t.add_argument(
        "--vae-shared-norm",
        choices=VAE_SHARED_NORM,
        default="encoder",
        help="tiled VAE parts whose GroupNorms use whole-image statistics (one extra pass)",
    )

    add_device_arguments(p.add_argument_group("device"))

    w = p.add_argument_group("weights and configs")
    w.add_argument(
        "--weights-dir", help=f"folder of the official files (${WEIGHTS_ENV} or weights/)"
    )
    w.add_argument("--sd-weights", help="SD 2.1 checkpoint (v2-1_512-ema-pruned.ckpt)")
    w.add_argument("--controlnet-weights", help="IRControlNet weights (v2.pth)")
    w.add_argument("--stage1-weights", help="stage-1 weights (default: the task's official file)")
    w.add_argument("--cldm-config", default="control_ldm", help="ControlLDM config name or YAML")
    w.add_argument("--stage1-config", help="stage-1 config name or YAML (default: the task's)")
    return p


def options_from_args(args: argparse.Namespace) -> RestoreOptions:
    """RestoreOptions from parsed arguments (ValueError names the bad flag)."""
    if args.num_samples < 1:
        raise ValueError(f"--num-samples: expected >= 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.steps < 2:
        raise ValueError(f"--steps: expected >= 2, got {args.steps}")
    if args.upscale is not None and not args.upscale > 0:
        raise ValueError(f"--upscale: expected > 0, got {args.upscale}")
    tiles = TileOptions()
    if args.tiled:
        tiles = TileOptions(
            stage1=args.stage1_tile,
            stage1_stride=args.stage1_tile_stride,
            vae_encoder=args.vae_encoder_tile,
            vae_decoder=args.vae_decoder_tile,
            diffusion=args.diffusion_tile,
            diffusion_stride=args.diffusion_tile_stride,
            vae_shared_norm=args.vae_shared_norm,
        )
    guidance = GuidanceOptions(
        scale=args.g_scale if args.guidance else 0.0,
        loss=args.g_loss,
        space=args.g_space,
        start=args.g_start,
        stop=args.g_stop,
        repeat=args.g_repeat,
    )
    upscale = args.upscale if args.upscale is not None else TASKS[args.task].default_upscale
    return RestoreOptions(
        upscale=upscale,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        pos_prompt=args.pos_prompt,
        neg_prompt=args.neg_prompt,
        strength=args.strength,
        guidance=guidance,
        color_fix=args.color_fix,
        min_side=args.min_side,
        tiles=tiles,
        progress=not args.no_progress,
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


def plan_jobs(args: argparse.Namespace, report: Report, upscale: float) -> list[Job]:
    """The jobs of this run (input files or sample photos); name clashes are failures."""
    output = Path(args.output)
    jobs: list[Job] = []
    if args.input is None:
        inputs_dir = output / SAMPLE_INPUTS_DIR
        for name in SAMPLE_NAMES:
            outs, s1 = _output_paths(output, name, args.num_samples, args.save_stage1)
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
    out_resolved = output.resolve()
    owner: dict[Path, str] = {}
    for path in candidates:
        if out_resolved in path.resolve().parents:
            continue  # our own outputs inside the input folder
        key = path.name if root.is_file() else path.relative_to(root).as_posix()
        outs, s1 = _output_paths(output, key, args.num_samples, args.save_stage1)
        if outs[0] in owner:
            report.fail(str(path), f"output {outs[0]} would clash with that of {owner[outs[0]]}")
            continue
        owner[outs[0]] = str(path)
        jobs.append(Job(key, str(path), lambda p=path: read_image(p), outs, s1))
    return jobs


def _sample_loader(name: str, upscale: float, inputs_dir: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        img = load_sample(name, scale=max(upscale, 1.0))
        path = inputs_dir / f"{name}.png"
        if not path.is_file():
            write_png(path, (img * 255).round().astype(np.uint8))
        return img

    return load


def _run_batch(
    restorer: Restorer,
    batch: list[tuple[Job, np.ndarray]],
    options: RestoreOptions,
    args: argparse.Namespace,
    report: Report,
) -> None:
    lq = torch.cat([to_tensor(img) for _, img in batch])
    seeds = [
        [derive_seed(args.seed, job.key, k) for k in range(args.num_samples)] for job, _ in batch
    ]
    try:
        result = restorer.restore(lq, seeds, options)
        for i, (job, _) in enumerate(batch):
            if job.stage1_output is not None:
                write_png(job.stage1_output, result.stage1[i])
            for k, path in enumerate(job.outputs):
                write_png(path, result.samples[i, k])
            report.restored.append(job.source)
    except (RuntimeError, ValueError, OSError) as err:
        for job, _ in batch:
            if job.source not in report.restored:
                report.fail(job.source, f"restoration failed: {err}")


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line; returns the exit status."""
    options = options_from_args(args)
    report = Report()
    jobs = plan_jobs(args, report, options.upscale)
    todo = []
    for job in jobs:
        if job.done() and not args.overwrite:
            report.skipped.append(job.source)
        else:
            todo.append(job)
    if todo:
        device = resolve_device(args.device)
        if device.type == "cpu" and not args.system_malloc:
            retain_cpu_heap()
        paths = resolve_weight_paths(
            args.task,
            args.weights_dir,
            sd=args.sd_weights,
            controlnet=args.controlnet_weights,
            stage1=args.stage1_weights,
        )
        restorer = build_restorer(
            args.task,
            paths,
            cldm_config=args.cldm_config,
            stage1_config=args.stage1_config,
            device=device,
            precision=args.precision,
        )
        batch: list[tuple[Job, np.ndarray]] = []
        for job in tqdm(todo, desc="images", unit="img", disable=args.no_progress):
            try:
                img = job.load()
            except ImageReadError as err:
                report.fail(job.source, err.reason)
                continue
            if batch and (len(batch) == args.batch_size or batch[0][1].shape != img.shape):
                _run_batch(restorer, batch, options, args, report)
                batch = []
            batch.append((job, img))
        if batch:
            _run_batch(restorer, batch, options, args, report)
    print(report.summary())
    return 1 if report.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffbir-infer``; returns the exit status (0 ok, 1 failures, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (MissingWeightsError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
