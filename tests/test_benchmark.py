"""The benchmark script runs end to end on the tiny config and reports every field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffbir.benchmark import ROWS, main

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_script_tiny_prints_every_field(tmp_path: Path) -> None:
    out_json = tmp_path / "bench" / "results.json"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "benchmark.py"),
        "--config", "tiny", "--size", "64", "--precision", "fp32", "--device", "cpu",
        "--repeats", "1", "--warmup", "0", "--matmul-size", "128", "--threads", "1",
        "--json", str(out_json),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out_json.read_text())
    for key, label, _ in ROWS:
        assert key in results, key
        assert label in proc.stdout, label
    assert results["step_flops"] > 0 and results["matmul_flops_per_s"] > 0
    assert results["latent"] == 8 and results["config"] == "tiny"


@pytest.mark.parametrize("argv", [["--size", "100"], ["--parts", "step,warp"], ["--steps", "1"]])
def test_benchmark_rejects_bad_arguments(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err
