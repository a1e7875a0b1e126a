"""``python scripts/benchmark.py``: speed and memory benchmark of the two-stage pipeline with
random weights.

Times stage 1, VAE encode, one CFG sampling step of UNet + IRControlNet (cond and uncond in one
batched forward), VAE decode and one whole image; counts the step's FLOPs with torch's
``FlopCounterMode`` and compares the step's FLOP rate with this machine's matmul rate in the
same precision. That ratio is comparable across machines. Each timed step is followed by a
sustained matmul measurement, and the reported ratio is the median of these adjacent pairs, so
that load from other processes on a shared machine affects both sides of each pair alike.
On CPU the run keeps freed memory mapped for reuse, as ``diffbir-infer`` does
(:func:`~diffbir.pipeline.retain_cpu_heap`; ``--system-malloc`` turns it off).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffbir.benchmark.parts import DEFAULT_PARTS, PARTS, SHARE_STEPS, STAGE1_UPSCALE, run
from diffbir.benchmark.timing import COPY_OPS
from diffbir.diffusion import SAMPLERS
from diffbir.pipeline.device import add_device_arguments


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512, help="output image side (multiple of 64)")
    add_device_arguments(p)
    p.add_argument("--config", choices=("tiny", "full"), default="full")
    p.add_argument("--stage1", choices=sorted(STAGE1_UPSCALE), default="bsrnet")
    p.add_argument("--steps", type=int, default=2, help="sampling steps of the whole image")
    p.add_argument(
        "--sampler", choices=list(SAMPLERS), default="spaced", help="sampler of the whole image"
    )
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--image-repeats", type=int, default=1, help="timed whole-image runs")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument(
        "--matmul-seconds", type=float, default=2.0, help="length of each matmul measurement"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} to time (startup: a fresh process "
        "loading full-size weights in the official file formats, its time and peak memory)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one sampling step: top operators (torch.profiler) and the dtype/layout "
        "copies it makes (calls and bytes)",
    )
    p.add_argument("--profile-rows", type=int, default=15, help="operators shown by --profile")
    p.add_argument(
        "--startup-dir",
        type=Path,
        default=Path("/tmp/diffbir-benchmark-weights"),
        help="the startup part's random weight files (written once; full size: 6.7 GB)",
    )
    args = p.parse_args(argv)
    if args.size <= 0 or args.size % 64:
        p.error(f"--size: expected a positive multiple of 64, got {args.size}")
    if args.steps < 2:
        p.error(f"--steps: expected >= 2, got {args.steps}")
    if args.repeats < 1 or args.warmup < 0 or args.image_repeats < 1:
        p.error("--repeats and --image-repeats must be >= 1, --warmup >= 0")
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        p.error(f"--parts: expected a subset of {','.join(PARTS)}, got {args.parts!r}")
    args.parts = parts
    return args


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fmt_flops(n: float, unit: str = "") -> str:
    exp = min(4, max(0, int(math.log10(max(n, 1)) // 3)))
    return f"{n / 10 ** (3 * exp):.3f} {' kMGT'[exp].strip()}FLOP{unit}"


def _seconds(v: float) -> str:
    return f"{v:.3f} s"


def _share(v: float) -> str:
    return f"{100 * v:.1f}%"


ROWS = (
    ("startup_import_s", "startup: import", _seconds),
    ("startup_load_s", "startup: build + load weights", _seconds),
    ("startup_model_bytes", "startup: loaded ControlLDM", _fmt_bytes),
    ("startup_peak_rss_bytes", "startup: peak resident memory", _fmt_bytes),
    ("startup_peak_private_bytes", "startup: peak private memory", _fmt_bytes),
    ("startup_peak_over_model", "startup: peak resident / model", lambda v: f"{v:.2f}x"),
    ("stage1_s", "stage 1", _seconds),
    ("text_s", "text encoder (2 prompts)", _seconds),
    ("vae_encode_s", "VAE encode", _seconds),
    ("first_step_s", "first sampling step", _seconds),
    ("step_s", "sampling step (CFG, batch 2)", _seconds),
    ("vae_decode_s", "VAE decode", _seconds),
    ("color_fix_s", "colour fix (wavelet)", _seconds),
    ("image_s", "whole image", _seconds),
    *(
        (f"other_share_{n}", f"share of the rest at {n} steps", _share)
        for n in SHARE_STEPS
    ),
    ("peak_memory_bytes", "peak memory", _fmt_bytes),
    ("step_flops", "step FLOPs", _fmt_flops),
    ("step_flops_per_s", "step FLOP rate", lambda v: _fmt_flops(v, "/s")),
    ("matmul_flops_per_s", "matmul FLOP rate", lambda v: _fmt_flops(v, "/s")),
    ("step_over_matmul", "step rate / matmul rate", lambda v: f"{v:.3f}"),
    ("step_over_matmul_range", "  range over the pairs", lambda v: f"{v[0]:.3f} - {v[1]:.3f}"),
)


def format_table(results: dict[str, Any]) -> str:
    """The results as an aligned two-column table (then the profile, when there is one)."""
    head = (
        f"DiffBIR benchmark: {results['config']} ControlLDM + {results['stage1']}, "
        f"{results['size']}x{results['size']} (latent {results['latent']}x{results['latent']}), "
        f"{results['precision']}, {results['device']}, {results['threads']} threads, "
        f"median of {results['repeats']} after {results['warmup']} warm-up"
        + (", freed memory kept mapped" if results["heap_retained"] else "")
        + (", compiled denoiser" if results["compiled"] else "")
    )
    rows = [(label, fmt(results[key])) for key, label, fmt in ROWS if key in results]
    if "image_s" in results:
        rows[[r[0] for r in rows].index("whole image")] = (
            f"whole image ({results.get('sampler', 'spaced')}, {results['steps']} steps)",
            f"{results['image_s']:.3f} s",
        )
    rows.append(("matmul size", f"{results['matmul_size']}^2"))
    if not results["native_precision"]:
        rows.append(
            (
                "step rate / matmul rate",
                f"not reported: no native {results['precision']} on this CPU",
            )
        )
    if "copy_calls" in results:
        for name in COPY_OPS:
            calls, size = results["copy_calls"].get(name, 0), results["copy_bytes"].get(name, 0)
            rows.append((f"per step: aten.{name}", f"{calls} calls, {_fmt_bytes(size)}"))
    width = max(len(label) for label, _ in rows)
    lines = [head, *(f"  {label:<{width}}  {value}" for label, value in rows)]
    if "profile_table" in results:
        lines += ["", "Top operators of one sampling step (self time):", results["profile_table"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print the table (and write ``--json``); returns the exit status."""
    args = parse_args(argv)
    try:
        results = run(args)
    except ValueError as err:
        print(f"benchmark: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
