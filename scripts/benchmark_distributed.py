"""Images/s of ``diffbir-infer`` with 1 and with N processes (tiny models, CPU) and the parallel
efficiency: ``python scripts/benchmark_distributed.py [--images 24] [--steps 20]``.

Each process count runs twice on the same output folder: once restoring every image, then again
with every output present (nothing to do: start-up, model loading, process group and summary
only). The difference is the restoring time, so start-up does not dilute the rate. Each process
uses one thread (as Lightning sets it on CPU), so N processes need N free cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffbir.tiny_weights import write_tiny_weights

REPO = Path(__file__).resolve().parent.parent


def _timed(command: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--size", type=int, default=32, help="input side (output: 2x)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--processes", type=int, default=2, help="compared with 1 process")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = write_tiny_weights(root / "weights")
        inputs = root / "inputs"
        inputs.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(inputs / f"{i:03d}.png")
        base = [
            sys.executable, str(REPO / "scripts" / "inference.py"), "--input", str(inputs),
            "--weights-dir", str(weights), "--cldm-config", "control_ldm_tiny", "--version", "v2",
            "--stage1-config", "bsrnet_tiny", "--upscale", "2", "--min-side", "64",
            "--steps", str(args.steps), "--device", "cpu", "--no-progress",
        ]  # fmt: skip
        rates = {}
        for count in (1, args.processes):
            command = [*base, "--output", str(root / f"out{count}"), "--devices", str(count)]
            total = _timed(command)
            overhead = _timed(command)  # all outputs exist now: start-up and teardown only
            rates[count] = args.images / (total - overhead)
            print(
                f"{count} process(es): {total:.1f} s in total, {overhead:.1f} s start-up, "
                f"{rates[count]:.2f} images/s while restoring"
            )
        speedup = rates[args.processes] / rates[1]
        print(
            f"speed-up {speedup:.2f}x with {args.processes} processes, parallel efficiency "
            f"{speedup / args.processes:.0%} ({os.cpu_count()} CPU cores on this machine)"
        )


if __name__ == "__main__":
    main()
