"""``--task unaligned_face`` in the run layer: whole photos whose faces are found, restored as
the face task, pasted onto the photo restored as the sr task.

The end-to-end runs use the tiny parity models under the official v2.1 names, a tiny ParseNet
(facexlib's class with few channels, random weights saved in the official format: only the
paste needs its argmax, and the full-size network takes ~19 s per face on one CPU thread) and
one stub: the detector, which returns injected detections of ``parity/faces.pt`` (case 5_x1,
two of them: a face across the left border, a tiny face the official filter drops; one face is
restored, since a face costs ~10 s on the tiny models at 512x512). The draw order, seeds and
batching of the task are checked on stand-in restorers (cheap, exact counts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MARKER_KEY, OFFICIAL_TINY, REPO_ROOT, marker
from omegaconf import OmegaConf
from PIL import Image

from diffbir.captioning import join_prompt
from diffbir.diffusion import NoiseSchedule
from diffbir.diffusion.noise import PerImageNoise
from diffbir.faces import DEFAULT_QUIRKS, FACE_TEMPLATE, OFFICIAL, FacePaster, plan_faces
from diffbir.faces import networks as face_networks
from diffbir.faces import paste as paste_module
from diffbir.faces.paste import resize_background
from diffbir.pipeline import cli, loading, runner
from diffbir.pipeline import faces as pipeline_faces
from diffbir.pipeline.cleaner import target_size
from diffbir.pipeline.codec import latent_size
from diffbir.pipeline.faces import FaceRestorer, PhotoTask, face_options
from diffbir.pipeline.image_io import read_image, to_tensor, to_uint8
from diffbir.pipeline.jobs import (
    Job,
    Report,
    check_config_record,
    derive_seed,
    face_seed,
    plan_jobs,
)
from diffbir.pipeline.loading import build_from_config, build_restorer
from diffbir.pipeline.options import FaceOptions, InferenceConfig, RestoreOptions, RunOptions
from diffbir.pipeline.presets import default_config, resolve_config
from diffbir.pipeline.prompts import PromptRow, read_prompt_rows
from diffbir.pipeline.resize import enlarge_short_side, resize_bicubic
from diffbir.pipeline.restorer import RestoreResult
from diffbir.pipeline.runner import Runner
from diffbir.pipeline.sampling import LatentSampler
from diffbir.pipeline.work import (
    OfficialStream,
    PerImageSeeds,
    Recipe,
    restore_item,
    take_draws,
)
from diffbir.tiny_weights import write_tiny_llava
from diffbir.versions import VERSIONS
from diffbir.weights import MissingWeightsError

V21_FILES = (
    "sd2.1-base-zsnr-laionaes5.ckpt",
    "DiffBIR_v2.1.pt",
    "realesrgan_s4_swinir_100k.pth",
    "face_swinir_v1.ckpt",
)
DETECTOR, PARSER = "detection_Resnet50_Final.pth", "parsing_parsenet.pth"
TINY_PARSENET = {"base_ch": 4, "res_depth": 1, "ch_range": [4, 8], "min_feat_size": 64}
SEED = 7


def tiny_parsenet() -> torch.nn.Module:
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(512, 512, parsing_ch=19, **TINY_PARSENET)


class StubDetector:
    """The one stub: fixed detection rows for detector inputs of one shape, none otherwise."""

    def __init__(self, rows: np.ndarray, shape: tuple[int, int]) -> None:
        self.rows, self.shape = np.asarray(rows, np.float32), shape

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.rows if image.shape[:2] == self.shape else np.zeros((0, 15), np.float32)


@pytest.fixture(scope="module")
def case(parity_dir: Path) -> dict:
    faces = torch.load(parity_dir / "faces.pt", map_location="cpu", weights_only=True)
    return next(c for c in faces["cases"] if c["name"] == "5_x1")


@pytest.fixture(scope="module")
def detector(case: dict) -> StubDetector:
    """The face across the left border and the tiny face of case 5_x1."""
    return StubDetector(case["injected"].numpy()[1:], tuple(case["det_input_shape"][:2]))


@pytest.fixture(scope="module")
def two_faces(case: dict) -> StubDetector:
    """Every detection of case 5_x1: two faces kept, the tiny one dropped."""
    return StubDetector(case["injected"].numpy(), tuple(case["det_input_shape"][:2]))


@pytest.fixture(scope="module")
def face_setup(tmp_path_factory, official_tiny_dir: Path, tiny_configs, detector):
    """The tiny models under the official names, the tiny ParseNet saved as the official file, an
    empty detector file (the stub stands in for what it holds), and the patches that build
    the tiny ParseNet and hand out the stub."""
    weights = tmp_path_factory.mktemp("face_weights")
    for name in OFFICIAL_TINY:
        (weights / name).symlink_to(official_tiny_dir / name)
    torch.manual_seed(0)
    torch.save(tiny_parsenet().state_dict(), weights / PARSER)
    (weights / DETECTOR).write_bytes(b"")
    patch = pytest.MonkeyPatch()
    patch.setattr(face_networks, "_parsenet", tiny_parsenet)
    patch.setattr(loading, "load_detector", lambda path, device: detector)
    yield weights
    patch.undo()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, real47_dir: Path) -> Path:
    """a.png: real47's 5.jpg at 128x96 (enlarged to 683x512 as the photo of case 5_x1, so the
    stub's faces land where the case has them); b.png: a 40x32 photo without faces."""
    root = tmp_path_factory.mktemp("photos")
    Image.open(real47_dir / "5.jpg").convert("RGB").resize((128, 96), Image.BICUBIC).save(
        root / "a.png"
    )
    Image.open(real47_dir / "11.jpg").convert("RGB").resize((40, 32), Image.BICUBIC).save(
        root / "b.png"
    )
    return root


def _args(weights: Path, inputs: Path, output: Path, *extra: str, task="unaligned_face"):
    return [
        "--input", str(inputs), "--output", str(output), "--weights-dir", str(weights),
        "--version", "v2.1", "--task", task, "--upscale", "1", "--steps", "2",
        "--min-side", "64", "--cfg-scale", "1", "--seed", str(SEED), "--device", "cpu",
        "--no-progress", *extra,
    ]  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def first_run(face_setup: Path, inputs: Path, tmp_path_factory):
    output = tmp_path_factory.mktemp("faces_out")
    rc, log = _run(_args(face_setup, inputs, output, "--save-faces"))
    return output, rc, log


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# ------------------------------------------------------------------------------ end to end


def test_photos_restored_faces_pasted_and_reported(first_run, case) -> None:
    output, rc, log = first_run
    assert rc == 0, log
    assert "a.png: 1 face, 1 too small" in log and "b.png: 0 faces" in log
    assert "summary: 2 restored, 0 skipped" in log
    assert "faces: 1 in 2 photo(s); 1 photo(s) without a face" in log
    assert _png(output / "a.png").shape == (*case["input_img"].shape[:2], 3)  # 512x683
    assert _png(output / "b.png").shape == (512, 640, 3)  # 32x40 enlarged, as the official
    saved = sorted(p.relative_to(output).as_posix() for p in output.rglob("*.png"))
    assert saved == [
        "a.png", "b.png", "cropped_faces/a_face0.png", "restored_backgrounds/a.png",
        "restored_backgrounds/b.png", "restored_faces/a_face0.png",
    ]  # fmt: skip


def test_background_is_the_sr_restoration(first_run, face_setup, inputs, tmp_path) -> None:
    """The background of each photo is what --task sr writes for it (same seed), and a photo
    without faces is that restoration at the photo's (enlarged) size."""
    output, *_ = first_run
    sr = tmp_path / "sr"
    rc, log = _run(_args(face_setup, inputs, sr, task="sr"))
    assert rc == 0, log
    for name in ("a.png", "b.png"):
        assert (output / "restored_backgrounds" / name).read_bytes() == (sr / name).read_bytes()
    assert np.array_equal(_png(output / "b.png"), resize_background(_png(sr / "b.png"), (512, 640)))


def test_faces_are_the_face_task_restoration_pasted_back(
    first_run, face_setup, inputs, detector
) -> None:
    """The face is the face task's restoration of its crop with the face's seed (to float
    rounding: the run's crops lie in memory otherwise, which moves a few pixels by one level);
    crop, face and background pasted with the parser's masks give the final photo. The face
    crosses the photo's left border."""
    output, *_ = first_run
    cfg, _ = resolve_config(output / "config.yaml")
    lq = (read_image(inputs / "a.png") * 255).round().astype(np.uint8)
    plan = plan_faces(lq, 1, detector, OFFICIAL)
    crop = _png(output / "cropped_faces" / "a_face0.png")
    assert np.array_equal(crop, plan.crop(0))
    assert np.all(crop[:, :40] == (135, 133, 132))  # outside the photo: the official border
    face_restorer = build_restorer("face", version="v2.1", weights_dir=face_setup, device="cpu")
    seed = face_seed(derive_seed(SEED, "a.png"), 0)
    alone = face_restorer.restore(
        to_tensor(crop / np.float32(255)), [seed], face_options(cfg.restore),
        [cfg.restore.pos_prompt],
    )
    restored = _png(output / "restored_faces" / "a_face0.png")
    differ = np.abs(to_uint8(alone.images[0]).astype(int) - restored)
    assert differ.max() <= 1 and (differ > 0).mean() < 1e-3
    parser = face_networks.load_parser(face_setup / PARSER)
    paster = FacePaster(plan, _png(output / "restored_backgrounds" / "a.png"), parser)
    paster.paste(restored[None])
    photo = _png(output / "a.png")
    assert np.array_equal(paster.result(), photo)
    background = resize_background(_png(output / "restored_backgrounds" / "a.png"), plan.size)
    assert not np.array_equal(photo, background)  # the faces are in it


def test_rerun_skips_finished_photos_and_redoes_what_is_missing(
    first_run, face_setup, inputs
) -> None:
    output, *_ = first_run
    args = _args(face_setup, inputs, output, "--save-faces")
    rc, log = _run(args)
    assert rc == 0 and "summary: 0 restored, 2 skipped" in log, log
    before = {p: p.stat().st_ino for p in output.rglob("*.png")}
    b_bytes = (output / "b.png").read_bytes()
    (output / "restored_backgrounds" / "b.png").unlink()  # b is not finished without it
    rc, log = _run(args)
    assert rc == 0 and "summary: 1 restored, 1 skipped" in log, log
    assert (output / "b.png").read_bytes() == b_bytes
    for path, inode in before.items():
        if "b.png" not in path.name:
            assert path.stat().st_ino == inode, path  # nothing of a was written again
    rc, log = _run(_args(face_setup, inputs, output))  # no --save-faces: every photo is done
    assert rc == 0 and "summary: 0 restored, 2 skipped" in log, log


def test_python_api_restores_a_photo_as_the_run(first_run, face_setup, inputs) -> None:
    output, *_ = first_run
    cfg, _ = resolve_config(output / "config.yaml")
    restorer = build_restorer(
        "unaligned_face", version="v2.1", weights_dir=face_setup, device="cpu"
    )
    assert isinstance(restorer, FaceRestorer)
    assert restorer.faces.cldm is restorer.background.cldm  # one ControlLDM, loaded once
    assert restorer.faces.cleaner.model is not restorer.background.cleaner.model
    lq = to_tensor(read_image(inputs / "b.png"))
    result = restorer.restore(lq, derive_seed(SEED, "b.png"), cfg.restore, cfg.faces)
    assert np.array_equal(result.samples[0], _png(output / "b.png"))
    assert result.photo.plan.faces == ()


@pytest.mark.parametrize("version", ["v2", "v2.1"])
def test_each_version_preset_loads_one_controlnet_and_two_stage1_models(
    face_setup, version: str
) -> None:
    """The preset of each version builds the photo's stage 1 from its sr file and the faces'
    from the face file (each file's marker tensor arrives where it belongs), around one
    ControlLDM, with the face networks."""
    cfg, _ = resolve_config(f"{version}_unaligned_face", [f"weights.dir={face_setup}"])
    assert (cfg.task, cfg.restore.upscale, cfg.faces) == ("unaligned_face", 2.0, FaceOptions())
    restorer = build_from_config(cfg, "cpu")
    assert isinstance(restorer, FaceRestorer) and restorer.faces.cldm is restorer.background.cldm
    files = VERSIONS[version].files("unaligned_face")
    for cleaner, role in ((restorer.background.cleaner, "stage1"), (restorer.faces.cleaner,
                                                                     "face_stage1")):  # fmt: skip
        key = MARKER_KEY[OFFICIAL_TINY[files[role]][0]]
        assert torch.all(cleaner.model.state_dict()[key] == marker(files[role]))
    assert restorer.background.cleaner.resize_first == (version == "v2.1")  # BSRNet: after
    assert restorer.detect is not None and restorer.parse.net.training is False


def test_bad_settings_are_refused_before_anything_is_written(
    face_setup, inputs, tmp_path
) -> None:
    out = tmp_path / "never"
    rc, log = _run(_args(face_setup, inputs, out, "--version", "v1"))
    assert rc == 2 and "--task unaligned_face: DiffBIR v1 has no such task" in log
    rc, log = _run(_args(face_setup, inputs, out, "--save-faces", task="sr"))
    assert rc == 2 and "--save-faces: only used with --task unaligned_face" in log
    rc, log = _run(_args(face_setup, inputs, out, "--stage1-weights", str(out / "x.pth")))
    assert rc == 2 and "--stage1-weights/--stage1-config: --task unaligned_face uses two" in log
    rc, log = _run(_args(face_setup, inputs, out, "--face-quirks", "corrected", task="sr"))
    assert rc == 2 and "--face-quirks: only used with --task unaligned_face" in log
    rc, log = _run([*_args(face_setup, inputs, out), "--seed-mode", "official",
                    "--faces-per-batch", "2"])  # fmt: skip
    assert rc == 2 and "--faces-per-batch: --seed-mode official restores face by face" in log
    assert not out.exists()


def test_missing_weights_are_listed_together(tmp_path) -> None:
    cfg = InferenceConfig(task="unaligned_face", device="cpu")
    cfg.weights.dir = str(tmp_path)
    (tmp_path / "in.png").write_bytes(b"")
    run = RunOptions(input=str(tmp_path / "in.png"), output=str(tmp_path / "out"))
    with pytest.raises(MissingWeightsError) as info:
        Runner(cfg, run).prepare()
    msg = str(info.value)
    assert msg.startswith("6 weight file(s) missing")
    for name in (*V21_FILES, DETECTOR, PARSER):
        assert str((tmp_path / name).resolve()) in msg
    assert "stage-1 model of the faces" in msg and "face detector" in msg


def test_face_folders_cannot_clash_with_other_outputs_or_hold_inputs(tmp_path) -> None:
    photos = tmp_path / "photos"
    (photos / "cropped_faces").mkdir(parents=True)
    for name in ("x.png", "cropped_faces/y.png"):
        Image.new("RGB", (8, 8)).save(photos / name)
    cfg = InferenceConfig(task="unaligned_face")
    run = RunOptions(input=str(photos), output=str(tmp_path / "out"), recursive=True,
                     save_faces=True)  # fmt: skip
    report = Report()
    jobs = plan_jobs(run, cfg, report)
    assert [job.key for job in jobs] == ["x.png"]
    assert jobs[0].faces.crop(3) == tmp_path / "out" / "cropped_faces" / "x_face3.png"
    assert jobs[0].faces.backgrounds == [tmp_path / "out" / "restored_backgrounds" / "x.png"]
    ((source, reason),) = report.failed
    assert source.endswith("cropped_faces/y.png") and "where --save-faces writes faces" in reason
    inside = RunOptions(input=str(photos / "cropped_faces"), output=str(photos),
                        save_faces=True)  # fmt: skip
    with pytest.raises(ValueError, match="--save-faces: the input .*y.png is inside"):
        plan_jobs(inside, cfg, Report())
    several = plan_jobs(run, InferenceConfig(task="unaligned_face", num_samples=2), Report())
    assert several[0].faces.restored_face(1, 1).name == "x_face1_1.png"


def test_an_earlier_config_without_the_face_options_still_matches(tmp_path) -> None:
    """Options added since an output folder was made take their defaults when its config.yaml
    is compared, so the folder is not refused for them; a real difference still is."""
    cfg = default_config("v2.1", "sr")
    (tmp_path / "a.png").write_bytes(b"")
    job = Job("a.png", "a.png", lambda: None, [tmp_path / "a.png"], None)
    earlier = OmegaConf.to_container(OmegaConf.structured(cfg))
    del earlier["faces"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(earlier))
    check_config_record(tmp_path, OmegaConf.structured(cfg), [job], overwrite=False)
    other = OmegaConf.structured(dataclasses.replace(cfg, faces=FaceOptions(quirks="corrected")))
    with pytest.raises(ValueError, match=r"other settings \(faces.quirks\)"):
        check_config_record(tmp_path, other, [job], overwrite=False)


# ---------------------------------------------------------------------- captions of each face

POS = "best quality"
SHORT_CAPTIONS = 8  # new tokens per caption of the tiny LLaVA (a fraction of a second)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    return write_tiny_llava(tmp_path_factory.mktemp("captioner") / "llava")


class CaptionSpy:
    """Patches the tiny run for the caption tests: LLaVA's captions cut short and the
    pictures it captions counted; the detector is the two-face stub, a new one per load (kept
    by weak reference: whether it was freed before the restoration models loaded); the prompts
    of each background restoration (by key) and each face batch are recorded. The faces are not
    restored (the crops stand for them: ~10 s a face on the tiny models); the backgrounds are."""

    def __init__(self, monkeypatch, two_faces: StubDetector) -> None:
        from diffbir.captioning.llava import LlavaCaptioner

        defaults = LlavaCaptioner.__init__.__kwdefaults__
        monkeypatch.setitem(defaults, "max_new_tokens", SHORT_CAPTIONS)
        self.captioned = 0
        self.detectors: list[weakref.ref] = []
        self.detector_alive_at_load: list[bool] = []
        self.backgrounds: dict[str, str] = {}
        self.faces: list[tuple[str, list[int], list[str]]] = []
        caption_batch = LlavaCaptioner._caption_batch
        background = PerImageSeeds.restore
        load_restorer = runner.load_restorer

        def counting_caption_batch(captioner, images):
            self.captioned += len(images)
            return caption_batch(captioner, images)

        def new_detector(path, device):
            detector = StubDetector(two_faces.rows, two_faces.shape)
            self.detectors.append(weakref.ref(detector))
            return detector

        def checking_load(*args, **kwargs):
            self.detector_alive_at_load += [ref() is not None for ref in self.detectors]
            return load_restorer(*args, **kwargs)

        def recording_restore(strategy, restorer, lq, keys, prompts, recipe):
            self.backgrounds.update(zip(keys, prompts, strict=True))
            return background(strategy, restorer, lq, keys, prompts, recipe)

        def crops_for_faces(strategy, restorer, crops, key, faces, prompts, recipe):
            self.faces.append((key, list(faces), list(prompts)))
            return crops[:, None].repeat(1, recipe.samples, 1, 1, 1)

        monkeypatch.setattr(LlavaCaptioner, "_caption_batch", counting_caption_batch)
        monkeypatch.setattr(loading, "load_detector", new_detector)
        monkeypatch.setattr(runner, "load_restorer", checking_load)
        monkeypatch.setattr(PerImageSeeds, "restore", recording_restore)
        monkeypatch.setattr(PerImageSeeds, "restore_faces", crops_for_faces)

    def reset(self) -> None:
        self.captioned, self.backgrounds, self.faces = 0, {}, []
        self.detectors, self.detector_alive_at_load = [], []


def _captioned_args(weights: Path, photos: Path, output: Path, llava: Path, *extra: str):
    return [*_args(weights, photos, output), "--pos-prompt", POS, "--captioner", "llava",
            "--captioner-model", str(llava), *extra]  # fmt: skip


def _face_caption_rows(photos: Path, detector: StubDetector, llava: Path) -> dict[str, PromptRow]:
    """The rows a captioned run writes to prompts.csv for ``face_photos``: what the tiny LLaVA
    captions for a.png, each aligned crop of its faces (``detector``'s) and a_face0.png, each
    joined with the positive prompt."""
    from diffbir.captioning.llava import LlavaCaptioner

    photo = _png(photos / "a.png")
    plan = plan_faces(photo, 1, detector, DEFAULT_QUIRKS)
    assert len(plan.faces) == 2
    pictures = {"a": photo, "a//face0": plan.crop(0), "a//face1": plan.crop(1),
                "a_face0": _png(photos / "a_face0.png")}  # fmt: skip
    captioner = LlavaCaptioner(llava, max_new_tokens=SHORT_CAPTIONS)
    captions = captioner.caption(list(pictures.values()))
    return {
        key: PromptRow(join_prompt(caption, POS), caption)
        for key, caption in zip(pictures, captions, strict=True)
    }


@pytest.fixture
def face_photos(inputs: Path, tmp_path: Path) -> Path:
    """a.png with two faces (the stub's), and a_face0.png (a photo without faces) beside it."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(inputs / "a.png", photos / "a.png")
    shutil.copy(inputs / "b.png", photos / "a_face0.png")
    return photos


def test_each_face_is_captioned_and_restored_with_its_own_prompt(
    face_setup, face_photos, two_faces, llava_dir, tmp_path, monkeypatch
) -> None:
    """The photo and each aligned crop (found as the restoration finds them) are captioned
    separately, by a detector freed before the restoration models load; each face is restored
    with its caption's prompt, the background with the photo's; the face rows do not clash
    with a_face0.png's; a rerun captions and restores nothing, a resumed run reads back."""
    spy = CaptionSpy(monkeypatch, two_faces)
    out = tmp_path / "out"
    argv = _captioned_args(face_setup, face_photos, out, llava_dir)
    rc, log = _run(argv)
    assert rc == 0 and "captions: 4 written" in log and "summary: 2 restored" in log, log
    assert spy.captioned == 4
    assert spy.detector_alive_at_load == [False]  # the caption stage's detector, freed

    rows = read_prompt_rows(out / "prompts.csv")
    assert rows == _face_caption_rows(face_photos, two_faces, llava_dir)
    assert len({rows[key].prompt for key in ("a", "a//face0", "a//face1")}) == 3
    assert spy.backgrounds == {"a.png": rows["a"].prompt, "a_face0.png": rows["a_face0"].prompt}
    assert spy.faces == [("a.png", [i], [rows[f"a//face{i}"].prompt]) for i in (0, 1)]

    spy.reset()
    rc, log = _run(argv)  # nothing left: nothing captioned, nothing restored
    assert rc == 0 and "summary: 0 restored, 2 skipped" in log, log
    assert spy.captioned == 0 and spy.backgrounds == {} and spy.faces == []
    assert spy.detectors == [] and read_prompt_rows(out / "prompts.csv") == rows

    (out / "a.png").unlink()  # resumed: its faces' captions are read back, not made again
    rc, log = _run(argv)
    assert rc == 0 and "summary: 1 restored, 1 skipped" in log, log
    assert spy.captioned == 0 and spy.backgrounds == {"a.png": rows["a"].prompt}
    assert spy.faces == [("a.png", [i], [rows[f"a//face{i}"].prompt]) for i in (0, 1)]


def test_the_users_prompts_give_faces_their_prompts(
    face_setup, face_photos, two_faces, llava_dir, tmp_path, monkeypatch
) -> None:
    """A photo listed in --prompts is not captioned, nor are its faces: they get its prompt,
    or their own row's, which the run's prompts.csv records."""
    spy = CaptionSpy(monkeypatch, two_faces)
    table = tmp_path / "mine.csv"
    table.write_text('stem,prompt\na,"a family, at dusk"\n')
    out = tmp_path / "out"
    rc, log = _run(_captioned_args(face_setup, face_photos, out, llava_dir, "--prompts",
                                   str(table)))  # fmt: skip
    assert rc == 0, log
    assert spy.captioned == 1  # a_face0.png alone
    assert spy.backgrounds["a.png"] == "a family, at dusk"
    assert spy.faces == [("a.png", [i], ["a family, at dusk"]) for i in (0, 1)]
    rows = read_prompt_rows(out / "prompts.csv")
    assert sorted(rows) == ["a", "a_face0"] and rows["a"].prompt == "a family, at dusk"

    spy.reset()
    table.write_text('stem,prompt\na,"a family"\na//face1,"an old man, smiling"\n')
    again = tmp_path / "again"
    rc, log = _run(_captioned_args(face_setup, face_photos, again, llava_dir, "--prompts",
                                   str(table)))  # fmt: skip
    assert rc == 0 and "match no input" not in log, log
    assert spy.captioned == 1
    assert spy.faces == [("a.png", [0], ["a family"]), ("a.png", [1], ["an old man, smiling"])]
    assert read_prompt_rows(again / "prompts.csv")["a//face1"] == PromptRow(
        "an old man, smiling", ""
    )


# ---------------------------------------------------- draw order, seeds and batching (stand-ins)


class StandInRestorer:
    """A restorer that draws from its noise source exactly what a restoration draws (as many
    draws as the sampler takes, of the latent shape of its condition), logs each call and
    returns its input resized to the output size."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log
        self.sampler = LatentSampler(torch.nn.Identity(), NoiseSchedule.linear(), "eps")
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def condition(self, lq: torch.Tensor, options: RestoreOptions) -> torch.Tensor:
        size = target_size(*lq.shape[-2:], options.upscale)
        return enlarge_short_side(resize_bicubic(lq, size), options.min_side)

    def restore(self, lq, seeds, options, pos_prompts=None, noise=None, callback=None):
        samples = len(seeds[0])
        cond = self.condition(lq, options).repeat_interleave(samples, dim=0)
        noise = noise or PerImageNoise([s for per in seeds for s in per])
        like = torch.empty(len(cond), 4, *latent_size(*cond.shape[-2:], options.tiles))
        draws = [noise(like) for _ in range(draw_count(self.sampler, options))]
        self.log.append((self.name, [list(s) for s in seeds], draws[0][:, 0, 0, 0].tolist()))
        out = resize_bicubic(lq, target_size(*lq.shape[-2:], options.upscale))
        out = out.repeat_interleave(samples, dim=0).view(len(lq), samples, *out.shape[1:])
        return RestoreResult(condition=out[:, 0], samples=out)


class _Counting:
    """A noise stream that counts the draws taken from it."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, like: torch.Tensor, *levels: object) -> torch.Tensor:
        self.count += 1
        return torch.zeros_like(like)

    def brownian(self, like: torch.Tensor, sigma_min: float, sigma_max: float) -> _Counting:
        self.count += 1
        return self


def draw_count(sampler, options: RestoreOptions) -> int:
    """How many draws one restoration by ``sampler`` takes (x_T and the sampler's)."""
    counting = _Counting()
    take_draws(sampler, options, counting, torch.empty(1, 4, 1, 1))
    return counting.count


def _stand_ins(detector, log: list) -> FaceRestorer:
    ones = lambda faces: np.ones(faces.shape[:3], np.uint8)  # noqa: E731 (class 1: skin)
    return FaceRestorer(StandInRestorer("background", log), StandInRestorer("face", log),
                        detector, ones)  # fmt: skip


OPTIONS = RestoreOptions(upscale=1.0, steps=4, min_side=64)


def _photo(inputs: Path) -> torch.Tensor:
    return to_tensor(read_image(inputs / "a.png"))


def test_official_seed_mode_draws_faces_first_then_the_background(two_faces, inputs) -> None:
    """The official restores a photo's faces (detection order, each sample in turn) before its
    background, from one stream; we restore the background first and give each face the stream
    where its draws begin. Its first draws, and the stream after the photo, are the official's;
    replaying a finished photo moves the stream by as much."""
    samples, log = 2, []
    stream = OfficialStream(SEED)
    recipe = Recipe(OPTIONS, samples, {}, stream, task=PhotoTask(FaceOptions()))
    models = _stand_ins(two_faces, log)
    recipe.task.restore(models, _photo(inputs), ["a.png"], [""], recipe)
    after = stream.noise(torch.empty(1))

    official = torch.Generator().manual_seed(SEED)
    count = draw_count(models.faces.sampler, OPTIONS)  # 4 steps + x_T
    face, background = latent_size(512, 512, OPTIONS.tiles), latent_size(96, 128, OPTIONS.tiles)
    expected = []  # face 0 (each sample), face 1, the background (96x128 padded: 16x16)
    for part, shape in (("face", face), ("face", face), ("background", background)):
        for _ in range(samples):
            draws = [torch.randn(1, 4, *shape, generator=official) for _ in range(count)]
            expected.append((part, draws[0][0, 0, 0, 0].item()))
    restored = [(name, first[0]) for name, _, first in log]  # background first
    assert [name for name, _ in restored] == ["background"] * 2 + ["face"] * 4
    assert restored[2:] + restored[:2] == expected
    assert after.item() == torch.randn(1, generator=official).item()

    replayed = OfficialStream(SEED)
    replay = Recipe(OPTIONS, samples, {}, replayed, task=recipe.task)
    recipe.task.replay(models, _photo(inputs), replay)
    assert replayed.noise(torch.empty(1)).item() == after.item()


def test_per_image_seeds_derive_from_the_photo_and_ignore_batching(two_faces, inputs) -> None:
    photo_seeds = [derive_seed(SEED, "a.png", k) for k in range(2)]
    logs = {}
    for batch in (1, 2):
        log: list = []
        task = PhotoTask(FaceOptions(batch=batch))
        recipe = Recipe(OPTIONS, 2, {}, PerImageSeeds(SEED), task=task)
        models = _stand_ins(two_faces, log)
        (result,) = task.restore(models, _photo(inputs), ["a.png"], [""], recipe)
        assert len(result.samples) == 2 and result.samples[0].shape == (512, 683, 3)
        assert log[0][:2] == ("background", [photo_seeds])  # the sr task's seeds
        faces = []  # (seeds, first value of the first draw of each sample), face by face
        for _, call, firsts in log[1:]:
            faces += zip(call, np.reshape(firsts, (len(call), -1)).tolist(), strict=True)
        assert [seeds for seeds, _ in faces] == [
            [face_seed(s, i) for s in photo_seeds] for i in range(2)
        ]
        assert [len(call) for _, call, _ in log[1:]] == ([1, 1] if batch == 1 else [2])
        logs[batch] = faces
    assert logs[1] == logs[2]  # a face's noise does not depend on its batch


def _grid_of_faces(grid: int, size: int, batch: int) -> tuple[list[int], object, int]:
    """A size x size photo with grid x grid faces (eye distance 15 px), restored by stand-ins
    ``batch`` faces at a time: the batch sizes the face restorer got, the result, and the
    peak of numpy allocations while restoring."""
    centers = np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), -1).reshape(-1, 2) + 0.5
    rows = []
    for cx, cy in centers * size / grid:
        points = (FACE_TEMPLATE - 256) * 0.12 + (cx, cy)
        rows.append([*(points.min(0) - 2), *(points.max(0) + 2), 0.99, *points.ravel()])
    detect = StubDetector(np.array(rows), (size, size))
    # waves of 40 px: a face pasted 1 px off its crop's place would be far off
    y, x = np.mgrid[:size, :size] * (2 * np.pi / 40)
    photo = (127.5 + 127 * np.stack([np.sin(x), np.sin(y), np.cos(x + y)], -1)).astype(np.uint8)
    lq = to_tensor(photo.astype(np.float32) / np.float32(255))
    log: list = []
    task = PhotoTask(FaceOptions(batch=batch))
    recipe = Recipe(OPTIONS, 1, {}, PerImageSeeds(SEED), task=task)
    tracemalloc.start()
    try:
        (result,) = task.restore(_stand_ins(detect, log), lq, ["p.png"], [""], recipe)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.abs(result.samples[0].astype(int) - photo).max() <= 1  # each face in its place
    return [len(call) for name, call, _ in log if name == "face"], result, peak


def test_hundreds_of_faces_restored_in_bounded_batches(monkeypatch) -> None:
    """144 faces on a 768 px photo, 16 per batch: the face restorer never gets more, no face
    is kept once pasted, and the memory of the faces' crops and restorations (numpy) peaks as
    with 36 faces: it does not grow with their number."""
    parse_mask = paste_module.face_parse_mask(np.ones((512, 512), np.uint8))  # blurs: 0.4 s
    monkeypatch.setattr(paste_module, "face_parse_mask", lambda _argmax: parse_mask)
    few_calls, _, few_peak = _grid_of_faces(6, 768, 16)
    calls, result, peak = _grid_of_faces(12, 768, 16)
    assert few_calls == [16, 16, 4] and calls == [16] * 9
    assert result.photo.restored_faces is None and len(result.photo.plan.faces) == 144
    crop = 512 * 512 * 3
    assert peak - few_peak < crop, f"{few_peak / 2**20:.1f} -> {peak / 2**20:.1f} MiB"


def test_a_photo_too_large_for_its_faces_fails_with_the_reason(
    two_faces, inputs, monkeypatch
) -> None:
    """Before detection (the detector runs on the whole upscaled photo) and before a batch of
    faces, as a photo too large for stage 2 is: a failure record naming the fix."""
    item = {"keys": ["a.png"], "sources": ["a.png"], "images": [_photo(inputs)], "failures": [],
            "replay": False}  # fmt: skip
    recipe = Recipe(OPTIONS, 1, {"a.png": ""}, PerImageSeeds(SEED), task=PhotoTask(FaceOptions()))
    models = _stand_ins(two_faces, [])
    # the detector sees 853x640 here: ~0.12 GiB; a batch of one untiled 512x512 face ~0.4 GiB
    for limit, reason in ((2**26, "the face detector runs on the whole upscaled photo (853x640"),
                          (2**28, "faces: too large to restore: output 512x512")):  # fmt: skip
        monkeypatch.setattr(pipeline_faces, "memory_limit", lambda device, limit=limit: limit)
        result = restore_item(models, item, recipe)
        ((source, why),) = result["failures"]
        assert result["restored"] == [] and reason in why and "restoration failed" in why


# ------------------------------------------------------------------------- many processes

# the patches of `face_setup`, `tiny_configs` and `CaptionSpy` (short captions, and the crops
# for the faces with their prompts printed when asked) in the processes Lightning starts: it
# starts rank 1 by running this script again with the same arguments
SCRIPT = """
import json
import sys
from pathlib import Path

import numpy as np
from facexlib.parsing.parsenet import ParseNet

from diffbir import config
from diffbir.captioning.llava import LlavaCaptioner
from diffbir.faces import networks
from diffbir.pipeline import cli, loading
from diffbir.pipeline.work import PerImageSeeds

STUB = np.load(sys.argv[1])
ROWS, SHAPE = STUB["rows"], tuple(int(n) for n in STUB["shape"])


def detect(image):
    return ROWS if image.shape[:2] == SHAPE else np.zeros((0, 15), np.float32)


config.CONFIG_ROOT = Path(sys.argv[2])
networks._parsenet = lambda: ParseNet(512, 512, parsing_ch=19, **{tiny})
loading.load_detector = lambda path, device: detect
LlavaCaptioner.__init__.__kwdefaults__["max_new_tokens"] = {short}
if STUB["crops_for_faces"]:

    def crops_for_faces(strategy, restorer, crops, key, faces, prompts, recipe):
        print("{faces_line}", json.dumps([key, list(faces), list(prompts)]), flush=True)
        return crops[:, None].repeat(1, recipe.samples, 1, 1, 1)

    PerImageSeeds.restore_faces = crops_for_faces
sys.exit(cli.main(sys.argv[3:]))
"""


FACES_LINE = "restoring faces:"  # what the crops for the faces print: key, faces, prompts


def _two_processes(
    detector: StubDetector, tiny_configs: Path, folder: Path, args: list[str],
    crops_for_faces: bool = False,
) -> subprocess.CompletedProcess:  # fmt: skip
    """The run of ``args`` on 2 processes (``--devices 2``), started as a new process with the
    patches of the tiny run and ``detector`` as the stub (its script and files in ``folder``);
    ``crops_for_faces``: the faces are not restored, their crops stand for them (as with
    `CaptionSpy`), and each face batch prints ``FACES_LINE`` with its key, faces and prompts."""
    script = folder / "faces_run.py"
    script.write_text(
        textwrap.dedent(SCRIPT)
        .replace("{tiny}", repr(TINY_PARSENET))
        .replace("{short}", str(SHORT_CAPTIONS))
        .replace("{faces_line}", FACES_LINE)
    )
    stub = folder / "detector.npz"
    np.savez(
        stub, rows=detector.rows, shape=np.array(detector.shape), crops_for_faces=crops_for_faces
    )
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, str(script), str(stub), str(tiny_configs), *args, "--devices", "2"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_two_processes_keep_each_photo_with_its_faces(
    first_run, face_setup, inputs, detector, tiny_configs, tmp_path
) -> None:
    """Lightning's 2 processes (gloo): each photo, its faces and its face outputs come from one
    rank, byte-equal to the 1-process run; rank 0 sums the faces of both ranks."""
    output, *_ = first_run
    out = tmp_path / "two"
    done = _two_processes(
        detector, tiny_configs, tmp_path, _args(face_setup, inputs, out, "--save-faces")
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("summary:") == 1 and "faces: 1 in 2 photo(s)" in done.stdout
    assert re.findall(r"rank \d: (\d+) restored", done.stdout) == ["1", "1"]
    written = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert written == sorted(p.relative_to(output) for p in output.rglob("*.png"))
    for name in written:
        assert (out / name).read_bytes() == (output / name).read_bytes(), name


def test_two_processes_caption_their_shares_of_the_photos_and_faces(
    face_setup, face_photos, two_faces, llava_dir, tiny_configs, tmp_path, monkeypatch
) -> None:
    """Lightning's 2 processes (gloo) caption their shares (rank 0 the photos a and a_face0,
    rank 1 the two faces of a, found by its own detector) into one prompts.csv, each row what
    one process captions; each rank restores its photo with the prompts of both ranks: each
    face with its own caption's, and the photos byte-equal to a 1-process run given that
    prompts.csv as --prompts (cheaper than a captioned run: no captioner). The faces are not
    restored in either run (their crops stand for them, as with `CaptionSpy`: ~10 s a face)."""
    out = tmp_path / "two"
    args = _captioned_args(face_setup, face_photos, out, llava_dir)
    done = _two_processes(two_faces, tiny_configs, tmp_path, args, crops_for_faces=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("summary:") == 1 and "summary: 2 restored" in done.stdout
    assert "captions: 4 written" in done.stdout and "(rank 0: 2, rank 1: 2)" in done.stdout
    assert re.findall(r"rank \d: (\d+) restored", done.stdout) == ["1", "1"]
    rows = read_prompt_rows(out / "prompts.csv")
    assert rows == _face_caption_rows(face_photos, two_faces, llava_dir)
    faces = [json.loads(line.removeprefix(FACES_LINE)) for line in done.stdout.splitlines()
             if line.startswith(FACES_LINE)]  # fmt: skip
    assert faces == [["a.png", [i], [rows[f"a//face{i}"].prompt]] for i in (0, 1)]

    spy = CaptionSpy(monkeypatch, two_faces)
    one = tmp_path / "one"
    rc, log = _run(_args(face_setup, face_photos, one, "--prompts", str(out / "prompts.csv")))
    assert rc == 0 and "faces: 2 in 2 photo(s)" in log, log
    assert spy.captioned == 0 and [list(face) for face in spy.faces] == faces
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["a.png", "a_face0.png"] == sorted(p.name for p in one.glob("*.png"))
    for name in written:
        assert (out / name).read_bytes() == (one / name).read_bytes(), name
