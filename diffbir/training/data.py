"""Resumable, seeded data streams for training.

Every training sample is identified by its position ``q`` in one global, infinite stream. The
stream visits the dataset in a fresh seeded permutation per pass, rank ``r`` of ``W`` takes the
positions ``r, r + W, r + 2W, ...``, and each sample is produced with all global RNGs seeded from
``(seed, q)``. A run that stops after ``n`` batches and restarts from position ``n * batch_size``
therefore sees exactly the samples (random crops and degradations included) it would have seen
without stopping.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class TrainingSetupError(ValueError):
    """A training configuration that cannot work (missing file, empty dataset, bad value)."""


def derive_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (independent streams for different tuples)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class InfiniteSeededSampler(Sampler):
    """Endless ``(stream position, dataset index)`` pairs for one rank, starting at ``start``.

    ``start`` counts the samples this rank has already consumed.
    """

    def __init__(
        self, num_samples: int, seed: int, *, rank: int = 0, world_size: int = 1, start: int = 0
    ) -> None:
        if num_samples <= 0:
            raise TrainingSetupError("cannot sample from an empty dataset")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        local = self.start
        epoch, order = -1, []
        while True:
            position = local * self.world_size + self.rank
            if position // self.num_samples != epoch:
                epoch = position // self.num_samples
                order = self._permutation(epoch)
            yield position, order[position % self.num_samples]
            local += 1


SKIPPED_KEY = "skipped_files"


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(q, index)`` (or ``q``) is drawn with RNGs seeded by ``q``.

    A dataset with ``set_epoch`` (it then seeds each item from its epoch and index) gets the pass
    number ``q // len``; in addition Python's ``random``, NumPy's global RNG and torch's CPU RNG
    are seeded from ``(seed, q)`` for the duration of the call and restored afterwards.
    Dict items get ``SKIPPED_KEY``: how many unreadable files the dataset replaced to produce
    the item (counted inside the worker that loaded it, so totals survive ``num_workers > 0``).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        position, index = key if isinstance(key, tuple) else (key, key)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(position // len(self))
        seed = derive_seed(self.seed, position)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            skipped_before = getattr(self.dataset, "skipped_files", 0)
            try:
                item = self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        if isinstance(item, dict):
            skipped = getattr(self.dataset, "skipped_files", 0) - skipped_before
            item = {**item, SKIPPED_KEY: skipped}
        return item


def check_source(path: str | None, key: str) -> Path:
    """An existing image folder, or an existing non-empty image list, named by config ``key``."""
    if not path:
        raise TrainingSetupError(f"config key {key!r} must name an image list file or folder")
    source = Path(path)
    if not source.exists():
        raise TrainingSetupError(f"{key}: image list or folder not found: {source.resolve()}")
    if source.is_file() and not any(line.strip() for line in source.read_text().splitlines()):
        raise TrainingSetupError(f"{key}: image list is empty: {source.resolve()}")
    return source


def build_paired_dataset(params: Mapping[str, Any], key: str, seed: int | None = None) -> Dataset:
    """A :class:`PairedDegradationDataset` from config ``params``; errors name config ``key``.

    ``seed`` (the run's seed) seeds crops and degradations unless ``params`` sets its own.
    """
    params = dict(params)
    if seed is not None:
        params.setdefault("seed", int(seed))
    check_source(params.get("source"), f"{key}.source")
    from diffbir.data.datasets import PairedDegradationDataset

    try:
        dataset = PairedDegradationDataset(**params)
    except (TypeError, ValueError, FileNotFoundError) as err:
        raise TrainingSetupError(f"{key}: {err}") from err
    if len(dataset) == 0:
        raise TrainingSetupError(f"{key}: dataset is empty (no images in {params['source']})")
    _check_one_readable(dataset, params["source"], f"{key}.source")
    return dataset


def _check_one_readable(dataset: Any, source: str, key: str) -> None:
    """Raise unless some image of the dataset decodes (reads up to the first one that does):
    with none, every training step would search the whole list in vain."""
    from diffbir.data.datasets import _read_image

    first_error = None
    for path, _ in dataset.entries:
        try:
            _read_image(path)
            return
        except (OSError, ValueError) as err:
            first_error = first_error or f"{path}: {err}"
    raise TrainingSetupError(
        f"{key}: none of the {len(dataset.entries)} images of {source} can be read "
        f"(first: {first_error})"
    )


def train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    start: int,
) -> DataLoader:
    """An endless loader over ``dataset`` for one rank, resuming after ``start`` samples."""
    sampler = InfiniteSeededSampler(
        len(dataset), seed, rank=rank, world_size=world_size, start=start  # type: ignore[arg-type]
    )
    return DataLoader(
        SeededDataset(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=num_workers > 0,
    )


def val_loader(dataset: Dataset, *, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """A loader over ``dataset`` in order, with the same degradations on every pass."""
    return DataLoader(
        SeededDataset(dataset, seed),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
