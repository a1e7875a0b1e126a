"""Many processes with Lightning's ``Trainer.predict``: the runner's work over ``--devices`` x
``--num-nodes`` processes (DDP; also under torchrun or SLURM srun).

Rank 0 decides the work list and sends it to every rank (as keys), and rank ``r`` of ``W``
takes the items ``r, r + W, ...`` (no image twice, none padded in). :class:`RestorePredictor`
restores an item (:func:`~diffbir.pipeline.work.restore_item`), :class:`ItemWriter` writes it
as each batch ends. After the predict loop every rank gathers the reports; rank 0 prints the
one summary.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Sampler

from diffbir.pipeline.faces import FaceRestorer
from diffbir.pipeline.jobs import Job, Report
from diffbir.pipeline.options import RunOptions
from diffbir.pipeline.restorer import Restorer
from diffbir.pipeline.work import ItemDataset, OutputWriter, Recipe, WorkItem, restore_item, shard

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
# how many processes a launcher started: torchrun (and Lightning's own children), srun
_LAUNCHED_PROCESSES = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def process_count(run: RunOptions, device: torch.device) -> int:
    """How many processes the run has (``--devices`` x ``--num-nodes``); ValueError names the
    flag. A run launched by torchrun/SLURM must ask for as many processes as were started."""
    per_node = int(run.devices) if run.devices != "auto" else None
    if per_node is None:
        per_node = torch.cuda.device_count() if device.type == "cuda" else 1
    count = per_node * run.num_nodes
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


class ShardSampler(Sampler):
    """The item indices of one rank, in order (see :func:`~diffbir.pipeline.work.shard`)."""

    def __init__(self, count: int, rank: int, world_size: int) -> None:
        self.indices = shard(count, rank, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ItemWriter(BasePredictionWriter):
    """Lightning's side of the :class:`~diffbir.pipeline.work.OutputWriter`: writes each
    restored item as its batch ends."""

    def __init__(self, writer: OutputWriter) -> None:
        super().__init__(write_interval="batch")
        self.writer = writer

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
        self.writer.write(prediction)


class RestorePredictor(pl.LightningModule):
    """The restoration models as one LightningModule (the Trainer places them on the device);
    ``predict_step`` returns the :func:`~diffbir.pipeline.work.restore_item` result. A
    :class:`~diffbir.pipeline.faces.FaceRestorer`'s face models were placed when loaded."""

    def __init__(self, restorer: Restorer | FaceRestorer, recipe: Recipe) -> None:
        super().__init__()
        self.cldm = restorer.cldm
        self.cleaner = restorer.cleaner.model
        self.restorer = restorer
        self.recipe = recipe
        # with fewer items than ranks some shards are empty; those ranks only join the gather
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, list]:
        return restore_item(self.restorer, batch, self.recipe)


class WorkData(pl.LightningDataModule):
    """The work list under DDP: rank 0's items are broadcast (as keys), so every rank shards
    the same list even if the output folder changed between their starts."""

    def __init__(self, items: Sequence[WorkItem], jobs: Mapping[str, Job]) -> None:
        super().__init__()
        self.items = items
        self.jobs = jobs

    def setup(self, stage: str) -> None:
        keys = None
        if self.trainer.is_global_zero:
            keys = [[job.key for job in item.jobs] for item in self.items]
        keys = self.trainer.strategy.broadcast(keys, src=0)
        unknown = [k for item in keys for k in item if k not in self.jobs]
        if unknown:
            raise RuntimeError(
                f"rank {self.trainer.global_rank} does not see the inputs {unknown[:3]} that rank "
                "0 listed: every rank must see the same --input folder"
            )
        self.items = [WorkItem([self.jobs[k] for k in item]) for item in keys]

    def predict_dataloader(self) -> DataLoader:
        sampler = ShardSampler(len(self.items), self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(ItemDataset(self.items), batch_size=None, sampler=sampler)


def make_trainer(run: RunOptions, device: torch.device) -> pl.Trainer:
    """The Trainer of a many-process run. Each stage (captions, restoration) is one
    ``predict`` on it, with its writer :func:`attached` for the call; the first one starts the
    processes, the later ones run in them."""
    return pl.Trainer(
        accelerator={"cuda": "gpu"}.get(device.type, device.type),
        devices=run.devices,
        num_nodes=run.num_nodes,
        strategy=run.strategy,
        precision="32-true",  # the models are already in --precision (pipeline.precision)
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=run.progress,
        use_distributed_sampler=False,  # WorkData shards the items itself
        inference_mode=False,  # restoration guidance needs gradients
    )


@contextmanager
def attached(trainer: pl.Trainer, writer: BasePredictionWriter) -> Iterator[None]:
    """``writer`` is a callback of ``trainer`` inside the block (one stage's predict)."""
    trainer.callbacks.append(writer)
    try:
        with warnings.catch_warnings():
            # items are whole batches (batch_size=None): writers need no sampler indices
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            yield
    finally:
        trainer.callbacks.remove(writer)


def predict(
    trainer: pl.Trainer, restorer: Restorer | FaceRestorer, recipe: Recipe,
    items: Sequence[WorkItem], jobs: Mapping[str, Job], writer: OutputWriter,
) -> None:  # fmt: skip
    """Run the work list over the trainer's processes, ``writer`` writing each item."""
    with attached(trainer, ItemWriter(writer)):
        trainer.predict(
            RestorePredictor(restorer, recipe),
            datamodule=WorkData(items, jobs),
            return_predictions=False,
        )


def forward_interrupt(trainer: pl.Trainer) -> None:
    """Pass a Ctrl-C of the main process on to the worker processes Lightning started (under
    torchrun or srun every process gets it from the launcher)."""
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)


def wait_for_workers(trainer: pl.Trainer, timeout: float = 120.0) -> None:
    """Wait until the worker processes Lightning started have ended."""
    for proc in getattr(trainer.strategy.launcher, "procs", None) or []:
        try:
            proc.wait(timeout=timeout)
        except Exception:  # still running: it is killed when this process exits
            continue


def gather_reports(report: Report, world_size: int) -> list[Report]:
    """Every rank's report, on every rank (a collective: every rank must call it).

    Called after ``trainer.predict`` rather than in ``on_predict_epoch_end``: Lightning skips
    the predict loop, hooks included, on a rank whose shard is empty (fewer items than ranks),
    and the other ranks would wait for it forever.
    """
    return gather_objects(report, world_size)


def gather_objects(value: T, world_size: int) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (a collective, see
    :func:`gather_reports`)."""
    if world_size == 1 or not dist.is_initialized():
        return [value]
    gathered: list[T | None] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return [v for v in gathered if v is not None]
