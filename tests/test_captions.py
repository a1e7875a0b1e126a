"""The captioning stage of a run (issue 19): ``diffbir-infer --captioner llava`` captions a
folder with the tiny LLaVA before restoring it with the tiny models; captions are kept in
``prompts.csv`` and read back by reruns, a user's ``--prompts`` wins, a stopped captioning
resumes, a missing captioner is refused before anything is written, and two processes share
the captioning.

The tiny model's captions are cut at 8 new tokens here (the official 512 is tested in
test_captioning.py) so that a caption takes a fraction of a second."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image
from test_cli import _args

from diffbir.captioning import join_prompt
from diffbir.captioning.llava import LlavaCaptioner
from diffbir.pipeline import cli, runner
from diffbir.pipeline.loading import load_restorer
from diffbir.pipeline.prompts import PromptRow, prompts_csv, read_prompt_rows, read_prompts
from diffbir.pipeline.restorer import Restorer
from diffbir.pipeline.runner import Runner
from diffbir.tiny_weights import write_tiny_llava, write_tiny_weights

pytest.importorskip("transformers")

SHORT_CAPTIONS = 8  # new tokens per caption in these tests
POS = "best quality"
# real47 photo -> (input name, size): three sizes, so a caption of a resized copy would show
PHOTOS = {"1.jpg": ("a.png", (30, 20)), "5.jpg": ("b.png", (24, 24)), "27.jpg": ("c.png", (20, 28))}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("captioner") / "llava")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, real47_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for source, (name, size) in PHOTOS.items():
        Image.open(real47_dir / source).convert("RGB").resize(size, Image.BICUBIC).save(
            folder / name
        )
    return folder


@pytest.fixture
def short_captions(monkeypatch) -> None:
    monkeypatch.setitem(LlavaCaptioner.__init__.__kwdefaults__, "max_new_tokens", SHORT_CAPTIONS)


class Spy:
    """Counts the captioner's ``generate`` calls and records the images it captioned, whether a
    captioner model was still alive when the restoration models loaded, and the prompts the
    restorer received."""

    def __init__(self, monkeypatch) -> None:
        from transformers import LlavaForConditionalGeneration

        self.generate_calls = 0
        self.captioned: list[tuple[int, ...]] = []
        self.prompts: list[str] = []
        self.captioners: list[weakref.ref] = []
        self.alive_at_load: list[bool] = []
        self.after_generate = lambda: None
        generate = LlavaForConditionalGeneration.generate
        caption_batch, restore = LlavaCaptioner._caption_batch, Restorer.restore

        def counting_generate(model, *args, **kwargs):
            self.generate_calls += 1
            out = generate(model, *args, **kwargs)
            self.after_generate()
            return out

        def recording_caption_batch(captioner, images):
            self.captioners.append(weakref.ref(captioner.model))
            self.captioned += [image.shape for image in images]
            return caption_batch(captioner, images)

        def recording_restore(restorer, lq, seeds, options, pos_prompts=None, *args, **kwargs):
            self.prompts += list(pos_prompts)
            return restore(restorer, lq, seeds, options, pos_prompts, *args, **kwargs)

        def checking_load(*args, **kwargs):
            self.alive_at_load.append(any(model() is not None for model in self.captioners))
            return load_restorer(*args, **kwargs)

        monkeypatch.setattr(LlavaForConditionalGeneration, "generate", counting_generate)
        monkeypatch.setattr(runner, "load_restorer", checking_load)
        monkeypatch.setattr(LlavaCaptioner, "_caption_batch", recording_caption_batch)
        monkeypatch.setattr(Restorer, "restore", recording_restore)

    def reset(self) -> None:
        self.generate_calls, self.captioned, self.prompts = 0, [], []


def _infer(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue() + err.getvalue()


def _captioned_args(weights: Path, photos: Path, output: Path, llava: Path, *extra: str):
    return _args(
        weights, output, "--input", str(photos), "--pos-prompt", POS, "--captioner", "llava",
        "--captioner-model", str(llava), *extra,
    )  # fmt: skip


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[!.]*.png"))}


def _expected_captions(llava: Path, photos: Path) -> dict[str, str]:
    captioner = LlavaCaptioner(llava, max_new_tokens=SHORT_CAPTIONS)
    names = sorted(name for name, _ in PHOTOS.values())
    images = [np.asarray(Image.open(photos / name)) for name in names]
    return {Path(n).stem: c for n, c in zip(names, captioner.caption(images), strict=True)}


def test_a_folder_is_captioned_then_restored_and_reruns_caption_nothing(
    weights,
    llava_dir,
    photos,
    tmp_path,
    monkeypatch,
    short_captions,
):
    spy = Spy(monkeypatch)
    out = tmp_path / "out"
    argv = _captioned_args(weights, photos, out, llava_dir)
    code, log = _infer(*argv)
    assert code == 0, log
    assert "captions: 3 written" in log and "3 restored" in log
    assert spy.generate_calls == 3
    assert spy.alive_at_load == [False]  # the captioner was freed before the models loaded
    # captioned as read: the files' sizes, not the upscaled ones
    assert sorted(spy.captioned) == sorted((h, w, 3) for _, (w, h) in PHOTOS.values())
    rows = read_prompt_rows(out / "prompts.csv")
    expected = _expected_captions(llava_dir, photos)
    assert rows == {stem: PromptRow(f"{c}, {POS}", c) for stem, c in expected.items()}
    assert all(expected.values())
    assert sorted(spy.prompts) == sorted(row.prompt for row in rows.values())
    first = _pngs(out)
    assert len(first) == 3

    spy.reset()
    code, log = _infer(*argv)  # nothing left: nothing restored, nothing captioned
    assert code == 0 and "0 restored, 3 skipped" in log, log
    assert spy.generate_calls == 0 and read_prompt_rows(out / "prompts.csv") == rows

    (out / "b.png").unlink()  # resumed: b is restored again with its recorded caption
    code, log = _infer(*argv)
    assert code == 0 and "1 restored, 2 skipped" in log, log
    assert spy.generate_calls == 0 and spy.prompts == [rows["b"].prompt]
    assert _pngs(out) == first


def test_stopped_captioning_keeps_its_captions_and_resumes(
    weights,
    llava_dir,
    photos,
    tmp_path,
    monkeypatch,
    short_captions,
):
    spy = Spy(monkeypatch)
    out = tmp_path / "out"
    argv = _captioned_args(weights, photos, out, llava_dir)
    stop = threading.Event()
    spy.after_generate = stop.set  # as a Ctrl-C during the first caption
    cfg, run = cli.config_from_argv(argv)
    result = Runner(cfg, run, stop=stop).run()
    assert result.status == 130 and spy.generate_calls == 1
    assert not _pngs(out) and spy.prompts == []  # the restoration models never ran
    (stem, row), *others = read_prompt_rows(out / "prompts.csv").items()
    assert not others and row.caption and row.prompt == join_prompt(row.caption, POS)

    # other captioner settings would mix captions: refused before anything is written
    before = (out / "prompts.csv").read_bytes()
    code, log = _infer(*argv, "--captioner-precision", "bf16")
    assert code == 2 and "caption.precision" in log and "--overwrite" in log, log
    assert (out / "prompts.csv").read_bytes() == before

    spy.reset()
    spy.after_generate = lambda: None
    code, log = _infer(*argv)
    assert code == 0 and "3 restored" in log, log
    assert spy.generate_calls == 2 and len(spy.captioned) == 2
    assert read_prompt_rows(out / "prompts.csv")[stem] == row
    assert read_prompt_rows(out / "prompts.csv") == {
        s: PromptRow(f"{c}, {POS}", c) for s, c in _expected_captions(llava_dir, photos).items()
    }


def test_the_users_prompts_win_and_a_recorded_prompts_csv_restores_the_same(
    weights,
    llava_dir,
    photos,
    tmp_path,
    monkeypatch,
    short_captions,
):
    spy = Spy(monkeypatch)
    table = tmp_path / "mine.csv"
    table.write_text('stem,prompt\nb,"a red house, at dusk"\n')
    out = tmp_path / "out"
    code, log = _infer(*_captioned_args(weights, photos, out, llava_dir, "--prompts", str(table)))
    assert code == 0, log
    assert spy.generate_calls == 2 and (24, 24, 3) not in spy.captioned
    rows = read_prompt_rows(out / "prompts.csv")
    assert rows["b"] == PromptRow("a red house, at dusk", "")
    assert rows["a"].caption and rows["a"].prompt == f"{rows['a'].caption}, {POS}"
    assert "a red house, at dusk" in spy.prompts

    # caption once, restore from the record (edited or not): the same images, no captioning
    spy.reset()
    again = tmp_path / "again"
    code, log = _infer(
        *_captioned_args(weights, photos, again, llava_dir, "--prompts", str(out / "prompts.csv"))
    )
    assert code == 0 and spy.generate_calls == 0, log
    assert _pngs(again) == _pngs(out)
    assert read_prompts(again / "prompts.csv") == read_prompts(out / "prompts.csv")


def test_a_captioner_that_cannot_run_is_refused_before_anything_is_written(
    weights,
    llava_dir,
    photos,
    tmp_path,
):
    out = tmp_path / "out"
    empty = tmp_path / "no_model"
    empty.mkdir()
    code, log = _infer(*_captioned_args(weights, photos, out, empty))
    assert code == 1 and "captioner llava" in log and "missing" in log, log
    assert "diffbir-download --captioner llava" in log and "Traceback" not in log
    assert not any(out.iterdir())
    code, log = _infer(*_args(weights, out, "--input", str(photos), "--captioner", "ram"))
    assert code == 1 and "Recognize Anything" in log and not any(out.iterdir()), log
    code, log = _infer(
        *_captioned_args(weights, photos, out, llava_dir, "--captioner-precision", "4bit")
    )
    assert code == 2 and "needs a CUDA device" in log and not any(out.iterdir()), log
    code, log = _infer(*_args(weights, out, "--captioner-batch-size", "2"))
    assert code == 2 and "--captioner-batch-size: only used with a captioner" in log, log


def test_prompts_csv_round_trips_captions_and_is_a_prompts_file(tmp_path) -> None:
    rows = {
        "a": PromptRow('a "red", sofa\nat night, x', 'a "red", sofa\nat night'),
        "sub/b": PromptRow("x", ""),
    }
    path = tmp_path / "prompts.csv"
    path.write_text(prompts_csv(rows))
    assert read_prompt_rows(path) == rows
    assert read_prompts(path) == {"a": 'a "red", sofa\nat night, x', "sub/b": "x"}
    path.write_text("stem,prompt,caption\na,x\n")
    with pytest.raises(ValueError, match="line 2: expected three columns"):
        read_prompts(path)
    path.write_text("a,x,y\n")  # a third column without the record's header: a stray comma
    with pytest.raises(ValueError, match="line 1: expected two columns"):
        read_prompts(path)


# ------------------------------------------------------------ two processes

WRAPPER = f"""\
import sys
from diffbir.captioning.llava import LlavaCaptioner
LlavaCaptioner.__init__.__kwdefaults__["max_new_tokens"] = {SHORT_CAPTIONS}
from diffbir.pipeline.cli import main
sys.exit(main())
"""


def test_two_processes_caption_their_shares_into_one_prompts_csv(
    weights,
    llava_dir,
    tmp_path,
    real47_dir,
    short_captions,
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, source in enumerate(["1.jpg", "5.jpg", "27.jpg", "32.jpg"]):
        image = Image.open(real47_dir / source).convert("RGB").resize((24, 20), Image.BICUBIC)
        image.save(inputs / f"{i}.png")
    # diffbir-infer with shorter captions; Lightning starts rank 1 by running this script again
    script = tmp_path / "infer_short_captions.py"
    script.write_text(WRAPPER)
    out = tmp_path / "out"
    argv = _captioned_args(weights, inputs, out, llava_dir, "--devices", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(script), *argv], env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "captions: 4 written" in done.stdout and "(rank 0: 2, rank 1: 2)" in done.stdout
    assert "4 restored" in done.stdout
    assert not list(out.glob(".*.tmp"))

    names = sorted(p.name for p in inputs.iterdir())
    captioner = LlavaCaptioner(llava_dir)
    captions = captioner.caption([np.asarray(Image.open(inputs / n)) for n in names])
    expected = {
        Path(n).stem: PromptRow(f"{c}, {POS}", c) for n, c in zip(names, captions, strict=True)
    }
    assert read_prompt_rows(out / "prompts.csv") == expected
    # each rank restored with the recorded prompts: one process given them as --prompts
    # writes the same bytes (per-image seeds do not depend on the process count)
    reference = tmp_path / "reference"
    code, log = _infer(
        *_args(weights, reference, "--input", str(inputs), "--prompts", str(out / "prompts.csv"))
    )
    assert code == 0, log
    assert _pngs(reference) == _pngs(out) and len(_pngs(out)) == 4
