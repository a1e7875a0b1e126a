"""One upload restored by the one runner (no Gradio here): the same config object and the same
:class:`~diffbir.pipeline.runner.Runner` as ``diffbir-infer``, with models kept loaded between
runs, a cancel event and a per-step callback.

The upload is restored under its own file name, because each image's seed derives from the run
seed and its name: the same file restored by ``diffbir-infer --config <the run's config.yaml>
--input <file>`` gives the same bytes.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffbir.pipeline.cli import USER_ERRORS
from diffbir.pipeline.jobs import Report, plan_jobs
from diffbir.pipeline.loading import ModelPlan, load_restorer
from diffbir.pipeline.options import InferenceConfig, RunOptions
from diffbir.pipeline.presets import CONFIG_FILE
from diffbir.pipeline.runner import EXIT_INTERRUPTED, Models, Runner
from diffbir.pipeline.sampling import StepCallback


class ModelCache:
    """The ``load`` of :class:`~diffbir.pipeline.runner.Runner` that keeps the models of the
    last plan loaded: the same weight files, model configs, precision and device give the
    same models (a :class:`~diffbir.pipeline.restorer.Restorer`, or the unaligned-face task's
    :class:`~diffbir.pipeline.faces.FaceRestorer`). One set at a time: asking for another
    (say another version) unloads the previous one first, so memory holds one model."""

    def __init__(self, load: Callable[..., Models] = load_restorer) -> None:
        self._load = load  # load(plan, device=..., precision=...), as load_restorer
        self._key: tuple[str, str, str] | None = None
        self._restorer: Models | None = None
        self._lock = threading.Lock()

    def __call__(self, plan: ModelPlan, cfg: InferenceConfig, device: torch.device) -> Models:
        key = (repr(plan), cfg.precision, str(device))
        with self._lock:
            if self._restorer is None or key != self._key:
                self._key, self._restorer = None, None
                self._restorer = self._load(plan, device=device, precision=cfg.precision)
                self._key = key
            return self._restorer


@dataclass
class Outcome:
    """What became of one upload: the restored images (one per sample), the run's
    ``config.yaml``, the sampling steps done, and why there is no image, if there is none
    (``cancelled``, or ``failure``: the runner's reason)."""

    images: list[Path] = field(default_factory=list)
    config: Path | None = None
    steps: int = 0
    cancelled: bool = False
    failure: str | None = None
    seconds: float = 0.0


def restore_upload(
    cfg: InferenceConfig,
    upload: Path,
    workdir: Path,
    *,
    load: Any,
    stop: threading.Event,
    on_step: StepCallback | None = None,
) -> Outcome:
    """Restore the image file ``upload`` with ``cfg`` into ``workdir``: ``input/`` (removed at
    the end) holds a copy under the upload's name, given to the runner as its input file (so
    that its key is that name, as with ``diffbir-infer --input <file>``); ``output/`` gets the
    results and ``config.yaml``. ``stop`` ends the run after the current sampling step. The
    runner's refusals (a bad option, missing weights, ...) are raised as it raises them."""
    started = time.monotonic()
    source, output = workdir / "input" / upload.name, workdir / "output"
    source.parent.mkdir(parents=True)
    shutil.copyfile(upload, source)
    outcome = Outcome()

    def step(info: dict[str, Any]) -> None:
        outcome.steps = info["i"] + 1
        if on_step is not None:
            on_step(info)

    options = RunOptions(input=str(source), output=str(output), progress=False)
    try:
        (job,) = plan_jobs(options, cfg, Report())
        result = Runner(cfg, options, load=load, stop=stop, on_step=step).run()
    finally:
        shutil.rmtree(source.parent, ignore_errors=True)
    outcome.seconds = time.monotonic() - started
    outcome.cancelled = result.status == EXIT_INTERRUPTED
    outcome.failure = result.report.failed[0][1] if result.report.failed else None
    if not outcome.cancelled and outcome.failure is None:
        outcome.images = list(job.outputs)
        outcome.config = output / CONFIG_FILE
    return outcome


def user_message(err: Exception) -> str | None:
    """The message to show for an error the user can fix (a refused option, missing or wrong
    weight files, ...), ``None`` for any other (a bug: its traceback goes to the log)."""
    return str(err) if isinstance(err, USER_ERRORS) else None
