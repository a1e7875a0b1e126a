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
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
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
from diffbir.pipeline.color import color_fix
from diffbir.pipeline.device import (
    PRECISIONS,
    add_device_arguments,
    cpu_has_fast_half,
    retain_cpu_heap,
    warn_if_slow_precision,
)
from diffbir.versions import VERSIONS

STAGE1_UPSCALE = {"bsrnet": 4, "swinir": 1, "scunet": 1}
PARTS = ("stage1", "text", "encode", "step", "decode", "colorfix", "image", "startup")
# "startup" (a fresh process loading full-size weight files, written once) only when asked
DEFAULT_PARTS = PARTS[:-1]
# Per-image parts besides the sampling steps, and the step counts at which their share is shown.
OTHER_PARTS = ("stage1_s", "text_s", "vae_encode_s", "vae_decode_s", "color_fix_s")
SHARE_STEPS = (10, 50)
# Ops that only convert or move data (dtype casts, layout copies, .contiguous()), as dispatched.
COPY_OPS = ("_to_copy", "copy_", "clone")
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


def _cldm_config(config: str) -> str:
    return "control_ldm_tiny" if config == "tiny" else "control_ldm"


def build_models(config: str, stage1: str) -> tuple[torch.nn.Module, Stage1]:
    """Random-weight ControlLDM and stage-1 model of the tiny or full-size configs."""
    suffix = "_tiny" if config == "tiny" else ""
    cldm = build_model(load_config(_cldm_config(config)))
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args``; returns the results as a flat dict."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = PRECISIONS[args.precision]
    warn_if_slow_precision(device, dtype)
    results: dict[str, Any] = {
        "config": args.config,
        "stage1": args.stage1,
        "size": args.size,
        "latent": args.size // 8,
        "precision": args.precision,
        "native_precision": device.type != "cpu" or cpu_has_fast_half(dtype),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "steps": args.steps,
        "sampler": args.sampler,
        "compiled": args.compile,
    }
    if "startup" in args.parts:
        _progress("startup (fresh process loading full-size weights)")
        retain = device.type == "cpu" and not args.system_malloc
        results.update(
            measure_startup(args.startup_dir, args.config, args.precision, str(device), retain)
        )
    results["heap_retained"] = (
        device.type == "cpu" and not args.system_malloc and retain_cpu_heap()
    )
    results["matmul_size"] = args.matmul_size
    if args.parts == ["startup"]:
        return results
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cldm, stage1 = build_models(args.config, args.stage1)
    restorer = Restorer(cldm, stage1, device=device, dtype=dtype, compile=args.compile)
    with torch.inference_mode():
        results.update(_time_parts(args, restorer, device, dtype))
        results["peak_memory_bytes"] = peak_memory_bytes(device)
    if "step_s" in results:
        flops = count_step_flops(args.config, results["latent"], cfg=args.cfg_scale != 1)
        pairs = results.pop("step_matmul_pairs")
        results["step_flops"] = flops
        results["step_flops_per_s"] = flops / results["step_s"]
        results["matmul_flops_per_s"] = statistics.median(rate for _, rate in pairs)
        if results["native_precision"]:
            ratios = [flops / seconds / rate for seconds, rate in pairs]
            results["step_over_matmul"] = statistics.median(ratios)
            results["step_over_matmul_range"] = [min(ratios), max(ratios)]
        results.update(other_parts_share(results))
    return results


def _time_parts(
    args: argparse.Namespace, restorer: Restorer, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """Time the ``args.parts`` of one image (and profile a step with ``--profile``)."""
    cldm, upscale = restorer.cldm, STAGE1_UPSCALE[args.stage1]
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
    timed = {"repeats": args.repeats, "warmup": args.warmup, "device": device}
    results: dict[str, Any] = {}
    # Without the encode part, the step and the decoder run on a random latent.
    shape = (1, cldm.unet.out[-1].out_channels, latent, latent)
    z = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    if "stage1" in args.parts:
        _progress("stage 1")
        results["stage1_s"], _ = time_fn(lambda: restorer.stage1(lq, options), **timed)
    if "text" in args.parts:
        _progress("text encoder (positive and negative prompt)")
        prompts = [options.pos_prompt, options.neg_prompt]
        results["text_s"], _ = time_fn(lambda: cldm.encode_text(prompts), **timed)
    if "encode" in args.parts:
        _progress("VAE encode")
        x = image * 2 - 1
        results["vae_encode_s"], _ = time_fn(lambda: cldm.vae_encode(x), **timed)
        z = cldm.vae_encode(x).to(dtype)
    matmul = partial(matmul_rate, args.matmul_size, dtype, device, args.matmul_seconds)
    if "step" in args.parts:
        _progress("sampling step and matmul, in turn")
        step = _step_fn(restorer, z, args.cfg_scale)
        results.update(_bench_step(step, matmul, timed))
        if args.profile:
            _progress("profiled step")
            results.update(profile_step(step, device, args.profile_rows))
    else:
        _progress("matmul")
        results["matmul_flops_per_s"] = matmul()
    if "decode" in args.parts:
        _progress("VAE decode")
        results["vae_decode_s"], _ = time_fn(lambda: cldm.vae_decode(z), **timed)
    if "colorfix" in args.parts:
        _progress("colour fix (wavelet)")
        reference = torch.rand(image.shape, generator=gen).to(device)
        results["color_fix_s"], _ = time_fn(
            lambda: color_fix(image, reference, "wavelet"), **timed
        )
    if "image" in args.parts:
        _progress("whole image")
        results["image_s"], _ = time_fn(
            lambda: restorer.restore(lq, [[0]], options),
            device=device,
            repeats=args.image_repeats,
            warmup=0,
        )
    return results


def other_parts_share(results: dict[str, Any]) -> dict[str, float]:
    """Share of an image's time spent outside the sampling steps (stage 1, text encoder, VAE
    encode and decode, colour fix) at :data:`SHARE_STEPS` steps, from the timed parts."""
    if not all(key in results for key in (*OTHER_PARTS, "step_s")):
        return {}
    other = sum(results[key] for key in OTHER_PARTS)
    return {
        f"other_share_{steps}": other / (other + steps * results["step_s"])
        for steps in SHARE_STEPS
    }


def count_step_flops(config: str, latent: int, cfg: bool = True) -> int:
    """FLOPs of one UNet + IRControlNet forward at ``latent`` x ``latent`` (batch 2 with CFG).

    Counted on the ``meta`` device (no memory, no time, the same in every precision), where
    attention runs as two batched matmuls that FlopCounterMode counts; the fused CPU attention
    kernel has no FLOP formula and would count as zero. Convs, linears and attention matmuls
    count 2 FLOPs per multiply-add; norms, activations and softmax count nothing.
    """
    with torch.device("meta"):
        cldm = build_model(load_config(_cldm_config(config)))
        batch = 2 if cfg else 1
        x = torch.empty(batch, cldm.unet.out[-1].out_channels, latent, latent)
        context = torch.empty(batch, 77, cldm.unet.context_dim)
        cond = {"text": context, "latent": torch.empty_like(x)}
        t = torch.zeros(batch, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            cldm(x, t, cond)
    return counter.get_total_flops()


def _step_fn(restorer: Restorer, z: torch.Tensor, scale: float) -> Callable[[], torch.Tensor]:
    """One CFG step of the restorer's denoiser (one batch-2 forward of UNet + IRControlNet, or
    the compiled module with ``--compile``) at latent ``z``, prompts "" and the negative one."""
    cldm, dtype = restorer.cldm, z.dtype
    texts = cldm.encode_text(["", DEFAULT_NEG_PROMPT]).to(dtype)
    cond = {"text": texts[:1], "latent": z}
    uncond = {"text": texts[1:], "latent": z}
    model = GuidedModel(restorer.denoiser, cond, uncond, scale)
    x = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(z.device, dtype)
    return lambda: model(x, 500.0)


def _bench_step(
    step: Callable[[], torch.Tensor], matmul: Callable[[], float], timed: dict
) -> dict[str, Any]:
    """Time ``step``; after each timed step, measure the matmul rate. Returns the median step
    time, the pairs and the time of the first (warm-up) call, which includes any compilation."""
    pairs: list[tuple[float, float]] = []
    first_s, _ = time_fn(step, timed["device"], repeats=1, warmup=0)
    for index in range(timed["repeats"]):
        warmup = max(0, timed["warmup"] - 1) if index == 0 else 0
        _, (seconds,) = time_fn(step, timed["device"], repeats=1, warmup=warmup)
        pairs.append((seconds, matmul()))
        if sum(s for s, _ in pairs) > TIME_BUDGET_S:
            break
    return {
        "step_s": statistics.median(s for s, _ in pairs),
        "first_step_s": first_s,
        "step_matmul_pairs": pairs,
    }


class CopyCounter(TorchDispatchMode):
    """Counts the ops of :data:`COPY_OPS` (dtype conversions, layout copies) and the bytes they
    write, as dispatched: the same on every machine, whatever its speed in that precision."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in COPY_OPS and isinstance(out, torch.Tensor):
            self.calls[name] += 1
            self.bytes[name] += out.numel() * out.element_size()
        return out


def profile_step(step: Callable[[], Any], device: torch.device, rows: int) -> dict[str, Any]:
    """The top operators of one call of ``step`` (by self time) and its copy counts."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        _sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    counter = CopyCounter()
    # Python dispatch modes see nothing under inference mode: count under no_grad.
    with torch.inference_mode(False), torch.no_grad(), counter:
        step()
    return {
        "profile_table": prof.key_averages().table(sort_by=sort, row_limit=rows),
        "copy_calls": dict(counter.calls),
        "copy_bytes": dict(counter.bytes),
    }


_STARTUP = """
import json, sys, threading, time
from pathlib import Path
start = time.perf_counter()

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

peak = [0]

def watch():
    while True:
        peak[0] = max(peak[0], status("RssAnon:"))
        time.sleep(0.005)

import torch
import diffbir.models.control_ldm  # imports open_clip: counted as import time
from diffbir.pipeline import retain_cpu_heap
from diffbir.pipeline.loading import WeightPaths, build_restorer
if sys.argv[5] == "retain":
    retain_cpu_heap()  # as diffbir-infer does
imported = time.perf_counter()
base_rss, base_anon = status("VmRSS:"), status("RssAnon:")
threading.Thread(target=watch, daemon=True).start()
paths = WeightPaths(sd=Path(sys.argv[1]), controlnet=Path(sys.argv[2]), stage1=None)
restorer = build_restorer(
    "custom", paths, precision=sys.argv[3], device=sys.argv[4], cldm_config=sys.argv[6]
)
loaded = time.perf_counter()
time.sleep(0.05)
print(json.dumps({
    "startup_import_s": imported - start,
    "startup_load_s": loaded - imported,
    "startup_model_bytes": sum(
        t.numel() * t.element_size() for t in restorer.cldm.state_dict().values()
    ),
    "startup_peak_rss_bytes": status("VmHWM:") - base_rss,
    "startup_peak_private_bytes": max(peak[0], status("RssAnon:")) - base_anon,
}))
"""


def write_random_weights(folder: Path, config: str) -> tuple[Path, Path]:
    """Random SD 2.1 and IRControlNet files of the ``config`` (tiny or full) models in the
    official formats, written once to ``folder``."""
    from diffbir.models.control_ldm import ControlLDM

    sd_file = folder / f"sd21_{config}_random.ckpt"
    controlnet_file = folder / f"controlnet_{config}_random.pth"
    if sd_file.is_file() and controlnet_file.is_file():
        return sd_file, controlnet_file
    _progress(f"writing random {config}-size weights to {folder} (once)")
    folder.mkdir(parents=True, exist_ok=True)
    cldm: ControlLDM = build_model(load_config(_cldm_config(config)))  # type: ignore[assignment]
    sd = {key: value.contiguous() for key, value in cldm.sd_state_dict().items()}
    sd["betas"] = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.save({"state_dict": sd, "global_step": 0}, folder / "sd.tmp")
    del sd
    torch.save(
        {key: value.contiguous() for key, value in cldm.controlnet.state_dict().items()},
        controlnet_file,
    )
    (folder / "sd.tmp").replace(sd_file)
    return sd_file, controlnet_file


def measure_startup(
    folder: Path, config: str, precision: str, device: str, retain_heap: bool
) -> dict[str, Any]:
    """Import and weight-loading time of a fresh ``build_restorer`` process (the weight files
    are in the page cache: the disk's read time is not included) and its peak memory above
    the imported state: resident (includes the mapped file's pages, which the kernel can drop)
    and private (memory the process itself holds)."""
    sd_file, controlnet_file = write_random_weights(folder, config)
    proc = subprocess.run(
        [
            sys.executable, "-c", _STARTUP, str(sd_file), str(controlnet_file), precision,
            device, "retain" if retain_heap else "system", _cldm_config(config),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"startup measurement failed:\n{proc.stderr}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    peak, model = results["startup_peak_rss_bytes"], results["startup_model_bytes"]
    return {**results, "startup_peak_over_model": peak / model}


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
