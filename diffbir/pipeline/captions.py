"""The captioning stage of a run: a caption per input, made before the restoration models load
and kept in ``prompts.csv`` beside the outputs.

:func:`plan_captions` (called by ``Runner.prepare``, before anything is written) decides what is
left to caption: every unfinished input, unless ``--prompts`` lists it (the user's prompt wins)
or ``OUT/prompts.csv`` already holds its caption (a rerun or resumed run reads captions back);
when something is left it checks the captioner (name, precision on the device, packages, every
model file). :func:`caption_local` (one process) and :func:`caption_distributed` (each process
its share, through the run's Lightning Trainer) then caption the inputs as read, before any
resize, writing each caption to ``prompts.csv`` as it arrives (:class:`CaptionRecord`), and
free the captioner; the runner loads the restoration models only after that, so that the two
never hold memory together. The positive prompt of a captioned input is
``join_prompt(caption, pos_prompt)``, as the official run builds it. An empty caption counts as
no caption: a resumed run asks for it again (and gets the same text).

What is captioned is a list of requests, each a key and the pictures it yields as ``(key,
pixels)``, each key a row of ``prompts.csv``. An input file is one :class:`CaptionRequest` keyed
by its stem (:func:`whole_input`). A task that captions parts of a photo (the faces of
``unaligned_face``, as the official run does) passes ``plan_captions`` a ``requests_of`` that
adds a :class:`PartsRequest`: the parts are found only when it is loaded (in the caption stage,
by the process that captions it), each under its :func:`~.prompts.part_key`; those whose
caption is recorded, or whose prompt ``--prompts`` gives, are skipped. Reading back, recording
and sharing between processes work per request, whatever it shows.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from diffbir.captioning import Captioner, build_captioner, check_captioner, join_prompt
from diffbir.pipeline.image_io import ImageReadError, write_text
from diffbir.pipeline.jobs import Job
from diffbir.pipeline.options import CaptionOptions, InferenceConfig
from diffbir.pipeline.predict import ShardSampler, attached, gather_objects, placement_device
from diffbir.pipeline.presets import CONFIG_FILE, differing_keys
from diffbir.pipeline.prompts import (
    PROMPTS_FILE,
    PromptRow,
    part_key,
    prompts_csv,
    read_prompt_rows,
    read_prompts,
    whole_of,
)
from diffbir.pipeline.work import RunInterrupted


@dataclass(frozen=True)
class CaptionRequest:
    """One picture to caption: ``key`` names its row in ``prompts.csv``, ``load`` returns its
    pixels as read (H x W x 3 RGB, before any resize)."""

    key: str
    load: Callable[[], np.ndarray]

    def pictures(self) -> Iterator[tuple[str, np.ndarray]]:
        yield self.key, self.load()


@dataclass(frozen=True)
class PartsRequest:
    """The parts of input ``stem`` to caption, found when loaded: ``find`` yields ``(part
    key, pixels)`` of each (as :func:`~.prompts.part_key` of ``stem``); :meth:`pictures` leaves
    out the keys in ``skip`` (captioned already, or given by ``--prompts``)."""

    stem: str
    find: Callable[[], Iterator[tuple[str, np.ndarray]]]
    skip: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        """The request's own key, which no picture has (nor any input)."""
        return part_key(self.stem, "")

    def pictures(self) -> Iterator[tuple[str, np.ndarray]]:
        return ((key, image) for key, image in self.find() if key not in self.skip)


Request = CaptionRequest | PartsRequest


@dataclass
class CaptionPlan:
    """The captioning stage of a run: the captioner's options, the positive prompt captions
    are joined with, the record file, the captions read back from it (``known``, by key) and
    what is left to caption (``requests``)."""

    options: CaptionOptions
    pos_prompt: str
    record: Path
    known: dict[str, str]
    requests: list[Request]

    @property
    def enabled(self) -> bool:
        return self.options.name != "none"

    def prompts(self, jobs: Sequence[Job], captions: Mapping[str, str]) -> dict[str, str]:
        """``{job key: positive prompt}`` of the jobs captioned in ``captions`` (by stem), and
        ``{part key: positive prompt}`` of the parts captioned there."""
        wholes = {
            job.key: join_prompt(captions[job.stem], self.pos_prompt)
            for job in jobs
            if job.stem in captions
        }
        parts = {
            key: join_prompt(caption, self.pos_prompt)
            for key, caption in captions.items()
            if whole_of(key) != key
        }
        return wholes | parts


def whole_input(job: Job) -> list[CaptionRequest]:
    """What an input asks to be captioned by default: the whole image, keyed by its stem."""
    return [CaptionRequest(job.stem, job.load)]


def with_parts(
    find: Callable[[Job], Iterator[tuple[str, np.ndarray]]],
) -> Callable[[Job], list[Request]]:
    """The ``requests_of`` of a task that captions parts of each input: the whole input, and
    the parts ``find(job)`` yields as ``(part key, pixels)`` when loaded."""
    return lambda job: [*whole_input(job), PartsRequest(job.stem, lambda: find(job))]


def _check_caption_settings(output: Path, options: CaptionOptions, known: Mapping) -> None:
    """Captions read back must come from this run's captioner settings (its ``config.yaml``
    says which made them); others are refused, as outputs of other settings are."""
    config_path = output / CONFIG_FILE
    if not known or not config_path.is_file():
        return
    try:
        previous = OmegaConf.load(config_path).get("caption")
    except Exception as err:  # a damaged file: yaml and omegaconf raise their own errors
        raise ValueError(f"{config_path}: unreadable ({err}); use --overwrite") from err
    now = OmegaConf.create({"caption": asdict(options)})
    changed = differing_keys(OmegaConf.create({"caption": previous}), now)
    if changed:
        raise ValueError(
            f"--output {output}: its {PROMPTS_FILE} holds captions made with other captioner "
            f"settings ({', '.join(changed)}, see its {CONFIG_FILE}). Use another --output, or "
            "--overwrite to caption and restore every input again"
        )


def plan_captions(
    cfg: InferenceConfig,
    jobs: Sequence[Job],
    *,
    output: Path,
    overwrite: bool,
    device: torch.device,
    requests_of: Callable[[Job], list[Request]] = whole_input,
) -> CaptionPlan:
    """The captioning stage of a run (see the module docstring): the requests of each
    unfinished job that ``--prompts`` does not list, less those whose caption ``output``'s
    ``prompts.csv`` holds (a parts request skips its parts recorded there or listed in
    ``--prompts``). Raises before anything is written when those captions were made with
    other captioner settings or the captioner cannot be built
    (:class:`~diffbir.captioning.MissingCaptionerFilesError` for missing model files)."""
    options = cfg.caption
    record = output / PROMPTS_FILE
    plan = CaptionPlan(options, cfg.restore.pos_prompt, record, {}, [])
    if not plan.enabled:
        return plan
    listed = set(read_prompts(cfg.prompts)) if cfg.prompts else set()
    rows = read_prompt_rows(record, str(record)) if record.is_file() and not overwrite else {}
    wanted = [
        job for job in jobs if (overwrite or not job.done()) and job.stem not in listed
    ]  # fmt: skip
    requests = [request for job in wanted for request in requests_of(job)]
    wholes = {r.key for r in requests if isinstance(r, CaptionRequest)}
    parted = {r.stem for r in requests if isinstance(r, PartsRequest)}

    def part(key: str) -> bool:  # a part of an input whose parts are captioned
        return whole_of(key) != key and whole_of(key) in parted

    plan.known = {
        key: row.caption
        for key, row in rows.items()
        if row.caption and (key in wholes or part(key))
    }
    _check_caption_settings(output, options, plan.known)
    skip: dict[str, set[str]] = {stem: set() for stem in parted}
    for key in itertools.chain(plan.known, listed):
        if part(key):
            skip[whole_of(key)].add(key)
    plan.requests = [
        replace(r, skip=frozenset(skip[r.stem])) if isinstance(r, PartsRequest) else r
        for r in requests
        if r.key not in plan.known
    ]
    if plan.requests:
        check_captioner(
            options.name, model=options.model, precision=options.precision, device=device
        )
    return plan


def _build(options: CaptionOptions, device: torch.device) -> Captioner:
    return build_captioner(
        options.name,
        model=options.model,
        precision=options.precision,
        device=device,
        batch_size=options.batch_size,
    )


def _pictures(request: Request) -> Iterator[tuple[str, np.ndarray]]:
    """The ``(key, pixels)`` of ``request``; none from a file that cannot be read (the
    restoration stage reports that input as failed)."""
    try:
        yield from request.pictures()
    except ImageReadError:
        return


class CaptionRecord:
    """``prompts.csv`` as captions arrive: each caption becomes its key's row (the joined
    prompt and the caption), the file rewritten at once (atomically). ``shared``: several
    processes write the file, so each rewrite holds an exclusive lock on a file beside it
    (``.prompts.csv.lock``) and merges into what the others wrote."""

    def __init__(self, path: Path, pos_prompt: str, shared: bool = False) -> None:
        self.path = path
        self.pos_prompt = pos_prompt
        self.lock_path = path.with_name(f".{path.name}.lock") if shared else None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.lock_path is None:
            yield
            return
        import fcntl  # POSIX only; many-process runs are on Linux

        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add(self, key: str, caption: str) -> None:
        """Record ``caption`` as the caption of ``key``."""
        with self._locked():
            rows = read_prompt_rows(self.path, str(self.path)) if self.path.is_file() else {}
            rows[key] = PromptRow(join_prompt(caption, self.pos_prompt), caption)
            write_text(self.path, prompts_csv(rows))


def caption_local(
    plan: CaptionPlan, device: torch.device, stop: threading.Event, progress: bool
) -> dict[str, str]:
    """Caption ``plan.requests`` in this process, recording each caption as it arrives;
    returns ``{key: caption}``. The captioner is built only once there is a picture to caption.
    Raises :class:`~diffbir.pipeline.work.RunInterrupted` at the next batch once ``stop`` is
    set (the captions recorded so far are kept)."""
    captions: dict[str, str] = {}
    record = CaptionRecord(plan.record, plan.pos_prompt)
    order: deque[str] = deque()

    def images() -> Iterator[np.ndarray]:
        for request in plan.requests:
            if stop.is_set():
                raise RunInterrupted
            for key, image in _pictures(request):
                order.append(key)
                yield image

    pictures = images()
    first = next(pictures, None)
    if first is None:
        return captions
    parts = any(isinstance(r, PartsRequest) for r in plan.requests)  # counted once found
    total = None if parts else len(plan.requests)
    with _build(plan.options, device) as captioner:
        stream = captioner.caption_stream(
            itertools.chain([first], pictures), total=total, progress=progress
        )
        for caption in stream:
            key = order.popleft()
            record.add(key, caption)
            captions[key] = caption
    print(f"captions: {len(captions)} written to {plan.record}")
    return captions


# ----- many processes -----
def _as_is(item: Any) -> Any:
    return item


class CaptionDataset(Dataset):
    """Item ``i``: the keys and pixels (numpy, as read) of the pictures of the readable requests
    of group ``i``."""

    def __init__(self, groups: Sequence[Sequence[Request]]) -> None:
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, list]:
        loaded: dict[str, list] = {"keys": [], "images": []}
        for request in self.groups[index]:
            for key, image in _pictures(request):
                loaded["keys"].append(key)
                loaded["images"].append(image)
        return loaded


class CaptionData(pl.LightningDataModule):
    """Rank 0's requests (as keys) cut into captioner batches; rank ``r`` of ``W`` takes the
    batches ``r, r + W, ...``."""

    def __init__(self, requests: Sequence[Request], batch_size: int) -> None:
        super().__init__()
        self.requests = {request.key: request for request in requests}
        self.batch_size = batch_size
        self.groups: list[list[Request]] = []

    def setup(self, stage: str) -> None:
        keys = list(self.requests) if self.trainer.is_global_zero else None
        keys = self.trainer.strategy.broadcast(keys, src=0)
        unknown = [key for key in keys if key not in self.requests]
        if unknown:
            raise RuntimeError(
                f"rank {self.trainer.global_rank} has no caption request for {unknown[:3]} that "
                "rank 0 listed: every rank must see the same --input folder and output folder"
            )
        size = self.batch_size
        self.groups = [
            [self.requests[key] for key in keys[i : i + size]] for i in range(0, len(keys), size)
        ]

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ShardSampler(len(self.groups), trainer.global_rank, trainer.world_size)
        return DataLoader(
            CaptionDataset(self.groups), batch_size=None, sampler=sampler, collate_fn=_as_is
        )


class CaptionPredictor(pl.LightningModule):
    """Captions one batch per step; the captioner is built at the first step (a rank whose
    share is empty never builds it) and kept out of the module's parameters."""

    def __init__(self, build: Callable[[], Captioner], stop: threading.Event) -> None:
        super().__init__()
        self.build = build
        self.stop = stop
        self.captioner: Captioner | None = None
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_step(self, batch: Mapping[str, list], batch_idx: int) -> list[tuple[str, str]]:
        if self.stop.is_set():
            raise RunInterrupted
        if not batch["images"]:
            return []
        if self.captioner is None:
            self.captioner = self.build()
        return list(zip(batch["keys"], self.captioner.caption(batch["images"]), strict=True))

    def close(self) -> None:
        if self.captioner is not None:
            self.captioner.close()


class CaptionWriter(BasePredictionWriter):
    """Records each batch's captions as it ends."""

    def __init__(self, record: CaptionRecord) -> None:
        super().__init__(write_interval="batch")
        self.record = record
        self.captions: dict[str, str] = {}

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
        for key, caption in prediction:
            self.record.add(key, caption)
            self.captions[key] = caption


def caption_distributed(
    plan: CaptionPlan, trainer: pl.Trainer, device: torch.device, stop: threading.Event
) -> dict[str, str]:
    """Caption rank 0's ``plan.requests`` over the trainer's processes (every rank must call
    this, even with nothing to caption); each rank records its captions as they arrive and
    frees its captioner; returns every rank's captions, on every rank."""
    predictor = CaptionPredictor(
        lambda: _build(plan.options, placement_device(device, trainer.world_size)), stop
    )
    writer = CaptionWriter(CaptionRecord(plan.record, plan.pos_prompt, shared=True))
    try:
        with attached(trainer, writer):
            trainer.predict(
                predictor,
                datamodule=CaptionData(plan.requests, plan.options.batch_size),
                return_predictions=False,
            )
    finally:
        predictor.close()
    per_rank = gather_objects(writer.captions, trainer.world_size)
    captions = {key: text for part in per_rank for key, text in part.items()}
    if trainer.is_global_zero:
        counts = ", ".join(f"rank {rank}: {len(part)}" for rank, part in enumerate(per_rank))
        print(f"captions: {len(captions)} written to {plan.record} ({counts})")
    return captions
