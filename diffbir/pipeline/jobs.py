"""The jobs of a run: each input image, where its outputs go, its prompt, and the run record.

Planning needs no model: inputs are listed (or the sample photos chosen), output paths are
checked for clashes with each other and with the inputs (``--save-faces``: also with the
folders the faces of a photo go to), and the per-image prompts are read.
:func:`record_run` writes ``config.yaml`` and ``prompts.csv`` beside the outputs before any
work. A :class:`Report` keeps what happened to each input, for the summary and the exit status.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from diffbir.faces.plan import FacePlan
from diffbir.pipeline.checks import blocking_file
from diffbir.pipeline.image_io import (
    IMAGE_EXTENSIONS,
    list_inputs,
    read_image,
    write_png,
    write_text,
)
from diffbir.pipeline.options import InferenceConfig, RunOptions
from diffbir.pipeline.presets import CONFIG_FILE, differing_keys, dump, with_defaults
from diffbir.pipeline.prompts import (
    PROMPTS_FILE,
    PromptRow,
    prompts_csv,
    read_prompt_rows,
    read_prompts,
    whole_of,
)
from diffbir.pipeline.samples import SAMPLE_NAMES, load_sample
from diffbir.versions import UNALIGNED_FACE

STAGE1_DIR = "stage1"
SAMPLE_INPUTS_DIR = "inputs"
# --save-faces: a photo's faces, cropped and restored, and its restored background
CROPPED_FACES_DIR, RESTORED_FACES_DIR = "cropped_faces", "restored_faces"
BACKGROUNDS_DIR = "restored_backgrounds"


def derive_seed(run_seed: int, key: str, sample: int = 0) -> int:
    """A 63-bit seed from the run seed, an image's relative path and the sample index."""
    digest = hashlib.sha256(f"{run_seed}\0{key}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def face_seed(photo_seed: int, face: int) -> int:
    """The seed of face ``face`` (detection order) of a photo restored with ``photo_seed``
    (the seed of its background)."""
    return derive_seed(photo_seed, "face", face)


class NoInputImagesError(ValueError):
    """An input folder without a single image file."""


@dataclass(frozen=True)
class FaceOutputs:
    """Where ``--save-faces`` writes the parts of one photo: face ``i`` of ``sub/a.png``
    cropped as ``cropped_faces/sub/a_face<i>.png``, restored as ``restored_faces/sub/
    a_face<i>.png`` (``a_face<i>_<k>.png`` per sample with several), its restored backgrounds
    as ``restored_backgrounds/sub/a.png`` (``a_<k>.png``). The names of two photos never
    clash when their outputs do not: each adds ``_face<digits>`` (and ``_<digits>``) to the
    photo's output name."""

    cropped: Path  # the photo's output path under cropped_faces/, without suffix
    restored: Path
    backgrounds: list[Path]

    def crop(self, face: int) -> Path:
        return self.cropped.with_name(f"{self.cropped.name}_face{face}.png")

    def restored_face(self, face: int, sample: int) -> Path:
        several = len(self.backgrounds) > 1
        name = f"{self.restored.name}_face{face}{f'_{sample}' if several else ''}.png"
        return self.restored.with_name(name)


def stem_of(key: str) -> str:
    """An input's key (relative path) without its extension: how ``--prompts`` names it."""
    return Path(key).with_suffix("").as_posix()


@dataclass
class Job:
    """One input image: ``key`` (relative path, seeds the RNG), how to load it, where its
    outputs go (``outputs``: one per sample; ``condition_output``: the stage-1 condition image
    with ``--save-stage1``; ``faces``: its faces and background with ``--save-faces``)."""

    key: str
    source: str
    load: Callable[[], np.ndarray]
    outputs: list[Path]
    condition_output: Path | None
    faces: FaceOutputs | None = None

    @property
    def stem(self) -> str:
        """The key without its extension: how ``--prompts`` names this input."""
        return stem_of(self.key)

    def done(self) -> bool:
        """Whether every output is there (a photo's faces are written before it, with its
        backgrounds: those stand for them)."""
        paths = [*self.outputs, *([self.condition_output] if self.condition_output else [])]
        paths += self.faces.backgrounds if self.faces is not None else []
        return all(p.is_file() for p in paths)


@dataclass
class Report:
    """What happened to each input, for the summary and the exit status."""

    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    faces: dict[str, int] = field(default_factory=dict)  # restored photo -> faces pasted

    def fail(self, source: str, reason: str) -> None:
        self.failed.append((source, reason))
        tqdm.write(f"failed: {source}: {reason}", file=sys.stderr)

    def count_faces(self, source: str, plan: FacePlan) -> None:
        """Record (and say) how many faces of a restored photo were pasted back."""
        count = len(plan.faces)
        self.faces[source] = count
        dropped = f", {len(plan.too_small)} too small" if plan.too_small else ""
        tqdm.write(f"{source}: {count} face{'' if count == 1 else 's'}{dropped}")

    def merge(self, others: Iterable[Report]) -> Report:
        """A report holding this report's entries, then each of ``others``'."""
        merged = Report(list(self.restored), list(self.skipped), list(self.failed),
                        list(self.ignored), dict(self.faces))  # fmt: skip
        for other in others:
            merged.restored += other.restored
            merged.skipped += other.skipped
            merged.failed += other.failed
            merged.ignored += other.ignored
            merged.faces.update(other.faces)
        return merged

    def summary(self) -> str:
        lines = [
            f"summary: {len(self.restored)} restored, {len(self.skipped)} skipped (output exists; "
            f"--overwrite to redo), {len(self.failed)} failed, {len(self.ignored)} ignored "
            "(not image files, hidden, folders without --recursive, or inside --output)"
        ]
        if self.faces:
            none = [source for source, count in self.faces.items() if count == 0]
            lines.append(
                f"faces: {sum(self.faces.values())} in {len(self.faces)} photo(s); "
                f"{len(none)} photo(s) without a face, restored as a whole"
            )
        lines += [f"  failed: {source}: {reason}" for source, reason in self.failed]
        return "\n".join(lines)


def _sample_paths(folder: Path, rel: Path, samples: int) -> list[Path]:
    if samples == 1:
        return [folder / rel.with_name(f"{rel.name}.png")]
    return [folder / rel.with_name(f"{rel.name}_{k}.png") for k in range(samples)]


def _output_paths(
    output: Path, key: str, samples: int, save_condition: bool, save_faces: bool
) -> tuple[list[Path], Path | None, FaceOutputs | None]:
    rel = Path(key).with_suffix("")
    outputs = _sample_paths(output, rel, samples)
    condition = output / STAGE1_DIR / rel.with_name(f"{rel.name}.png") if save_condition else None
    faces = None
    if save_faces:
        backgrounds = _sample_paths(output / BACKGROUNDS_DIR, rel, samples)
        faces = FaceOutputs(output / CROPPED_FACES_DIR / rel, output / RESTORED_FACES_DIR / rel,
                            backgrounds)  # fmt: skip
    return outputs, condition, faces


def _job_paths(
    outputs: list[Path], condition: Path | None, faces: FaceOutputs | None
) -> list[Path]:
    """The output paths of a job known before it is restored."""
    return [*outputs, *([condition] if condition else []), *(faces.backgrounds if faces else [])]


def _real(path: Path) -> Path:
    """``path`` with its folders' links resolved (the file itself may be a link)."""
    return path.parent.resolve() / path.name


def _path_problem(
    paths: list[Path], owner: dict[Path, str], inputs: set[Path], output: Path,
    face_folders: list[Path],
) -> str | None:  # fmt: skip
    """Why an input's output paths cannot be written, or None (``face_folders``: where
    ``--save-faces`` writes faces, under names known only once they are found)."""
    for p in paths:
        if p in owner:
            return f"output {p} would clash with an output of {owner[p]}"
        folder = next((f for f in face_folders if f in p.parents), None)
        if folder is not None:
            return f"output {p} would be inside {folder}, where --save-faces writes faces"
        if _real(p) in inputs:
            return f"output {p} would overwrite an input image"
        if p.is_dir():
            return f"output {p} is a folder"
        blocker = blocking_file(p, output)
        if blocker is not None:
            return f"output {p} needs a folder where the file {blocker} is"
    return None


def _sample_loader(name: str, upscale: float, inputs_dir: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        img = load_sample(name, scale=max(upscale, 1.0))
        path = inputs_dir / f"{name}.png"
        if not path.is_file():
            write_png(path, (img * 255).round().astype(np.uint8))
        return img

    return load


def plan_jobs(run: RunOptions, cfg: InferenceConfig, report: Report) -> list[Job]:
    """The jobs of a run (input files or, without ``--input``, the sample photos); name
    clashes are failures in ``report``, entries that are not inputs are counted as ignored."""
    output = Path(run.output)
    samples = cfg.num_samples
    save_faces = run.save_faces and cfg.task == UNALIGNED_FACE
    face_folders = [output / CROPPED_FACES_DIR, output / RESTORED_FACES_DIR] if save_faces else []
    jobs: list[Job] = []
    if run.input is None:
        inputs_dir = output / SAMPLE_INPUTS_DIR
        for name in SAMPLE_NAMES:
            outs, condition, faces = _output_paths(
                output, name, samples, run.save_stage1, save_faces
            )
            load = _sample_loader(name, cfg.restore.upscale, inputs_dir)
            jobs.append(Job(name, f"skimage.data.{name}", load, outs, condition, faces))
        return jobs
    root = Path(run.input)
    candidates, ignored = list_inputs(root, run.recursive)
    report.ignored.extend(str(p) for p in ignored)
    out_abs = _real(output)
    if root.is_dir() and out_abs == _real(root):
        raise ValueError(
            f"--output: expected a folder other than --input (results would mix with the "
            f"inputs they are made from), got {run.output}"
        )
    # an output folder inside a recursive input: the files in it are ours, not inputs
    output_in_input = root.is_dir() and _real(root) in out_abs.parents
    inside = [p for p in candidates if output_in_input and out_abs in _real(p).parents]
    report.ignored.extend(str(p) for p in inside)
    candidates = [p for p in candidates if p not in inside]
    inputs = {_real(p) for p in candidates}
    for folder in face_folders:
        under = next((p for p in candidates if _real(folder) in _real(p).parents), None)
        if under is not None:
            raise ValueError(
                f"--save-faces: the input {under} is inside {folder}, where faces are written "
                "(they could replace it); use another --output"
            )
    owner: dict[Path, str] = {}
    for path in candidates:
        key = path.name if root.is_file() else path.relative_to(root).as_posix()
        outs, condition, faces = _output_paths(output, key, samples, run.save_stage1, save_faces)
        paths = _job_paths(outs, condition, faces)
        problem = _path_problem(paths, owner, inputs, output, face_folders)
        if problem:
            report.fail(str(path), problem)
            continue
        owner.update({p: str(path) for p in paths})
        jobs.append(Job(key, str(path), lambda p=path: read_image(p), outs, condition, faces))
    if not jobs and not report.failed:
        raise NoInputImagesError(
            f"--input: no image files in {run.input} (expected extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; {len(report.ignored)} entries ignored"
            f"{'' if run.recursive else ', subfolders need --recursive'})"
        )
    return jobs


def job_prompts(cfg: InferenceConfig, jobs: list[Job]) -> dict[str, str]:
    """The positive prompt of each job's key: from ``--prompts`` when listed there (by stem),
    else ``restore.pos_prompt``; and the prompts ``--prompts`` gives parts of the inputs (by
    :func:`~.prompts.part_key`, e.g. faces). Stems of the CSV that match no input are
    reported."""
    listed = read_prompts(cfg.prompts) if cfg.prompts else {}
    stems = {job.stem for job in jobs}
    unused = [stem for stem in listed if whole_of(stem) not in stems]
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        print(f"warning: --prompts: {len(unused)} stem(s) match no input: {shown}", file=sys.stderr)
    parts = {key: p for key, p in listed.items() if key != whole_of(key) and whole_of(key) in stems}
    return {job.key: listed.get(job.stem, cfg.restore.pos_prompt) for job in jobs} | parts


def check_config_record(output: Path, cfg: DictConfig, jobs: list[Job], overwrite: bool) -> None:
    """Outputs already in the folder were made with the ``config.yaml`` there: a run with other
    settings is refused (unless ``--overwrite``), so one folder never mixes configurations."""
    config_path = output / CONFIG_FILE
    made = any(path.is_file() for job in jobs for path in job.outputs)
    if not config_path.is_file() or not made or overwrite:
        return
    try:
        previous = OmegaConf.load(config_path)
    except Exception as err:  # a damaged file: yaml and omegaconf raise their own errors
        raise ValueError(f"{config_path}: unreadable ({err}); use --overwrite") from err
    changed = differing_keys(with_defaults(previous), cfg)
    if changed:
        raise ValueError(
            f"--output {output}: its {CONFIG_FILE} was written by a run with other settings "
            f"({', '.join(changed)}); its outputs would mix with this run's. Use another "
            "--output, or --overwrite to redo every output"
        )


def record_run(
    output: Path,
    cfg: DictConfig,
    prompts: dict[str, str],
    jobs: list[Job],
    todo: list[Job],
    overwrite: bool,
    captions: Mapping[str, str] | None = None,
    uncaptioned: Collection[str] = (),
) -> None:
    """Write ``config.yaml`` and ``prompts.csv`` beside the outputs before any work (checked
    by :func:`check_config_record` first). Rows of ``prompts.csv`` for skipped inputs keep the
    prompt (and caption) they were made with; ``captions``: the caption of a stem (or part key)
    whose prompt was made from one; stems in ``uncaptioned`` (captions still to make) get no
    row until their caption is recorded. ``prompts`` may also hold the prompts of parts of the
    inputs (by part key): each gets its row, as its input does."""
    write_text(output / CONFIG_FILE, dump(cfg))
    prompts_path = output / PROMPTS_FILE
    rows = {}
    if prompts_path.is_file() and not overwrite:
        rows = read_prompt_rows(prompts_path, str(prompts_path))
    redone = {job.stem for job in todo}
    captions = captions or {}
    for job in jobs:
        if job.stem in uncaptioned:
            rows.pop(job.stem, None)
        elif job.stem in redone or job.stem not in rows:
            rows[job.stem] = PromptRow(prompts[job.key], captions.get(job.stem, ""))
    for key, prompt in prompts.items():
        stem = whole_of(key)
        if stem != key and (stem in redone or key not in rows):
            rows[key] = PromptRow(prompt, captions.get(key, ""))
    write_text(prompts_path, prompts_csv(rows))
