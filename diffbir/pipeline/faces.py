"""The unaligned-face task in the run layer: each photo a plan of faces and a background,
restored with the models of a :class:`FaceRestorer` and pasted together as the official does.

:class:`PhotoTask` is the task strategy the runner hands
:func:`~diffbir.pipeline.work.restore_item`. For same-size photos:

1. the faces of each photo are found (:func:`diffbir.faces.plan_faces`);
2. the noise strategy learns that the faces draw before the background (the official restores
   them first; ``--seed-mode official`` notes where each face's draws begin and moves past
   them);
3. the whole photos are restored as the version's sr task, as a batch (the background: what a
   photo without faces becomes);
4. photo by photo, the faces are cropped, restored as the face task and pasted onto the
   background (with the parser's masks) ``--faces-per-batch`` at a time, so that memory does
   not grow with the number of faces (``--save-faces`` keeps each restored face, 0.75 MiB
   per face and sample, until the photo is written).

Seeds (``--seed-mode per-image``): the background has the photo's seed (so a photo without faces
is restored as by the sr task), face ``i`` a seed derived from it (:func:`~.jobs.face_seed`).
Prompts: each part gets the one :data:`PartPrompt` gives: :func:`photo_prompt` gives every part
the photo's; :class:`FacePrompts` gives a face the prompt the run holds under its
:func:`face_key` (its caption joined with the positive prompt, or its ``--prompts`` row), if
any. With a captioner, :class:`FaceFinder` finds the faces of each photo before the restoration
models load, as the restoration will, so that each crop is captioned on its own.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffbir.diffusion.noise import NoiseStream
from diffbir.faces import FACE_QUIRKS, FACE_SIZE, Detector, FacePaster, FacePlan, Parser, plan_faces
from diffbir.faces.align import DETECTOR_SIDE
from diffbir.faces.networks import face_network_paths
from diffbir.pipeline.checks import GIB, memory_limit, memory_problem
from diffbir.pipeline.cleaner import Cleaner
from diffbir.pipeline.codec import latent_size
from diffbir.pipeline.image_io import to_tensor, to_uint8, write_png
from diffbir.pipeline.jobs import FaceOutputs, Job, stem_of
from diffbir.pipeline.options import FaceOptions, RestoreOptions
from diffbir.pipeline.prompts import part_key
from diffbir.pipeline.restorer import Restorer
from diffbir.pipeline.sampling import StepCallback
from diffbir.pipeline.work import PerImageSeeds, Recipe, Restored, take_draws
from diffbir.versions import CUSTOM, ModelVersion
from diffbir.weights import weight_path

# Bytes per pixel of the detector input that RetinaFace-ResNet50 holds at once (float32), measured
# on CPU: +0.48 GiB at 1280x1706, +1.8 GiB at 2560x3413 (random weights, peak resident memory).
DETECTOR_BYTES_PER_PIXEL = 225

# The positive prompt of one part of a photo: (the photo's key, its prompt, the face's index in
# detection order or None for the background, the part's low-quality image: the aligned crop
# (512, 512, 3) or the photo, uint8 RGB) -> the part's prompt.
PartPrompt = Callable[[str, str, int | None, np.ndarray], str]


def photo_prompt(key: str, prompt: str, face: int | None, image: np.ndarray) -> str:
    """Every face and the background get the photo's prompt."""
    return prompt


def face_key(stem: str, face: int) -> str:
    """The key of face ``face`` (detection order) of the photo ``stem``, its row in
    ``prompts.csv``: ``sub/a//face0`` (see :mod:`~diffbir.pipeline.prompts`)."""
    return part_key(stem, f"face{face}")


@dataclass(frozen=True)
class FacePrompts:
    """A :data:`PartPrompt`: a face whose :func:`face_key` ``prompts`` holds gets that prompt;
    the other faces and the background get the photo's."""

    prompts: Mapping[str, str]

    def __call__(self, key: str, prompt: str, face: int | None, image: np.ndarray) -> str:
        if face is None:
            return prompt
        return self.prompts.get(face_key(stem_of(key), face), prompt)


def find_faces(
    photo: np.ndarray, upscale: float, detect: Detector, device: torch.device, quirks: str
) -> FacePlan:
    """The faces of ``photo`` (uint8 RGB) restored at ``upscale``, with the ``quirks`` of
    ``--face-quirks``; a photo whose detector input cannot fit on ``device`` is refused first."""
    height, width = (side * upscale for side in photo.shape[:2])
    scale = max(1.0, DETECTOR_SIDE / min(height, width))
    need = height * width * scale**2 * DETECTOR_BYTES_PER_PIXEL
    limit = memory_limit(device)
    if need > limit:
        raise ValueError(
            f"faces: the face detector runs on the whole upscaled photo "
            f"({width * scale:.0f}x{height * scale:.0f}, as the official) and needs about "
            f"{need / GIB:.1f} GiB, more than the {limit / GIB:.1f} GiB here; use a "
            "smaller --upscale"
        )
    return plan_faces(photo, upscale, detect, FACE_QUIRKS[quirks])


class FaceFinder:
    """The faces of photos as their restoration will find them, in the caption stage (before
    the restoration models load): ``load(device)`` gives the detector alone (not the parser),
    loaded at the first photo on ``device`` and freed by :meth:`close`."""

    def __init__(
        self, load: Callable[[torch.device], Detector], options: FaceOptions, upscale: float
    ) -> None:
        self.load = load
        self.options = options
        self.upscale = upscale
        self.device = torch.device("cpu")
        self.detect: Detector | None = None

    def crops(self, job: Job) -> Iterator[tuple[str, np.ndarray]]:
        """``(face key, aligned crop)`` of each face of ``job``'s photo, one at a time."""
        photo = to_uint8(to_tensor(job.load()))  # the photo as the restoration gets it
        if self.detect is None:
            self.detect = self.load(self.device)
        try:
            plan = find_faces(photo, self.upscale, self.detect, self.device, self.options.quirks)
        except ValueError:  # its restoration fails with the reason
            return
        for batch in plan.crop_batches(1):
            yield face_key(job.stem, batch.start), batch.crops[0]

    def close(self) -> None:
        """Free the detector."""
        self.detect = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class FaceModelPlan:
    """What the unaligned-face task loads beside the models of the whole photo (the version's
    sr task; the ControlLDM serves both): the stage 1 of the faces (``stage1`` ``None``: no
    stage-1 model) and the face detector and parser files."""

    stage1: Path | None
    stage1_config: str | None
    detector: Path
    parser: Path


def plan_face_models(
    version: ModelVersion, stage1: Path | None, stage1_config: str | None,
    weights_dir: str | os.PathLike | None,
) -> FaceModelPlan:  # fmt: skip
    """The version's face stage 1, face detector and parser in ``weights_dir``; ``custom``
    restores the faces with its one stage 1 (``stage1``, ``stage1_config``) too."""
    if version.name != CUSTOM:
        spec = version.stage1["face"]
        stage1, stage1_config = weight_path(spec.file, weights_dir), spec.config
    networks = face_network_paths(weights_dir)
    return FaceModelPlan(
        stage1, stage1_config, networks["face_detector"], networks["face_parser"]
    )


class FaceRestorer:
    """The models of the unaligned-face task: ``background`` restores whole photos (the
    version's sr task), ``faces`` aligned faces (the same ControlLDM with the face stage 1),
    ``detect`` finds the faces of a photo and ``parse`` segments restored ones (paste masks).
    The face networks are placed by whoever loads them (they are small and stay float32)."""

    def __init__(
        self, background: Restorer, faces: Restorer, detect: Detector, parse: Parser
    ) -> None:
        self.background = background
        self.faces = faces
        self.detect = detect
        self.parse = parse

    @property
    def cldm(self) -> torch.nn.Module:
        """The one ControlLDM of both restorers."""
        return self.background.cldm

    @property
    def cleaner(self) -> Cleaner:
        """The stage 1 of the whole photo (the faces': ``faces.cleaner``)."""
        return self.background.cleaner

    @property
    def device(self) -> torch.device:
        return self.background.device

    @property
    def dtype(self) -> torch.dtype:
        return self.background.dtype

    def restore(
        self,
        lq: Tensor,
        seeds: int | Sequence[int],
        options: RestoreOptions,
        faces: FaceOptions | None = None,
        pos_prompt: str | None = None,
        *,
        keep: bool = False,
        callback: StepCallback | None = None,
    ) -> Restored:
        """Restore one photo (1, 3, H, W) in [0, 1] at ``options.upscale``: ``seeds`` one per
        sample (the background's; each face's derive from them), ``faces`` how faces are found
        and batched (default :class:`~.options.FaceOptions`), ``pos_prompt`` default
        ``options.pos_prompt``; ``keep``: keep the restored faces and backgrounds in the
        result's ``photo``. The samples are uint8 (H, W, 3) arrays at ``photo.plan.size``."""
        if lq.ndim != 4 or lq.shape[0] != 1:
            raise ValueError(f"lq: expected one photo (1, 3, H, W), got {tuple(lq.shape)}")
        seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        prompt = options.pos_prompt if pos_prompt is None else pos_prompt
        task = PhotoTask(faces or FaceOptions(), keep=keep)
        recipe = Recipe(options, len(seeds), {}, GivenSeeds(seeds), callback, task)
        return task.restore(self, lq, [""], [prompt], recipe)[0]


class GivenSeeds(PerImageSeeds):
    """Per-image seeds given outright (the Python API: one photo, a seed per sample) instead of
    derived from a run seed and the photo's key."""

    def __init__(self, seeds: Sequence[int]) -> None:
        super().__init__(run_seed=0)  # not used: every seed is given
        self.given = list(seeds)

    def seeds(self, key: str, samples: int) -> list[int]:
        if samples != len(self.given):
            raise ValueError(f"seeds: expected {samples}, one per sample, got {len(self.given)}")
        return self.given


@dataclass
class PhotoResult:
    """What a restored photo leaves besides its samples: its face plan and, when kept
    (``--save-faces``), its restored backgrounds (per sample, uint8 at the sr output size) and
    restored faces (``restored_faces[face][sample]``, uint8 512x512)."""

    plan: FacePlan
    backgrounds: list[np.ndarray] | None = None
    restored_faces: list[list[np.ndarray]] | None = None

    def write(self, outputs: FaceOutputs) -> None:
        """Write the cropped and restored faces and the backgrounds (``--save-faces``)."""
        if self.backgrounds is None or self.restored_faces is None:
            raise RuntimeError("the restored faces and backgrounds of this photo were not kept")
        for face, per_sample in enumerate(self.restored_faces):
            write_png(outputs.crop(face), self.plan.crop(face))
            for sample, image in enumerate(per_sample):
                write_png(outputs.restored_face(face, sample), image)
        for path, background in zip(outputs.backgrounds, self.backgrounds, strict=True):
            write_png(path, background)


def face_options(options: RestoreOptions) -> RestoreOptions:
    """The options of the faces: the photo's, at upscale 1 (a face is restored at its crop's
    512x512, as the official face pipeline is given it)."""
    return dataclasses.replace(options, upscale=1.0)


def face_condition_size(options: RestoreOptions) -> tuple[int, int]:
    """The stage-1 condition size of an aligned crop: a same-size face stage 1 (SwinIR, or
    custom's) keeps its 512x512, enlarged to ``min_side`` if that is larger."""
    side = max(FACE_SIZE, options.min_side)
    return side, side


@dataclass
class PhotoTask:
    """The unaligned-face task strategy (see the module): ``options`` the face options,
    ``keep`` keeps each photo's restored faces and backgrounds (``--save-faces``), ``prompt``
    gives each part its prompt."""

    options: FaceOptions
    keep: bool = False
    prompt: PartPrompt = photo_prompt

    def restore(
        self, models: FaceRestorer, lq: Tensor, keys: Sequence[str], prompts: Sequence[str],
        recipe: Recipe,
    ) -> list[Restored]:  # fmt: skip
        """Restore same-size photos ``lq`` (B, 3, H, W): the samples of each are uint8
        (H, W, 3) arrays at its plan's size."""
        photos = [to_uint8(image) for image in lq]
        plans = [self._plan(models, photo, recipe) for photo in photos]
        take = self._face_draws(models, recipe)
        for plan in plans:  # several photos only with per-image seeds, where order is free
            recipe.strategy.faces_first(len(plan.faces), take)
        whole = [
            self.prompt(key, p, None, photo)
            for key, p, photo in zip(keys, prompts, photos, strict=True)
        ]
        conditions, backgrounds = recipe.strategy.restore(
            models.background, lq, keys, whole, recipe
        )
        return [
            self._paste_faces(models, key, plan, condition, samples, prompt, recipe)
            for key, plan, condition, samples, prompt in zip(
                keys, plans, conditions, backgrounds, prompts, strict=True
            )
        ]

    def replay(self, models: FaceRestorer, lq: Tensor, recipe: Recipe) -> None:
        """Take from the stream what restoring the photo ``lq`` (1, 3, H, W) would: its faces'
        draws (found by the detector), then its background's."""
        plan = self._plan(models, to_uint8(lq), recipe)
        recipe.strategy.faces_first(len(plan.faces), self._face_draws(models, recipe))
        recipe.strategy.replay(models.background, lq, recipe)

    def _plan(self, models: FaceRestorer, photo: np.ndarray, recipe: Recipe) -> FacePlan:
        upscale, quirks = recipe.options.upscale, self.options.quirks
        return find_faces(photo, upscale, models.detect, models.device, quirks)

    def _face_draws(
        self, models: FaceRestorer, recipe: Recipe
    ) -> Callable[[NoiseStream], None]:
        """Takes from a noise stream the draws of one face, every sample."""
        options = face_options(recipe.options)

        def take(noise: NoiseStream) -> None:
            like = torch.empty(1, 4, *latent_size(*face_condition_size(options), options.tiles))
            for _ in range(recipe.samples):
                take_draws(models.faces.sampler, options, noise, like)

        return take

    def _paste_faces(
        self, models: FaceRestorer, key: str, plan: FacePlan, condition: Tensor,
        backgrounds: Tensor, prompt: str, recipe: Recipe,
    ) -> Restored:  # fmt: skip
        """Restore the faces of one photo in batches and paste them onto its backgrounds."""
        face_recipe = dataclasses.replace(recipe, options=face_options(recipe.options))
        self._check_memory(models, face_recipe)
        kept_backgrounds = [to_uint8(background) for background in backgrounds]
        pasters = [FacePaster(plan, background, models.parse) for background in kept_backgrounds]
        kept_faces: list[list[np.ndarray]] = []
        for batch in plan.crop_batches(self.options.batch):
            crops = torch.from_numpy(batch.crops).permute(0, 3, 1, 2).float() / 255
            prompts = [
                self.prompt(key, prompt, i, crop)
                for i, crop in zip(batch.indices, batch.crops, strict=True)
            ]
            restored = recipe.strategy.restore_faces(
                models.faces, crops, key, list(batch.indices), prompts, face_recipe
            )
            faces = [[to_uint8(sample) for sample in per_face] for per_face in restored]
            for sample, paster in enumerate(pasters):
                paster.paste(np.stack([per_face[sample] for per_face in faces]))
            if self.keep:
                kept_faces += faces
        photo = PhotoResult(plan)
        if self.keep:
            photo = PhotoResult(plan, kept_backgrounds, kept_faces)
        return Restored(key, condition, [paster.result() for paster in pasters], photo)

    def _check_memory(self, models: FaceRestorer, face_recipe: Recipe) -> None:
        """A batch of faces that cannot fit is refused before its stage 1 (as a photo is)."""
        count = self.options.batch * face_recipe.samples
        element_size = torch.finfo(models.dtype).bits // 8
        problem = memory_problem(
            FACE_SIZE, FACE_SIZE, face_recipe.options, count, element_size,
            memory_limit(models.device),
        )  # fmt: skip
        if problem:
            raise ValueError(f"faces: {problem} (or a smaller --faces-per-batch)")
