"""The startup part of the benchmark: a fresh process that imports the package and loads
full-size random weights written once in the official file formats; its times and peak memory.

``python -m diffbir.benchmark.startup SD_FILE CONTROLNET_FILE PRECISION DEVICE HEAP CLDM_CONFIG``
is that process (it prints one JSON line); :func:`measure_startup` starts it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from diffbir.benchmark.timing import progress

_START = time.perf_counter()  # before the heavy imports: they are part of the startup time


def cldm_config_name(config: str) -> str:
    """The ControlLDM config of a benchmark size (tiny or full)."""
    return "control_ldm_tiny" if config == "tiny" else "control_ldm"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _child(argv: list[str]) -> dict[str, Any]:
    """The measured process: import, then build and load, watching the private memory."""
    import torch  # noqa: F401  (imports are what is timed)

    import diffbir.models.control_ldm  # noqa: F401  (imports open_clip: import time)
    from diffbir.pipeline import retain_cpu_heap
    from diffbir.pipeline.loading import WeightPaths, build_restorer

    sd_file, controlnet_file, precision, device, heap, cldm_config = argv
    if heap == "retain":
        retain_cpu_heap()  # as diffbir-infer does
    imported = time.perf_counter()
    base_rss, base_anon = _status("VmRSS:"), _status("RssAnon:")
    peak = [0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], _status("RssAnon:"))
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    paths = WeightPaths(sd=Path(sd_file), controlnet=Path(controlnet_file), stage1=None)
    restorer = build_restorer(
        "custom", paths, precision=precision, device=device, cldm_config=cldm_config
    )
    loaded = time.perf_counter()
    time.sleep(0.05)
    return {
        "startup_import_s": imported - _START,
        "startup_load_s": loaded - imported,
        "startup_model_bytes": sum(
            t.numel() * t.element_size() for t in restorer.cldm.state_dict().values()
        ),
        "startup_peak_rss_bytes": _status("VmHWM:") - base_rss,
        "startup_peak_private_bytes": max(peak[0], _status("RssAnon:")) - base_anon,
    }


def write_random_weights(folder: Path, config: str) -> tuple[Path, Path]:
    """Random SD 2.1 and IRControlNet files of the ``config`` (tiny or full) models in the
    official formats, written once to ``folder``."""
    import torch

    from diffbir.config import build_model, load_config
    from diffbir.models.control_ldm import ControlLDM

    sd_file = folder / f"sd21_{config}_random.ckpt"
    controlnet_file = folder / f"controlnet_{config}_random.pth"
    if sd_file.is_file() and controlnet_file.is_file():
        return sd_file, controlnet_file
    progress(f"writing random {config}-size weights to {folder} (once)")
    folder.mkdir(parents=True, exist_ok=True)
    cldm: ControlLDM = build_model(load_config(cldm_config_name(config)))  # type: ignore[assignment]
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
            sys.executable, "-m", "diffbir.benchmark.startup", str(sd_file),
            str(controlnet_file), precision,
            device, "retain" if retain_heap else "system", cldm_config_name(config),
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




if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1:])))
