"""Timing, FLOP and memory measurements of the benchmark (no model knowledge)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only convert or move data (dtype casts, layout copies, .contiguous()), as dispatched.
COPY_OPS = ("_to_copy", "copy_", "clone")
# Stop repeating a measurement once this many seconds were spent on it (after one repeat).
TIME_BUDGET_S = 120.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(part: str) -> None:
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


def bench_step(
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


