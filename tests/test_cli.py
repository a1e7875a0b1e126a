"""End-to-end ``diffbir-infer`` on small real47 images plus broken files, with random tiny
weights written by the test in the official file formats."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffbir.pipeline import cli, jobs
from diffbir.pipeline.image_io import read_image
from diffbir.pipeline.samples import SAMPLE_NAMES, load_sample
from diffbir.tiny_weights import write_tiny_weights
from diffbir.weights import OFFICIAL_WEIGHTS

# name in real47 -> (saved name, size) of the small test inputs
INPUTS = {
    "11.jpg": ("a.jpg", (24, 24)),
    "12.jpg": ("b.png", (24, 24)),
    "15.jpg": ("c_gray.png", (24, 24)),
    "13.jpg": ("d.png", (28, 20)),
}
BROKEN = ("empty.png", "garbage.png", "truncated.jpg", "anim.gif")



@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory, real47_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for source, (name, size) in INPUTS.items():
        img = Image.open(real47_dir / source).convert("RGB").resize(size, Image.BICUBIC)
        img = img.convert("L") if "gray" in name else img
        img.save(root / name)
    jpeg = (real47_dir / "1.jpg").read_bytes()
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.png").write_bytes(b"not an image at all")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "anim.gif").write_bytes(b"GIF89a\x01\x00\x01\x00")
    (root / "notes.txt").write_text("ignored")
    return root


def _args(weights_dir: Path, output: Path, *extra: str, task: str = "sr") -> list[str]:
    stage1 = ["--stage1-config", "bsrnet_tiny"] if task == "sr" else []
    return [
        "--output", str(output), "--weights-dir", str(weights_dir),
        "--cldm-config", "control_ldm_tiny", *stage1,
        "--version", "v2", "--task", task, "--upscale", "2", "--steps", "2", "--min-side", "64",
        "--cfg-scale", "2", "--seed", "7", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def first_run(weights_dir: Path, input_dir: Path, tmp_path_factory):
    output = tmp_path_factory.mktemp("out")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(_args(weights_dir, output, "--input", str(input_dir), "--save-stage1"))
    return output, rc, out.getvalue(), err.getvalue()


def _stems() -> list[str]:
    return [Path(name).stem for name, _ in INPUTS.values()]


def test_end_to_end_outputs_failures_and_summary(first_run) -> None:
    output, rc, out, err = first_run
    assert rc == 1  # broken inputs make the run fail, after everything else was restored
    assert "summary: 4 restored, 0 skipped" in out and "4 failed, 1 ignored" in out
    reasons = {
        "empty.png": "empty file",
        "garbage.png": "not a recognised image",
        "truncated.jpg": "truncated",
        "anim.gif": "unsupported format",
    }
    for name, reason in reasons.items():
        assert any(name in line and reason in line for line in out.splitlines()), name
        assert name in err
    for name, size in INPUTS.values():
        stem = Path(name).stem
        restored = read_image(output / f"{stem}.png")
        assert restored.shape == (size[1] * 2, size[0] * 2, 3)
        assert (output / "stage1" / f"{stem}.png").is_file()
    leftovers = [p.name for p in output.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_resume_skips_existing_and_is_deterministic(first_run, weights_dir, input_dir, capsys):
    output, *_ = first_run
    before = (output / "b.png").read_bytes()
    assert cli.main(_args(weights_dir, output, "--input", str(input_dir), "--save-stage1")) == 1
    assert "0 restored, 4 skipped" in capsys.readouterr().out

    (output / "b.png").unlink()
    assert cli.main(_args(weights_dir, output, "--input", str(input_dir), "--save-stage1")) == 1
    assert "1 restored, 3 skipped" in capsys.readouterr().out
    assert (output / "b.png").read_bytes() == before


def test_results_independent_of_batch_size_and_order(
    first_run, weights_dir, input_dir, tmp_path, capsys
) -> None:
    output, *_ = first_run
    batched = tmp_path / "batched"
    cli.main(_args(weights_dir, batched, "--input", str(input_dir), "--batch-size", "3"))
    lone_dir = tmp_path / "lone"
    lone_dir.mkdir()
    shutil.copy(input_dir / "b.png", lone_dir / "b.png")
    lone = tmp_path / "lone_out"
    assert cli.main(_args(weights_dir, lone, "--input", str(lone_dir))) == 0
    assert "1 restored" in capsys.readouterr().out
    for stem in _stems():
        ref = np.asarray(Image.open(output / f"{stem}.png"), dtype=np.int16)
        got = np.asarray(Image.open(batched / f"{stem}.png"), dtype=np.int16)
        assert np.abs(ref - got).max() <= 1, stem
    ref = np.asarray(Image.open(output / "b.png"), dtype=np.int16)
    assert np.abs(ref - np.asarray(Image.open(lone / "b.png"), dtype=np.int16)).max() <= 1


def test_num_samples_single_file_and_overwrite(weights_dir, input_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = _args(weights_dir, out, "--input", str(input_dir / "a.jpg"), "--num-samples", "2")
    assert cli.main(args) == 0
    first, second = (np.asarray(Image.open(out / f"a_{k}.png")) for k in range(2))
    assert not np.array_equal(first, second)
    assert cli.main([*args, "--overwrite"]) == 0
    assert "1 restored, 0 skipped" in capsys.readouterr().out


def test_custom_task_without_stage1(weights_dir, input_dir, tmp_path) -> None:
    out = tmp_path / "custom"
    args = _args(weights_dir, out, "--input", str(input_dir / "d.png"), task="custom")
    assert cli.main([*args, "--save-stage1"]) == 0
    stage1 = np.asarray(Image.open(out / "stage1" / "d.png"))
    assert stage1.shape == (40, 56, 3) and (out / "d.png").is_file()


def test_sample_photos_with_tiling_and_guidance(weights_dir, tmp_path, monkeypatch, capsys):
    small = lambda name, scale: load_sample(name, scale, max_side=64)  # noqa: E731
    monkeypatch.setattr(jobs, "load_sample", small)
    out = tmp_path / "samples"
    extra = [
        "--tiled", "--stage1-tile", "16", "--stage1-tile-stride", "8",
        "--vae-encoder-tile", "48", "--vae-decoder-tile", "48",
        "--diffusion-tile", "48", "--diffusion-tile-stride", "24",
        "--guidance", "--g-space", "rgb", "--g-scale", "0.5", "--color-fix", "wavelet",
    ]  # fmt: skip
    assert cli.main(_args(weights_dir, out, "--upscale", "4", "--min-side", "0", *extra)) == 0
    assert "3 restored" in capsys.readouterr().out
    for name in SAMPLE_NAMES:
        lq = read_image(out / "inputs" / f"{name}.png")
        assert read_image(out / f"{name}.png").shape == (lq.shape[0] * 4, lq.shape[1] * 4, 3)


def test_missing_weights_and_bad_flags(input_dir, tmp_path, capsys) -> None:
    empty = tmp_path / "no_weights"
    empty.mkdir()
    assert cli.main(_args(empty, tmp_path / "o", "--input", str(input_dir))) == 1
    err = capsys.readouterr().err
    assert "3 weight file(s) missing" in err
    for name in ("v2-1_512-ema-pruned.ckpt", "v2.pth", "BSRNet.pth"):
        assert str(empty.resolve() / name) in err and OFFICIAL_WEIGHTS[name].url in err
    assert cli.main(_args(empty, tmp_path / "o", "--steps", "1")) == 2
    assert "--steps" in capsys.readouterr().err
    assert cli.main(_args(empty, tmp_path / "o", "--input", str(tmp_path / "nope"))) == 2
    assert "--input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--task", "deblur"])
