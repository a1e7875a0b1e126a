"""The benchmark script runs end to end on the tiny config and reports every field."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffbir.benchmark.cli import ROWS, main
from diffbir.benchmark.parts import PARTS
from diffbir.pipeline.device import cpu_has_fast_half

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run_script(argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # this checkout's package
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)


def test_benchmark_script_tiny_prints_every_field(tmp_path: Path) -> None:
    out_json = tmp_path / "bench" / "results.json"
    proc = _run_script(
        [
            "--config", "tiny", "--size", "64", "--precision", "fp32", "--device", "cpu",
            "--repeats", "1", "--warmup", "0", "--matmul-size", "128", "--matmul-seconds", "0.2",
            "--threads", "1", "--profile", "--profile-rows", "5",
            "--parts", ",".join(PARTS), "--startup-dir", str(tmp_path / "weights"),
            "--json", str(out_json),
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out_json.read_text())
    for key, label, _ in ROWS:
        assert key in results, key
        assert label in proc.stdout, label
    assert results["step_flops"] > 0 and results["matmul_flops_per_s"] > 0
    assert results["latent"] == 8 and results["config"] == "tiny"
    low, high = results["step_over_matmul_range"]
    assert low <= results["step_over_matmul"] <= high
    # the rest's share falls as the steps grow, and the parts add up to the whole image
    assert 0 < results["other_share_50"] < results["other_share_10"] < 1
    assert "Top operators of one sampling step" in proc.stdout
    assert "per step: aten._to_copy" in proc.stdout
    assert results["startup_load_s"] > 0 and results["startup_model_bytes"] > 0
    peak, model = results["startup_peak_rss_bytes"], results["startup_model_bytes"]
    assert results["startup_peak_over_model"] == pytest.approx(peak / model)


def test_benchmark_reports_no_ratio_without_native_half_precision() -> None:
    proc = _run_script(
        [
            "--config", "tiny", "--size", "64", "--precision", "bf16", "--device", "cpu",
            "--repeats", "1", "--warmup", "0", "--matmul-size", "64", "--matmul-seconds", "0.1",
            "--threads", "1", "--parts", "step",
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if cpu_has_fast_half(torch.bfloat16):
        assert "step rate / matmul rate  " in proc.stdout
    else:
        assert "not reported: no native bf16 on this CPU" in proc.stdout
        assert not re.search(r"step rate / matmul rate\s+\d", proc.stdout)


@pytest.mark.parametrize("argv", [["--size", "100"], ["--parts", "step,warp"], ["--steps", "1"]])
def test_benchmark_rejects_bad_arguments(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


_FAULTS = """
import resource, sys, torch
from diffbir.pipeline import retain_cpu_heap
applied = retain_cpu_heap() if sys.argv[1] == "retain" else False
def faults_of_fresh_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_fresh_tensor()
print(applied, min(faults_of_fresh_tensor() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_retained_heap_reuses_pages_of_freed_tensors() -> None:
    """With the default malloc every fresh 64 MiB tensor page-faults all its 16k pages; with
    the heap retained, a tensor allocated after one was freed reuses the mapped pages."""
    out = {}
    for mode in ("system", "retain"):
        proc = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        applied, faults = proc.stdout.split()
        out[mode] = (applied == "True", int(faults))
    pages = 64 * 2**20 // resource.getpagesize()
    assert out["system"] == (False, out["system"][1]) and out["system"][1] > pages // 2
    assert out["retain"][0] and out["retain"][1] < pages // 20
