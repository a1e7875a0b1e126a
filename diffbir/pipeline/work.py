"""The work of a run, shared by every way of running it: work items, noise strategies, task
strategies, restoring one item and writing its outputs.

The work list is decided once, before any restoration, by the run's :class:`NoiseStrategy`:
:class:`PerImageSeeds` (ours) buckets the unfinished jobs by input size (same input size, same
working size: a batch really fills) and cuts them into batches, each image drawing from a
generator seeded by ``derive_seed(run seed, key, sample)``, so neither order, batch size nor
process count changes an output; :class:`OfficialStream` restores every image in file order,
one sample at a time, from one stream seeded once (the official code's draws), replaying the
draws of finished images (:func:`take_draws`) so that the ones after them get the noise of a
complete run.

The run's :class:`Task` says what restoring an input means: :class:`ImageTask` restores it as
one image; the unaligned-face task (:class:`~diffbir.pipeline.faces.PhotoTask`) restores a
photo's background and faces and pastes them together. :func:`restore_item` restores one loaded
item through it and returns images and failure records (it neither writes nor prints);
:class:`OutputWriter` writes them atomically and keeps the report. An unreadable image is a
failure record, never an exception.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from diffbir.diffusion.noise import NoiseStream, OfficialNoise
from diffbir.diffusion.samplers import SAMPLERS
from diffbir.pipeline.checks import memory_limit, memory_problem
from diffbir.pipeline.codec import latent_size
from diffbir.pipeline.image_io import ImageReadError, to_tensor, write_png
from diffbir.pipeline.jobs import Job, Report, derive_seed, face_seed
from diffbir.pipeline.options import InferenceConfig, RestoreOptions
from diffbir.pipeline.restorer import Restorer
from diffbir.pipeline.sampling import LatentSampler, StepCallback

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
Size = tuple[int, int]


class RunInterrupted(Exception):
    """Raised between sampling steps when a run is asked to stop (Ctrl-C, the demo's cancel
    button); finished outputs are kept."""


@dataclass
class WorkItem:
    """Jobs restored together; ``replay``: finished jobs whose noise draws are only taken from
    the stream (:class:`OfficialStream`)."""

    jobs: list[Job]
    replay: bool = False


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


class ItemDataset(Dataset):
    """Item ``i`` is work item ``i``, loaded: ``keys``, ``sources`` and ``images`` ((1, 3, H, W)
    tensors) of the readable inputs, ``failures`` ``(source, reason)`` and ``replay``."""

    def __init__(self, items: Sequence[WorkItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        loaded: dict[str, Any] = {
            "keys": [], "sources": [], "images": [], "failures": [], "replay": item.replay
        }  # fmt: skip
        for job in item.jobs:
            try:
                image = to_tensor(job.load())
            except ImageReadError as err:
                loaded["failures"].append((job.source, err.reason))
                continue
            loaded["keys"].append(job.key)
            loaded["sources"].append(job.source)
            loaded["images"].append(image)
        return loaded


# ----- noise strategies -----
class NoiseStrategy(Protocol):
    """Decides the order and grouping of the work and where each restoration's noise comes
    from."""

    def items(self, jobs: Sequence[Job], todo: Sequence[Job], batch_size: int) -> list[WorkItem]:
        """The work list of a run (``todo``: the unfinished ``jobs``)."""
        ...

    def restore(
        self, restorer: Restorer, lq: Tensor, keys: Sequence[str], prompts: Sequence[str],
        recipe: Recipe,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Restore same-size images: ``(conditions (B, 3, H, W), samples (B, S, 3, H, W))``."""
        ...

    def replay(self, restorer: Restorer, lq: Tensor, recipe: Recipe) -> None:
        """Take from the noise source what restoring ``lq`` would (finished images)."""
        ...

    def faces_first(self, faces: int, take: Callable[[NoiseStream], None]) -> None:
        """A photo's ``faces`` faces draw before its background (as the official restores
        them), though restored after it: ``take(noise)`` takes the draws of one face."""
        ...

    def restore_faces(
        self, restorer: Restorer, crops: Tensor, key: str, faces: Sequence[int],
        prompts: Sequence[str], recipe: Recipe,
    ) -> Tensor:  # fmt: skip
        """Restore faces ``faces`` (their aligned crops, (B, 3, 512, 512)) of the photo ``key``
        (after :meth:`faces_first`): samples (B, S, 3, H, W)."""
        ...


@dataclass
class PerImageSeeds:
    """Each image's noise from ``derive_seed(run seed, key, sample)``: results independent of
    order, batching and processes."""

    run_seed: int

    def seeds(self, key: str, samples: int) -> list[int]:
        return [derive_seed(self.run_seed, key, k) for k in range(samples)]

    def items(self, jobs: Sequence[Job], todo: Sequence[Job], batch_size: int) -> list[WorkItem]:
        return [WorkItem(batch) for batch in bucket_batches(todo, batch_size)]

    def restore(
        self, restorer: Restorer, lq: Tensor, keys: Sequence[str], prompts: Sequence[str],
        recipe: Recipe,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        seeds = [self.seeds(key, recipe.samples) for key in keys]
        result = restorer.restore(lq, seeds, recipe.options, prompts, callback=recipe.callback)
        return result.condition, result.samples

    def replay(self, restorer: Restorer, lq: Tensor, recipe: Recipe) -> None:
        raise RuntimeError("per-image seeds have no stream to replay")

    def faces_first(self, faces: int, take: Callable[[NoiseStream], None]) -> None:
        return None  # seeds do not depend on order

    def restore_faces(
        self, restorer: Restorer, crops: Tensor, key: str, faces: Sequence[int],
        prompts: Sequence[str], recipe: Recipe,
    ) -> Tensor:  # fmt: skip
        """Face ``i``'s seeds derive from the photo's (:func:`~.jobs.face_seed`)."""
        photo = self.seeds(key, recipe.samples)
        seeds = [[face_seed(seed, face) for seed in photo] for face in faces]
        result = restorer.restore(crops, seeds, recipe.options, prompts, callback=recipe.callback)
        return result.samples


@dataclass
class OfficialStream:
    """The official seeding: ``torch.manual_seed(seed)`` once, then every image in file order,
    one sample at a time, each drawing from that one stream in the official order (a photo of
    the unaligned-face task: its faces in detection order, then its background)."""

    seed: int
    noise: OfficialNoise = field(init=False)
    face_states: list[Tensor] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.noise = OfficialNoise(self.seed)

    def items(self, jobs: Sequence[Job], todo: Sequence[Job], batch_size: int) -> list[WorkItem]:
        pending = {id(job) for job in todo}
        if not pending:
            return []
        last = max(i for i, job in enumerate(jobs) if id(job) in pending)
        return [WorkItem([job], replay=id(job) not in pending) for job in jobs[: last + 1]]

    def restore(
        self, restorer: Restorer, lq: Tensor, keys: Sequence[str], prompts: Sequence[str],
        recipe: Recipe,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        results = [
            restorer.restore(lq, [[self.seed]], recipe.options, prompts, self.noise,
                             recipe.callback)  # fmt: skip
            for _ in range(recipe.samples)
        ]
        return results[0].condition, torch.cat([r.samples for r in results], dim=1)

    def replay(self, restorer: Restorer, lq: Tensor, recipe: Recipe) -> None:
        options = recipe.options
        cond = restorer.condition(lq, options)
        like = torch.empty(1, 4, *latent_size(*cond.shape[-2:], options.tiles))
        for _ in range(recipe.samples):
            take_draws(restorer.sampler, options, self.noise, like)

    def faces_first(self, faces: int, take: Callable[[NoiseStream], None]) -> None:
        """Note where each face's draws begin and move the stream past them all, so that the
        background restored next draws what the official draws after the faces."""
        self.face_states = []
        for _ in range(faces):
            self.face_states.append(self.noise.generator.get_state())
            take(self.noise)

    def restore_faces(
        self, restorer: Restorer, crops: Tensor, key: str, faces: Sequence[int],
        prompts: Sequence[str], recipe: Recipe,
    ) -> Tensor:  # fmt: skip
        restored = []
        for crop, face, prompt in zip(crops, faces, prompts, strict=True):
            generator = torch.Generator(self.noise.generator.device)
            generator.set_state(self.face_states[face])
            noise = OfficialNoise(generator)
            samples = [
                restorer.restore(crop[None], [[self.seed]], recipe.options, [prompt], noise,
                                 recipe.callback).samples  # fmt: skip
                for _ in range(recipe.samples)
            ]
            restored.append(torch.cat(samples, dim=1))
        return torch.cat(restored)


def take_draws(
    sampler: LatentSampler, options: RestoreOptions, noise: NoiseStream, like: Tensor
) -> None:
    """Take from ``noise`` what one restoration by ``sampler`` of a latent like ``like`` takes:
    x_T, the noise augmentation, then the sampler's draws (its Brownian path's seed included),
    by running the sampler over a zero denoiser."""
    for _ in range(1 + (options.sampler.noise_aug > 0)):
        noise(like)
    name = options.sampler.name
    SAMPLERS[name].sample(
        lambda x, level: torch.zeros_like(x), like, sampler.grid(name, options.steps),
        noise=noise, **options.sampler.knobs,
    )  # fmt: skip


def noise_strategy(cfg: InferenceConfig) -> NoiseStrategy:
    """The strategy of ``cfg.seed_mode``."""
    return OfficialStream(cfg.seed) if cfg.seed_mode == "official" else PerImageSeeds(cfg.seed)


# ----- task strategies -----
class Restored(NamedTuple):
    """One restored input: its key, its stage-1 condition (3, H, W) and its samples (a
    (S, 3, H, W) tensor, or S (H, W, 3) uint8 arrays); ``photo``: for the unaligned-face task,
    the photo's :class:`~diffbir.pipeline.faces.PhotoResult`."""

    key: str
    condition: Tensor
    samples: Tensor | Sequence[Any]
    photo: Any = None


class Task(Protocol):
    """What restoring an input of the run's task means, given its models."""

    def restore(
        self, models: Any, lq: Tensor, keys: Sequence[str], prompts: Sequence[str],
        recipe: Recipe,
    ) -> list[Restored]:  # fmt: skip
        """Restore same-size inputs ``lq`` (B, 3, H, W) with their keys and prompts."""
        ...

    def replay(self, models: Any, lq: Tensor, recipe: Recipe) -> None:
        """Take from the noise stream what restoring ``lq`` would (finished inputs)."""
        ...


class ImageTask:
    """Every task but the unaligned-face one: an input is one image, restored by a
    :class:`~diffbir.pipeline.restorer.Restorer` through the noise strategy."""

    def restore(
        self, models: Restorer, lq: Tensor, keys: Sequence[str], prompts: Sequence[str],
        recipe: Recipe,
    ) -> list[Restored]:  # fmt: skip
        conditions, samples = recipe.strategy.restore(models, lq, keys, prompts, recipe)
        return [Restored(k, conditions[j], samples[j]) for j, k in enumerate(keys)]

    def replay(self, models: Restorer, lq: Tensor, recipe: Recipe) -> None:
        recipe.strategy.replay(models, lq, recipe)


# ----- restoring and writing -----
@dataclass
class Recipe:
    """What decides an output besides the models and the input (options, samples, the positive
    prompt of each key, the noise strategy, the task), and who hears of each sampling step."""

    options: RestoreOptions
    samples: int
    prompts: Mapping[str, str]
    strategy: NoiseStrategy
    callback: StepCallback | None = None
    task: Task = field(default_factory=ImageTask)


def stop_on(event: threading.Event, then: StepCallback | None = None) -> StepCallback:
    """A step callback that raises :class:`RunInterrupted` once ``event`` is set (after
    calling ``then``)."""

    def step(info: dict[str, Any]) -> None:
        if then is not None:
            then(info)
        if event.is_set():
            raise RunInterrupted

    return step


def restore_item(models: Any, item: Mapping[str, Any], recipe: Recipe) -> dict[str, list]:
    """Restore one loaded work item with the models of the run's task (a
    :class:`~diffbir.pipeline.restorer.Restorer`, or the unaligned-face task's
    :class:`~diffbir.pipeline.faces.FaceRestorer`): ``restored`` :class:`Restored` (on the CPU)
    and ``failures`` ``(source, reason)``. Images of different sizes are restored in groups;
    a replay item only advances the noise stream."""
    if item["replay"]:
        for image in item["images"]:
            recipe.task.replay(models, image, recipe)
        return {"restored": [], "failures": []}
    restored: list[Restored] = []
    failures = list(item["failures"])
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(item["images"]):
        groups.setdefault(tuple(image.shape), []).append(i)
    limit, element_size = memory_limit(models.device), torch.finfo(models.dtype).bits // 8
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
            prompts = [recipe.prompts[k] for k in keys]
            restored += recipe.task.restore(models, lq, keys, prompts, recipe)
        except (RuntimeError, ValueError, OSError) as err:
            failures += [(item["sources"][i], f"restoration failed: {err}") for i in members]
    return {"restored": restored, "failures": failures}


class OutputWriter:
    """Writes each restored item as it ends (atomic PNGs) and records it in ``report``."""

    def __init__(self, jobs: Mapping[str, Job], report: Report) -> None:
        self.jobs = jobs
        self.report = report

    def write(self, result: Mapping[str, list]) -> None:
        """Write one :func:`restore_item` result; record what happened to each input. The
        outputs of a job are written last (they mark it done): its stage-1 condition and a
        photo's faces and background (``--save-faces``) come first."""
        for key, condition, samples, photo in result["restored"]:
            job = self.jobs[key]
            try:
                if photo is not None and job.faces is not None:
                    photo.write(job.faces)
                if job.condition_output is not None:
                    write_png(job.condition_output, condition)
                for path, sample in zip(job.outputs, samples, strict=True):
                    write_png(path, sample)
            except OSError as err:
                self.report.fail(job.source, f"writing failed: {err}")
                continue
            self.report.restored.append(job.source)
            if photo is not None:
                self.report.count_faces(job.source, photo.plan)
        for source, reason in result["failures"]:
            self.report.fail(source, reason)
