"""Speed and memory benchmark of the two-stage pipeline with random weights.

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
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffbir.config import build_model, load_config
from diffbir.diffusion import SAMPLERS, GuidedModel
from diffbir.pipeline import (
    DEFAULT_NEG_PROMPT,
    RestoreOptions,
    Restorer,
    SamplerOptions,
    Stage1,
    resolve_device,
)
from diffbir.pipeline.device import (
    PRECISIONS,
    add_device_arguments,
    retain_cpu_heap,
    warn_if_slow_precision,
)
from diffbir.versions import VERSIONS

STAGE1_UPSCALE = {"bsrnet": 4, "swinir": 1, "scunet": 1}
PARTS = ("stage1", "encode", "step", "decode", "image")
# Stop repeating a measurement once this many seconds were spent on it (after one repeat).
TIME_BUDGET_S = 120.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(part: str) -> None:
    print(f"benchmark: timing {part} ...", file=sys.stderr, flush=True)


def time_fn(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int
) -> tuple[float, list[float]]:
    """Median and all wall times (s) of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > TIME_BUDGET_S:
            break
    return statistics.median(times), times


def matmul_rate(size: int, dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of back-to-back ``size`` x ``size`` matmuls (2 n^3 FLOPs each) over at
    least ``seconds`` (after one warm-up call): long enough to average out short bursts."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    a @ b
    _sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        a @ b
        calls += 1
        _sync(device)
    return 2 * size**3 * calls / (time.perf_counter() - start)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def build_models(config: str, stage1: str) -> tuple[torch.nn.Module, Stage1]:
    """Random-weight ControlLDM and stage-1 model of the tiny or full-size configs."""
    suffix = "_tiny" if config == "tiny" else ""
    cldm = build_model(load_config(f"control_ldm{suffix}"))
    model = build_model(load_config(f"{stage1}{suffix}"))
    spec = next(s for v in VERSIONS.values() for s in v.stage1.values() if s.config == stage1)
    return cldm, Stage1(model, resize_first=spec.resize_first, enlarge_first=spec.enlarge_first)


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
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} to time",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; returns the results as a flat dict."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = PRECISIONS[args.precision]
    warn_if_slow_precision(device, dtype)
    heap_retained = device.type == "cpu" and not args.system_malloc and retain_cpu_heap()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cldm, stage1 = build_models(args.config, args.stage1)
    restorer = Restorer(cldm, stage1, device=device, dtype=dtype)
    upscale = STAGE1_UPSCALE[args.stage1]
    size, latent = args.size, args.size // 8
    gen = torch.Generator().manual_seed(0)
    lq = torch.rand(1, 3, size // upscale, size // upscale, generator=gen).to(device)
    image = torch.rand(1, 3, size, size, generator=gen).to(device)
    options = RestoreOptions(
        upscale=upscale,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        min_side=0,
        sampler=SamplerOptions(name=args.sampler),
    )
    results: dict[str, Any] = {
        "config": args.config,
        "stage1": args.stage1,
        "size": size,
        "latent": latent,
        "precision": args.precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "steps": args.steps,
        "sampler": args.sampler,
        "heap_retained": heap_retained,
    }
    timed = {"repeats": args.repeats, "warmup": args.warmup, "device": device}
    with torch.inference_mode():
        # Without the encode part, the step and the decoder run on a random latent.
        shape = (1, cldm.unet.out[-1].out_channels, latent, latent)
        z = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        if "stage1" in args.parts:
            _progress("stage 1")
            results["stage1_s"], _ = time_fn(lambda: restorer.stage1(lq, options), **timed)
        if "encode" in args.parts:
            _progress("VAE encode")
            x = (image * 2 - 1).to(dtype)
            results["vae_encode_s"], _ = time_fn(lambda: cldm.vae_encode(x), **timed)
            z = cldm.vae_encode(x)
        matmul = partial(matmul_rate, args.matmul_size, dtype, device, args.matmul_seconds)
        if "step" in args.parts:
            _progress("sampling step and matmul, in turn")
            results.update(_bench_step(cldm, z, dtype, args.cfg_scale, matmul, timed))
        else:
            _progress("matmul")
            results["matmul_flops_per_s"] = matmul()
        if "decode" in args.parts:
            _progress("VAE decode")
            results["vae_decode_s"], _ = time_fn(lambda: cldm.vae_decode(z), **timed)
        if "image" in args.parts:
            _progress("whole image")
            results["image_s"], _ = time_fn(
                lambda: restorer.restore(lq, [[0]], options),
                device=device,
                repeats=args.image_repeats,
                warmup=0,
            )
        results["peak_memory_bytes"] = peak_memory_bytes(device)
    results["matmul_size"] = args.matmul_size
    if "step_s" in results:
        flops = count_step_flops(args.config, latent, cfg=args.cfg_scale != 1)
        pairs = results.pop("step_matmul_pairs")
        results["step_flops"] = flops
        results["step_flops_per_s"] = flops / results["step_s"]
        results["matmul_flops_per_s"] = statistics.median(rate for _, rate in pairs)
        ratios = [flops / seconds / rate for seconds, rate in pairs]
        results["step_over_matmul"] = statistics.median(ratios)
        results["step_over_matmul_range"] = [min(ratios), max(ratios)]
    return results


def count_step_flops(config: str, latent: int, cfg: bool = True) -> int:
    """FLOPs of one UNet + IRControlNet forward at ``latent`` x ``latent`` (batch 2 with CFG).

    Counted on the ``meta`` device (no memory, no time, the same in every precision), where
    attention runs as two batched matmuls that FlopCounterMode counts; the fused CPU attention
    kernel has no FLOP formula and would count as zero. Convs, linears and attention matmuls
    count 2 FLOPs per multiply-add; norms, activations and softmax count nothing.
    """
    suffix = "_tiny" if config == "tiny" else ""
    with torch.device("meta"):
        cldm = build_model(load_config(f"control_ldm{suffix}"))
        batch = 2 if cfg else 1
        x = torch.empty(batch, cldm.unet.out[-1].out_channels, latent, latent)
        context = torch.empty(batch, 77, cldm.unet.context_dim)
        cond = {"text": context, "latent": torch.empty_like(x)}
        t = torch.zeros(batch, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            cldm(x, t, cond)
    return counter.get_total_flops()


def _bench_step(
    cldm: torch.nn.Module,
    z: torch.Tensor,
    dtype: torch.dtype,
    scale: float,
    matmul: Callable[[], float],
    timed: dict,
) -> dict[str, Any]:
    """Time one CFG step (one batch-2 forward of UNet + IRControlNet) at latent ``z``; after
    each timed step, measure the matmul rate. Returns the median step time and the pairs."""
    texts = cldm.encode_text(["", DEFAULT_NEG_PROMPT]).to(dtype)
    latent = z.to(dtype)
    cond = {"text": texts[:1], "latent": latent}
    uncond = {"text": texts[1:], "latent": latent}
    model = GuidedModel(cldm, cond, uncond, scale)
    x = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(z.device, dtype)
    pairs: list[tuple[float, float]] = []
    for index in range(timed["repeats"]):
        warmup = timed["warmup"] if index == 0 else 0
        _, (seconds,) = time_fn(lambda: model(x, 500.0), timed["device"], repeats=1, warmup=warmup)
        pairs.append((seconds, matmul()))
        if sum(s for s, _ in pairs) > TIME_BUDGET_S:
            break
    return {"step_s": statistics.median(s for s, _ in pairs), "step_matmul_pairs": pairs}


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fmt_flops(n: float, unit: str = "") -> str:
    exp = min(4, max(0, int(math.log10(max(n, 1)) // 3)))
    return f"{n / 10 ** (3 * exp):.3f} {' kMGT'[exp].strip()}FLOP{unit}"


ROWS = (
    ("stage1_s", "stage 1", lambda v: f"{v:.3f} s"),
    ("vae_encode_s", "VAE encode", lambda v: f"{v:.3f} s"),
    ("step_s", "sampling step (CFG, batch 2)", lambda v: f"{v:.3f} s"),
    ("vae_decode_s", "VAE decode", lambda v: f"{v:.3f} s"),
    ("image_s", "whole image", lambda v: f"{v:.3f} s"),
    ("peak_memory_bytes", "peak memory", _fmt_bytes),
    ("step_flops", "step FLOPs", _fmt_flops),
    ("step_flops_per_s", "step FLOP rate", lambda v: _fmt_flops(v, "/s")),
    ("matmul_flops_per_s", "matmul FLOP rate", lambda v: _fmt_flops(v, "/s")),
    ("step_over_matmul", "step rate / matmul rate", lambda v: f"{v:.3f}"),
    ("step_over_matmul_range", "  range over the pairs", lambda v: f"{v[0]:.3f} - {v[1]:.3f}"),
)


def format_table(results: dict[str, Any]) -> str:
    """The results as an aligned two-column table."""
    head = (
        f"DiffBIR benchmark: {results['config']} ControlLDM + {results['stage1']}, "
        f"{results['size']}x{results['size']} (latent {results['latent']}x{results['latent']}), "
        f"{results['precision']}, {results['device']}, {results['threads']} threads, "
        f"median of {results['repeats']} after {results['warmup']} warm-up"
        + (", freed memory kept mapped" if results["heap_retained"] else "")
    )
    rows = [(label, fmt(results[key])) for key, label, fmt in ROWS if key in results]
    if "image_s" in results:
        rows[[r[0] for r in rows].index("whole image")] = (
            f"whole image ({results.get('sampler', 'spaced')}, {results['steps']} steps)",
            f"{results['image_s']:.3f} s",
        )
    rows.append(("matmul size", f"{results['matmul_size']}^2"))
    width = max(len(label) for label, _ in rows)
    return "\n".join([head, *(f"  {label:<{width}}  {value}" for label, value in rows)])


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
