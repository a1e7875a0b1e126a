"""The one runner behind every way of running a restoration: the CLI, many processes, the demo
and the evaluation all hand it an :class:`~diffbir.pipeline.options.InferenceConfig` and
:class:`~diffbir.pipeline.options.RunOptions`.

:meth:`Runner.prepare` checks everything that can fail without reading a model, before anything
is written: device and process count, inputs and output paths, prompts, the weight files (their
version and presence), the model configs and the captioner. :meth:`Runner.run` then records the
run (``config.yaml``, ``prompts.csv``), captions the inputs left to caption
(:mod:`~diffbir.pipeline.captions`) and frees the captioner, loads the restoration models and
restores the work list of the config's noise strategy (:mod:`~diffbir.pipeline.work`) in one
process or, through Lightning, in many, writing every output as soon as it is done. Ctrl-C (or
the caller's stop event) stops the run after the current caption batch or sampling step:
finished captions and outputs are kept, the summary is printed, status 130.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from diffbir.config import check_model_config
from diffbir.files import check_output_folder, remove_stale_temp_files
from diffbir.pipeline.captions import (
    CaptionPlan,
    caption_distributed,
    caption_local,
    plan_captions,
    whole_input,
    with_parts,
)
from diffbir.pipeline.device import resolve_device, retain_cpu_heap
from diffbir.pipeline.faces import FaceFinder, FacePrompts, FaceRestorer, PhotoTask
from diffbir.pipeline.jobs import (
    Job,
    Report,
    check_config_record,
    job_prompts,
    plan_jobs,
    record_run,
)
from diffbir.pipeline.loading import (
    ModelPlan,
    check_paths,
    load_face_detector,
    load_restorer,
    plan_from_config,
)
from diffbir.pipeline.options import InferenceConfig, RunOptions
from diffbir.pipeline.predict import (
    die_with_parent,
    forward_interrupt,
    gather_reports,
    make_trainer,
    placement_device,
    predict,
    process_count,
    wait_for_workers,
)
from diffbir.pipeline.restorer import Restorer
from diffbir.pipeline.sampling import StepCallback
from diffbir.pipeline.work import (
    ImageTask,
    ItemDataset,
    OutputWriter,
    Recipe,
    RunInterrupted,
    Task,
    WorkItem,
    noise_strategy,
    restore_item,
    stop_on,
)
from diffbir.schema import SettingError
from diffbir.versions import UNALIGNED_FACE

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130  # 130 = 128 + SIGINT, as shells report
Models = Restorer | FaceRestorer  # the unaligned-face task's: a FaceRestorer
LoadModels = Callable[[ModelPlan, InferenceConfig, torch.device], Models]


@dataclass
class RunPlan:
    """What :meth:`Runner.prepare` found: where the run goes, its jobs, their prompts (by job
    key, and by part key for the parts with a prompt of their own), the models it will load
    and its captioning stage (``faces``: what finds the faces to caption, for the
    unaligned-face task)."""

    device: torch.device
    processes: int
    jobs: list[Job]
    prompts: dict[str, str]
    models: ModelPlan
    report: Report
    captions: CaptionPlan
    faces: FaceFinder | None = None


@dataclass
class RunResult:
    """The exit status of a run (0 done, 1 some inputs failed, 130 interrupted) and what
    happened to each input."""

    status: int
    report: Report


@contextmanager
def stop_requests(stop: threading.Event, on_first: Callable[[], None] | None = None) -> Iterator:
    """While inside, Ctrl-C sets ``stop`` (the run ends after the current sampling step); a
    second Ctrl-C interrupts at once. Outside the main thread (the demo) only ``stop`` counts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            print("stopping after the current step (Ctrl-C again: at once)", file=sys.stderr)
        if on_first is not None:
            on_first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Runner:
    """Restores the inputs of ``run`` with the settings of ``cfg``.

    ``load`` builds the models of a plan (default: :func:`~.loading.load_restorer` with the
    config's precision and ``--compile``; the demo passes one that keeps them loaded);
    ``stop``: an event that ends the run after the current sampling step; ``on_step``: called
    after every sampling step with ``{"i", "total", ...}``.
    """

    def __init__(
        self,
        cfg: InferenceConfig,
        run: RunOptions,
        *,
        load: LoadModels | None = None,
        stop: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        self.cfg = cfg
        self.options = run
        self.load = load or self._load
        self.stop = stop or threading.Event()
        self.on_step = on_step
        self.output = Path(run.output)

    def _load(self, plan: ModelPlan, cfg: InferenceConfig, device: torch.device) -> Models:
        return load_restorer(
            plan, device=device, precision=cfg.precision, compile=self.options.compile
        )

    # ----- checks -----
    def prepare(self) -> RunPlan:
        """Every check that needs no model and writes nothing but the output folder itself;
        a bad argument raises ValueError (naming the flag, key or file), missing weights
        :class:`~diffbir.weights.MissingWeightsError`."""
        cfg, run = self.cfg, self.options
        device = resolve_device(cfg.device)
        processes = process_count(run, device)
        if cfg.seed_mode == "official" and processes > 1:
            raise SettingError(
                f"--seed-mode official: one noise stream in file order needs one process, got "
                f"{processes} (--devices {run.devices}, --num-nodes {run.num_nodes})"
            )
        if run.save_faces and cfg.task != UNALIGNED_FACE:
            raise SettingError(f"--save-faces: only used with --task {UNALIGNED_FACE}, or drop it")
        report = Report()
        jobs = plan_jobs(run, cfg, report)
        prompts = job_prompts(cfg, jobs)
        models = plan_from_config(cfg)
        check_model_config(models.cldm_config)
        for stage1_config in (models.stage1_config, models.faces and models.faces.stage1_config):
            if stage1_config:
                check_model_config(stage1_config)
        check_output_folder(run.output)
        check_config_record(self.output, OmegaConf.structured(cfg), jobs, run.overwrite)
        check_paths(models)
        faces, requests_of = None, whole_input
        if cfg.task == UNALIGNED_FACE and cfg.caption.name != "none":  # each face captioned too
            faces = FaceFinder(
                lambda on: load_face_detector(models, on), cfg.faces, cfg.restore.upscale
            )
            requests_of = with_parts(faces.crops)
        captions = plan_captions(
            cfg, jobs, output=self.output, overwrite=run.overwrite, device=device,
            requests_of=requests_of,
        )  # fmt: skip
        prompts.update(captions.prompts(jobs, captions.known))
        return RunPlan(device, processes, jobs, prompts, models, report, captions, faces)

    # ----- the run -----
    def run(self) -> RunResult:
        """Prepare, record, load the models and restore; prints the summary."""
        started = time.time()
        plan = self.prepare()
        remove_stale_temp_files(self.output, older_than=started)
        report, run = plan.report, self.options
        todo = []
        for job in plan.jobs:
            if job.done() and not run.overwrite:
                report.skipped.append(job.source)
            else:
                todo.append(job)
        record_run(
            self.output, OmegaConf.structured(self.cfg), plan.prompts, plan.jobs, todo,
            run.overwrite, plan.captions.known, {r.key for r in plan.captions.requests},
        )  # fmt: skip
        trainer = None
        if plan.processes > 1:
            die_with_parent()
            trainer = make_trainer(run, plan.device)
        elif not todo:
            print(report.summary())
            return RunResult(EXIT_FAILED if report.failed else EXIT_OK, report)
        # every rank takes part in a many-process run, even with nothing left to do
        try:
            self._caption(plan, trainer)
        except (RunInterrupted, KeyboardInterrupt):
            if trainer is not None:
                wait_for_workers(trainer)
                if not trainer.is_global_zero:
                    return RunResult(EXIT_INTERRUPTED, report)
            return self._interrupted(report, todo)
        if plan.device.type == "cpu" and not run.system_malloc:
            retain_cpu_heap()
        restorer = self.load(
            plan.models, self.cfg, placement_device(plan.device, plan.processes)
        )
        strategy = noise_strategy(self.cfg)
        items = strategy.items(plan.jobs, todo, self.cfg.batch_size)
        recipe = Recipe(
            self.cfg.restore, self.cfg.num_samples, plan.prompts, strategy,
            stop_on(self.stop, self.on_step), self._task(plan.prompts),
        )  # fmt: skip
        writer = OutputWriter({job.key: job for job in plan.jobs}, Report())
        if trainer is not None:
            return self._run_distributed(plan, trainer, restorer, recipe, items, writer, todo)
        try:
            self._run_local(restorer, recipe, items, writer, len(todo))
        except (RunInterrupted, KeyboardInterrupt):
            return self._interrupted(report.merge([writer.report]), todo)
        total = report.merge([writer.report])
        print(total.summary())
        return RunResult(EXIT_FAILED if total.failed else EXIT_OK, total)

    def _caption(self, plan: RunPlan, trainer: pl.Trainer | None) -> None:
        """The captioning stage, before the restoration models load: the inputs left to
        caption are captioned (each caption recorded as it arrives) and their prompts set."""
        stage = plan.captions
        if not stage.enabled:
            return
        if plan.faces is not None:  # the detector goes on this rank's device, at the first photo
            plan.faces.device = placement_device(plan.device, plan.processes)
        try:
            if trainer is None:
                with stop_requests(self.stop):
                    captions = caption_local(stage, plan.device, self.stop, self.options.progress)
            else:  # every rank, even with nothing to caption: the processes start here
                with stop_requests(self.stop, on_first=lambda: forward_interrupt(trainer)):
                    captions = caption_distributed(stage, trainer, plan.device, self.stop)
        finally:
            if plan.faces is not None:
                plan.faces.close()
        plan.prompts.update(stage.prompts(plan.jobs, captions))

    def _task(self, prompts: Mapping[str, str]) -> Task:
        """What restoring an input means (a photo and its faces, or one image); ``prompts``:
        the run's, by job key and part key."""
        if self.cfg.task == UNALIGNED_FACE:
            return PhotoTask(
                self.cfg.faces, keep=self.options.save_faces, prompt=FacePrompts(prompts)
            )
        return ImageTask()

    def _run_local(
        self, restorer: Models, recipe: Recipe, items: Sequence[WorkItem],
        writer: OutputWriter, count: int,
    ) -> None:  # fmt: skip
        """One process, no Trainer: the items in order, each written as it ends."""
        dataset = ItemDataset(items)
        progress = self.options.progress
        images = tqdm(total=count, desc="images", unit="img", disable=not progress)
        steps = tqdm(desc="sampling", leave=False, disable=not progress)
        on_step = recipe.callback

        def step(info: dict[str, Any]) -> None:
            if info["i"] == 0:
                steps.reset(total=info["total"])
            steps.update()
            on_step(info)

        recipe.callback = step
        with images, steps, stop_requests(self.stop):
            for index, item in enumerate(items):
                if self.stop.is_set():
                    raise RunInterrupted
                writer.write(restore_item(restorer, dataset[index], recipe))
                if not item.replay:
                    images.update(len(item.jobs))

    def _run_distributed(
        self, plan: RunPlan, trainer: pl.Trainer, restorer: Models, recipe: Recipe,
        items: Sequence[WorkItem], writer: OutputWriter, todo: Sequence[Job],
    ) -> RunResult:  # fmt: skip
        """``Trainer.predict`` over ``--devices`` x ``--num-nodes`` processes. Returns this
        process's status: on rank 0, 1 if any rank failed an input; 0 on the other ranks (a
        launcher reads a worker's non-zero status as a crash). Rank 0 prints the summary."""
        jobs = {job.key: job for job in plan.jobs}
        try:
            with stop_requests(self.stop, on_first=lambda: forward_interrupt(trainer)):
                predict(trainer, restorer, recipe, items, jobs, writer)
        except (RunInterrupted, KeyboardInterrupt):
            wait_for_workers(trainer)
            if not trainer.is_global_zero:
                return RunResult(EXIT_INTERRUPTED, writer.report)
            # the other ranks' reports are out of reach: what they wrote is on the disk
            report = plan.report.merge([writer.report])
            report.restored = [job.source for job in todo if job.done()]
            return self._interrupted(report, todo)
        rank_reports = gather_reports(writer.report, trainer.world_size)
        total = plan.report.merge(rank_reports)
        if not trainer.is_global_zero:
            return RunResult(EXIT_OK, total)
        print(total.summary())
        for rank, r in enumerate(rank_reports):
            print(f"  rank {rank}: {len(r.restored)} restored, {len(r.failed)} failed")
        return RunResult(EXIT_FAILED if total.failed else EXIT_OK, total)

    def _interrupted(self, report: Report, todo: Sequence[Job]) -> RunResult:
        failed = {source for source, _ in report.failed}
        left = sum(1 for job in todo if not job.done() and job.source not in failed)
        print(
            f"interrupted: {left} input(s) not processed; finished outputs are kept, run the "
            "same command again to continue",
            file=sys.stderr,
        )
        print(report.summary())
        return RunResult(EXIT_INTERRUPTED, report)
