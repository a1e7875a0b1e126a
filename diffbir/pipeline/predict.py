"""Batch restoration over many processes with Lightning's ``Trainer.predict`` (and without it).

The work list is decided once, before any restoration: inputs whose outputs exist are dropped,
the rest are bucketed by input size (same input size, same working size: a batch really fills)
and cut into batches of at most ``--batch-size``. Under DDP rank 0 decides the list and sends it
to every rank, and rank ``r`` of ``W`` takes the batches ``r, r + W, ...`` (no image twice, none
padded in). Each image keeps its seed ``derive_seed(run seed, key, sample)``, so neither the
order, the batch size nor the number of processes changes an output.

:class:`RestorePredictor` restores a batch and returns images and failure records (it neither
writes nor prints); :class:`ImageWriter` writes them atomically as each batch ends and keeps a
per-rank :class:`~diffbir.pipeline.cli.Report`. An unreadable image is a failure record, never
an exception: a rank that raised would leave the others waiting at the final gather. After the
predict loop every rank gathers the reports; rank 0 prints the one summary. A single-process run
is a plain loop over the same batches and writer, without a Trainer.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from diffbir.pipeline.checks import memory_limit, memory_problem
from diffbir.pipeline.image_io import ImageReadError, to_tensor, write_png
from diffbir.pipeline.restorer import RestoreOptions, Restorer

if TYPE_CHECKING:
    from diffbir.pipeline.cli import Job, Report

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
Size = tuple[int, int]
# how many processes a launcher started: torchrun (and Lightning's own children), srun
_LAUNCHED_PROCESSES = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


# ----- the work list -----
def probe_size(job: Job) -> Size | None:
    """(height, width) of an input file as it will be read (EXIF rotation applied), from its
    header; ``None`` when unknown (sample photos, unreadable files: they get batches of one)."""
    path = Path(job.source)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    return height, width


def bucket_batches(
    jobs: Sequence[Job], batch_size: int, size_of: Callable[[Job], Size | None] = probe_size
) -> list[list[Job]]:
    """Jobs grouped by input size (buckets in order of first appearance), cut into batches of
    at most ``batch_size``; a job of unknown size is a batch of its own."""
    buckets: dict[Size | int, list[Job]] = {}
    for i, job in enumerate(jobs):
        size = size_of(job)
        buckets.setdefault(i if size is None else size, []).append(job)
    return [
        bucket[start : start + batch_size]
        for bucket in buckets.values()
        for start in range(0, len(bucket), batch_size)
    ]


def shard(count: int, rank: int, world_size: int) -> range:
    """The items of rank ``rank``: ``rank, rank + world_size, ...`` (disjoint, union = all)."""
    return range(rank, count, world_size)


class ShardSampler(Sampler):
    """The item indices of one rank, in order (see :func:`shard`)."""

    def __init__(self, count: int, rank: int, world_size: int) -> None:
        self.indices = shard(count, rank, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BatchDataset(Dataset):
    """Item ``i`` is batch ``i`` of the work list, loaded: ``keys``, ``sources`` and ``images``
    ((1, 3, H, W) tensors) of the readable inputs, and ``failures`` ``(source, reason)``."""

    def __init__(self, batches: Sequence[Sequence[Job]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"keys": [], "sources": [], "images": [], "failures": []}
        for job in self.batches[index]:
            try:
                image = to_tensor(job.load())
            except ImageReadError as err:
                item["failures"].append((job.source, err.reason))
                continue
            item["keys"].append(job.key)
            item["sources"].append(job.source)
            item["images"].append(image)
        return item


# ----- restoring and writing -----
@dataclass(frozen=True)
class Recipe:
    """What decides an output besides the models and the input: the options, the seeds
    ``derive_seed(run_seed, key, sample)`` of ``samples`` samples, and the positive prompt of
    each input key."""

    options: RestoreOptions
    run_seed: int
    samples: int
    derive_seed: Callable[[int, str, int], int]
    prompts: Mapping[str, str]

    def seeds(self, key: str) -> list[int]:
        return [self.derive_seed(self.run_seed, key, k) for k in range(self.samples)]


def restore_batch(restorer: Restorer, item: Mapping[str, Any], recipe: Recipe) -> dict[str, list]:
    """Restore one loaded batch: ``restored`` ``(key, stage1, samples)`` (CPU tensors) and
    ``failures`` ``(source, reason)``. Images of different sizes are restored in groups."""
    restored: list[tuple[str, Tensor, Tensor]] = []
    failures = list(item["failures"])
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(item["images"]):
        groups.setdefault(tuple(image.shape), []).append(i)
    limit, element_size = memory_limit(restorer.device), torch.finfo(restorer.dtype).bits // 8
    for members in groups.values():
        keys = [item["keys"][i] for i in members]
        height, width = item["images"][members[0]].shape[-2:]
        count = len(members) * recipe.samples  # images in stage 2 at once
        problem = memory_problem(height, width, recipe.options, count, element_size, limit)
        if problem:  # refused before stage 1, instead of dying in the allocator
            failures += [(item["sources"][i], problem) for i in members]
            continue
        try:
            lq = torch.cat([item["images"][i] for i in members])
            seeds = [recipe.seeds(k) for k in keys]
            result = restorer.restore(lq, seeds, recipe.options, [recipe.prompts[k] for k in keys])
        except (RuntimeError, ValueError, OSError) as err:
            failures += [(item["sources"][i], f"restoration failed: {err}") for i in members]
            continue
        restored += [(k, result.stage1[j], result.samples[j]) for j, k in enumerate(keys)]
    return {"restored": restored, "failures": failures}


class ImageWriter(BasePredictionWriter):
    """Writes each restored batch as it ends (atomic PNGs) and keeps this rank's report."""

    def __init__(self, jobs: Mapping[str, Job], report: Report) -> None:
        super().__init__(write_interval="batch")
        self.jobs = jobs
        self.report = report

    def write(self, prediction: Mapping[str, list]) -> None:
        """Write one :func:`restore_batch` result; record what happened to each input."""
        for key, stage1, samples in prediction["restored"]:
            job = self.jobs[key]
            try:
                if job.stage1_output is not None:
                    write_png(job.stage1_output, stage1)
                for path, sample in zip(job.outputs, samples, strict=True):
                    write_png(path, sample)
            except OSError as err:
                self.report.fail(job.source, f"writing failed: {err}")
                continue
            self.report.restored.append(job.source)
        for source, reason in prediction["failures"]:
            self.report.fail(source, reason)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.write(prediction)


class RestorePredictor(pl.LightningModule):
    """The restoration models as one LightningModule; the Trainer places them on the device.

    ``predict_step`` returns the :func:`restore_batch` result of a loaded batch.
    """

    def __init__(self, restorer: Restorer, recipe: Recipe) -> None:
        super().__init__()
        self.cldm = restorer.cldm
        self.stage1 = restorer.stage1_spec.model
        self.restorer = restorer
        self.recipe = recipe
        # with fewer batches than ranks some shards are empty; those ranks only join the gather
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def on_predict_start(self) -> None:
        self.restorer.device = self.device  # the Trainer moved the modules the Restorer uses

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, list]:
        return restore_batch(self.restorer, batch, self.recipe)


class WorkData(pl.LightningDataModule):
    """The work list under DDP: rank 0 buckets the jobs and broadcasts the batches (as keys), so
    every rank shards the same list even if the output folder changed between their starts."""

    def __init__(self, todo: Sequence[Job], jobs: Mapping[str, Job], batch_size: int) -> None:
        super().__init__()
        self.todo = todo
        self.jobs = jobs
        self.batch_size = batch_size
        self.batches: list[list[Job]] = []

    def setup(self, stage: str) -> None:
        keys = None
        if self.trainer.is_global_zero:
            keys = [[job.key for job in b] for b in bucket_batches(self.todo, self.batch_size)]
        keys = self.trainer.strategy.broadcast(keys, src=0)
        unknown = [k for batch in keys for k in batch if k not in self.jobs]
        if unknown:
            raise RuntimeError(
                f"rank {self.trainer.global_rank} does not see the inputs {unknown[:3]} that rank "
                "0 listed: every rank must see the same --input folder"
            )
        self.batches = [[self.jobs[k] for k in batch] for batch in keys]

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardSampler(len(self.batches), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(BatchDataset(self.batches), batch_size=None, sampler=sampler)


# ----- command line -----
def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--devices``, ``--num-nodes`` and ``--strategy`` of ``diffbir-infer``."""
    g = parser.add_argument_group(
        "many processes (Lightning Trainer.predict; also under torchrun or SLURM srun)"
    )
    g.add_argument(
        "--devices",
        default="1",
        help="processes per node: a number, or auto (every visible GPU; 1 on CPU); on CPU, "
        "N means N processes with the gloo backend",
    )
    g.add_argument("--num-nodes", type=int, default=1, help="number of nodes")
    g.add_argument("--strategy", default="ddp", help="Lightning strategy when processes > 1")


def _accelerator(device: torch.device) -> str:
    return {"cuda": "gpu"}.get(device.type, device.type)


def process_count(args: argparse.Namespace, device: torch.device) -> int:
    """How many processes the run has (``--devices`` x ``--num-nodes``); ValueError names the
    flag. A run launched by torchrun/SLURM must ask for as many processes as were started."""
    if args.num_nodes < 1:
        raise ValueError(f"--num-nodes: expected >= 1, got {args.num_nodes}")
    if args.devices == "auto":
        per_node = torch.cuda.device_count() if device.type == "cuda" else 1
    elif args.devices.isdigit() and int(args.devices) >= 1:
        per_node = int(args.devices)
    else:
        raise ValueError(f"--devices: expected a number >= 1 or auto, got {args.devices!r}")
    count = per_node * args.num_nodes
    if count > 1 and device.index is not None:
        raise ValueError(
            f"--device {device}: one device for {count} processes; use --device {device.type}"
        )
    launched = max(int(os.environ.get(name, "1")) for name in _LAUNCHED_PROCESSES)
    if count == 1 and launched > 1:
        raise ValueError(
            f"this process is one of {launched} started by torchrun or srun: pass --devices "
            "(processes per node) and --num-nodes to match them"
        )
    return count


def placement_device(device: torch.device, processes: int) -> torch.device:
    """Where to load the models: ``device``, or with many processes on GPUs this process's GPU
    (the one the Trainer will use: local rank from Lightning, torchrun or SLURM)."""
    if processes == 1 or device.type != "cuda":
        return device
    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return torch.device("cuda", int(local_rank))


def die_with_parent() -> None:
    """Under a launcher (Lightning's own, torchrun), end this worker if its parent dies, so
    that killing the job's main process leaves no rank behind waiting at a collective."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before prctl
        os.kill(os.getpid(), signal.SIGKILL)


def run_local(
    restorer: Restorer, todo: Sequence[Job], recipe: Recipe, report: Report, batch_size: int
) -> None:
    """One process, no Trainer: the same batches and writer as :func:`run_distributed`."""
    batches = bucket_batches(todo, batch_size)
    writer = ImageWriter({job.key: job for job in todo}, report)
    dataset = BatchDataset(batches)
    progress = recipe.options.progress
    with tqdm(total=len(todo), desc="images", unit="img", disable=not progress) as bar:
        for index in range(len(dataset)):
            writer.write(restore_batch(restorer, dataset[index], recipe))
            bar.update(len(batches[index]))


def run_distributed(
    args: argparse.Namespace,
    restorer: Restorer,
    todo: Sequence[Job],
    jobs: Sequence[Job],
    recipe: Recipe,
    plan_report: Report,
    device: torch.device,
    batch_size: int,
) -> int:
    """``Trainer.predict`` over ``--devices`` x ``--num-nodes`` processes; returns the exit
    status of this process: on rank 0, 1 if any rank failed an input; 0 on the other ranks (a
    launcher reads a worker's non-zero status as a crash). Rank 0 prints the one summary."""
    report = type(plan_report)()
    writer = ImageWriter({job.key: job for job in jobs}, report)
    trainer = pl.Trainer(
        accelerator=_accelerator(device),
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision="32-true",  # the Restorer casts the models to --precision itself
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=recipe.options.progress,
        use_distributed_sampler=False,  # WorkData shards the batches itself
        inference_mode=False,  # restoration guidance needs gradients
        callbacks=[writer],
    )
    quiet = replace(recipe, options=replace(recipe.options, progress=False))  # no bar per rank
    predictor = RestorePredictor(restorer, quiet)
    data = WorkData(todo, {job.key: job for job in jobs}, batch_size)
    with warnings.catch_warnings():
        # items are whole batches (batch_size=None): the writer needs no sampler indices
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        trainer.predict(predictor, datamodule=data, return_predictions=False)
    rank_reports = gather_reports(report, trainer.world_size)
    total = merge_reports([plan_report, *rank_reports])
    if trainer.is_global_zero:
        print(total.summary())
        for rank, r in enumerate(rank_reports):
            print(f"  rank {rank}: {len(r.restored)} restored, {len(r.failed)} failed")
    return 1 if total.failed and trainer.is_global_zero else 0


def gather_reports(report: Report, world_size: int) -> list[Report]:
    """Every rank's report, on every rank (a collective: every rank must call it).

    Called after ``trainer.predict`` rather than in ``on_predict_epoch_end``: Lightning skips
    the predict loop, hooks included, on a rank whose shard is empty (fewer batches than ranks),
    and the other ranks would wait for it forever.
    """
    if world_size == 1 or not dist.is_initialized():
        return [report]
    gathered: list[Report | None] = [None] * world_size
    dist.all_gather_object(gathered, report)
    return [r for r in gathered if r is not None]


def merge_reports(reports: Sequence[Report]) -> Report:
    """One report holding every list of every report, in order."""
    merged = type(reports[0])()
    for report in reports:
        for f in fields(report):
            value = getattr(report, f.name)
            if isinstance(value, list):
                getattr(merged, f.name).extend(value)
    return merged
