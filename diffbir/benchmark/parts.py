"""The parts of an image the benchmark times, with random weights: stage 1, the text encoder,
VAE encode, one CFG sampling step (with its FLOPs and the matmul rate beside it), VAE decode,
the colour fix and one whole image through the Python API."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffbir.benchmark.startup import cldm_config_name, measure_startup
from diffbir.benchmark.timing import (
    bench_step,
    matmul_rate,
    peak_memory_bytes,
    profile_step,
    progress,
    time_fn,
)
from diffbir.config import build_model, load_config
from diffbir.diffusion import GuidedModel
from diffbir.pipeline import Cleaner, RestoreOptions, Restorer, SamplerOptions, resolve_device
from diffbir.pipeline.color import color_fix
from diffbir.pipeline.device import (
    PRECISIONS,
    cpu_has_fast_half,
    retain_cpu_heap,
    warn_if_slow_precision,
)
from diffbir.pipeline.precision import place_models
from diffbir.versions import V2_NEG_PROMPT, VERSIONS

STAGE1_UPSCALE = {"bsrnet": 4, "swinir": 1, "scunet": 1}
PARTS = ("stage1", "text", "encode", "step", "decode", "colorfix", "image", "startup")
# "startup" (a fresh process loading full-size weight files, written once) only when asked
DEFAULT_PARTS = PARTS[:-1]
# Per-image parts besides the sampling steps, and the step counts at which their share is shown.
OTHER_PARTS = ("stage1_s", "text_s", "vae_encode_s", "vae_decode_s", "color_fix_s")
SHARE_STEPS = (10, 50)


def build_models(config: str, stage1: str) -> tuple[torch.nn.Module, Cleaner]:
    """Random-weight ControlLDM and stage-1 model of the tiny or full-size configs."""
    suffix = "_tiny" if config == "tiny" else ""
    cldm = build_model(load_config(cldm_config_name(config)))
    model = build_model(load_config(f"{stage1}{suffix}"))
    spec = next(s for v in VERSIONS.values() for s in v.stage1.values() if s.config == stage1)
    return cldm, Cleaner(model, resize_first=spec.resize_first, enlarge_first=spec.enlarge_first)


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
        progress("startup (fresh process loading full-size weights)")
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
    cldm, cleaner = build_models(args.config, args.stage1)
    place_models(cldm, cleaner.model, device, dtype)
    restorer = Restorer(cldm, cleaner, compile=args.compile)
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
        progress("stage 1")
        results["stage1_s"], _ = time_fn(lambda: restorer.condition(lq, options), **timed)
    if "text" in args.parts:
        progress("text encoder (positive and negative prompt)")
        prompts = [options.pos_prompt, options.neg_prompt]
        results["text_s"], _ = time_fn(lambda: cldm.encode_text(prompts), **timed)
    if "encode" in args.parts:
        progress("VAE encode")
        x = image * 2 - 1
        results["vae_encode_s"], _ = time_fn(lambda: cldm.vae_encode(x), **timed)
        z = cldm.vae_encode(x).to(dtype)
    matmul = partial(matmul_rate, args.matmul_size, dtype, device, args.matmul_seconds)
    if "step" in args.parts:
        progress("sampling step and matmul, in turn")
        step = _step_fn(restorer, z, args.cfg_scale)
        results.update(bench_step(step, matmul, timed))
        if args.profile:
            progress("profiled step")
            results.update(profile_step(step, device, args.profile_rows))
    else:
        progress("matmul")
        results["matmul_flops_per_s"] = matmul()
    if "decode" in args.parts:
        progress("VAE decode")
        results["vae_decode_s"], _ = time_fn(lambda: cldm.vae_decode(z), **timed)
    if "colorfix" in args.parts:
        progress("colour fix (wavelet)")
        reference = torch.rand(image.shape, generator=gen).to(device)
        results["color_fix_s"], _ = time_fn(
            lambda: color_fix(image, reference, "wavelet"), **timed
        )
    if "image" in args.parts:
        progress("whole image")
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
        cldm = build_model(load_config(cldm_config_name(config)))
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
    texts = cldm.encode_text(["", V2_NEG_PROMPT]).to(dtype)
    cond = {"text": texts[:1], "latent": z}
    uncond = {"text": texts[1:], "latent": z}
    model = GuidedModel(restorer.sampler.forward, cond, uncond, scale)
    x = torch.randn(z.shape, generator=torch.Generator().manual_seed(1)).to(z.device, dtype)
    return lambda: model(x, 500.0)


