"""Bad input, odd arguments and interruptions, tried as a new user would (issue #12).

Every case checks the exit status, that the message names the flag, key or file, and that
nothing was lost or half-written. Tiny weights in the official formats come from test_cli.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import _args, weights_dir  # noqa: F401  (module fixture: tiny official files)

from diffbir.checkpoint import CheckpointError, load_weights
from diffbir.files import TEMP_SUFFIX
from diffbir.pipeline import cli
from diffbir.pipeline.checks import memory_problem
from diffbir.pipeline.image_io import read_image
from diffbir.pipeline.options import TILED, RestoreOptions

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3


def _image(path: Path, width: int = 16, height: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


# ------------------------------------------------------------ options, before any model loads


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--cfg-scale", "nan"], "--cfg-scale"),
        (["--cfg-scale", "inf"], "--cfg-scale"),
        (["--strength", "nan"], "--strength"),
        (["--strength", "-1"], "--strength"),
        (["--upscale", "inf"], "--upscale"),
        (["--upscale", "nan"], "--upscale"),
        (["--upscale", "0"], "--upscale"),
        (["--steps", "1001"], "--steps"),
        (["--min-side", "-5"], "--min-side"),
        (["--guidance", "--g-scale", "nan"], "--g-scale"),
        (["--guidance", "--g-repeat", "0"], "--g-repeat"),
        (["--diffusion-tile-stride", "128"], "--diffusion-tile-stride"),  # a stride, no tile
        (["--vae-shared-norm", "both"], "--vae-shared-norm"),  # the VAE is not tiled
        (["--g-loss", "mse"], "--g-loss"),  # a guidance knob without guidance
        (["--tiled", "--diffusion-tile", "100"], "--diffusion-tile"),
        (["--tiled", "--stage1-tile", "64", "--stage1-tile-stride", "128"], "--stage1-tile-stride"),
        (["--device", "gpu"], "--device"),
        (["--num-samples", "0"], "--num-samples"),
    ],
)
def test_bad_option_is_a_usage_error_before_models_load(tmp_path, capsys, extra, flag):
    """Exit 2 naming the flag; the empty weights folder proves no model was looked for, and
    the output folder was not even created."""
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    argv = _args(tmp_path / "no_weights", out, "--input", str(tmp_path / "in"), *extra)
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    assert err.startswith(f"error: {flag}"), err
    assert "Traceback" not in err and not out.exists()


def test_options_dataclasses_validate_finite_numbers():
    for kwargs in ({"cfg_scale": float("nan")}, {"strength": float("inf")}, {"upscale": -1.0}):
        with pytest.raises(ValueError, match="expected"):
            RestoreOptions(**kwargs)
    with pytest.raises(ValueError, match="--steps: expected an integer"):
        RestoreOptions(steps=2.5)  # type: ignore[arg-type]


# ------------------------------------------------------------ output folder and collisions


def test_output_folder_problems_are_found_before_models_load(tmp_path, capsys):
    _image(tmp_path / "in" / "a.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    for output, says in (
        (blocker, "expected a folder, got a file"),
        (blocker / "sub", "cannot create the folder"),
        (Path("/proc/diffbir-not-writable"), "cannot create the folder"),
    ):
        argv = _args(tmp_path / "no_weights", output, "--input", str(tmp_path / "in"))
        code, _, err = _run(argv, capsys)
        assert code == 2 and "--output" in err and says in err, err
    assert blocker.read_text() == "keep me"


def test_output_equal_to_input_is_refused(tmp_path, capsys):
    folder = tmp_path / "photos"
    _image(folder / "a.png")
    before = _pngs(folder)
    code, _, err = _run(_args(tmp_path / "w", folder, "--input", str(folder)), capsys)
    assert code == 2 and "--output" in err and "--input" in err
    assert _pngs(folder) == before


def test_all_outputs_distinct_or_refused(weights_dir, tmp_path, capsys):  # noqa: F811
    """A subfolder named stage1/ with --save-stage1, an output that would overwrite an input,
    a recursive input that holds the output: nothing is overwritten, every input counted."""
    src = tmp_path / "in"
    _image(src / "a.png", seed=1)
    _image(src / "stage1" / "a.png", seed=2)  # its result would be a.png's stage-1 output
    out = src / "results"  # inside the recursive input
    argv = _args(weights_dir, out, "--input", str(src), "--recursive", "--save-stage1")
    code, stdout, _ = _run(argv, capsys)
    assert code == 1
    assert "1 restored, 0 skipped" in stdout and "1 failed" in stdout
    assert f"failed: {src / 'stage1' / 'a.png'}: output {out / 'stage1' / 'a.png'} would clash" \
        in stdout
    assert sorted(_pngs(out)) == ["a.png", "stage1/a.png"]
    first = _pngs(out)
    # again: the outputs inside the input are not inputs, they are counted as ignored
    code, stdout, _ = _run(argv, capsys)
    # (the two images, config.yaml and prompts.csv of the output folder)
    assert "0 restored, 1 skipped" in stdout and "1 failed, 4 ignored" in stdout
    assert _pngs(out) == first

    # input inside the output: stage-1 outputs would overwrite the inputs
    inputs = tmp_path / "o2" / "stage1"
    _image(inputs / "b.png", seed=3)
    before = inputs.joinpath("b.png").read_bytes()
    argv = _args(weights_dir, tmp_path / "o2", "--input", str(inputs), "--save-stage1")
    code, stdout, err = _run(argv, capsys)
    assert code == 1 and "would overwrite an input image" in stdout, err
    assert inputs.joinpath("b.png").read_bytes() == before


# ------------------------------------------------------------ accounting


def test_summary_counts_every_entry_and_empty_folder_fails(weights_dir, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "in"
    _image(src / "a.png")
    (src / "gone.png").symlink_to(src / "missing.png")  # a broken link
    (src / ".hidden.png").write_bytes(b"x")
    (src / "sub").mkdir()
    (src / "notes.txt").write_text("x")
    code, stdout, _ = _run(_args(weights_dir, tmp_path / "out", "--input", str(src)), capsys)
    assert code == 1
    assert "1 restored, 0 skipped" in stdout and "1 failed, 3 ignored" in stdout
    assert "gone.png: broken symbolic link" in stdout

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    code, stdout, err = _run(_args(weights_dir, tmp_path / "o", "--input", str(empty)), capsys)
    assert code == 2 and "--input: no image files" in err and "2 entries ignored" in err
    assert "--recursive" in err
    code, _, err = _run(_args(weights_dir, tmp_path / "o", "--input", "/dev/null"), capsys)
    assert code == 2 and "--input: expected an image file or a folder" in err


# ------------------------------------------------------------ memory


def test_memory_estimate_refuses_absurd_sizes(weights_dir, tmp_path, capsys):  # noqa: F811
    _image(tmp_path / "in" / "a.png", 8, 8)
    argv = _args(weights_dir, tmp_path / "out", "--input", str(tmp_path / "in"))
    code, stdout, _ = _run([*argv, "--upscale", "100000"], capsys)
    assert code == 1 and "too large to restore" in stdout and "add --tiled" in stdout
    assert not _pngs(tmp_path / "out")

    # a 1x4000 strip becomes 512x2,048,000 at the default --min-side: too large even tiled
    untiled = RestoreOptions(upscale=4.0)
    tiled = RestoreOptions(upscale=4.0, tiles=TILED)
    for options, fix in ((untiled, "add --tiled"), (tiled, "use a smaller")):
        problem = memory_problem(1, 4000, options, 1, 4, 24 * GIB)
        assert problem is not None and "512" in problem and fix in problem
    assert memory_problem(512, 512, untiled, 1, 4, 24 * GIB) is None
    assert memory_problem(1024, 1024, tiled, 1, 4, 24 * GIB) is None


# ------------------------------------------------------------ files: umask, stale temp files


def test_outputs_respect_umask_and_stale_temp_files_are_removed(weights_dir, tmp_path, capsys):  # noqa: F811
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    stale = out / "sub" / f".a.png.k1ll3d{TEMP_SUFFIX}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a png")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    old = os.umask(0o027)
    try:
        code, _, _ = _run(_args(weights_dir, out, "--input", str(tmp_path / "in")), capsys)
    finally:
        os.umask(old)
    assert code == 0
    assert (out / "a.png").stat().st_mode & 0o777 == 0o640
    assert not stale.exists()


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    for _ in range(3000):
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"gave up waiting for {what}")


def test_ctrl_c_keeps_finished_work_and_exits_130(weights_dir, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "in"
    for k in range(6):
        _image(src / f"{k:02d}.png", seed=k)
    out = tmp_path / "out"
    argv = _args(weights_dir, out, "--input", str(src), "--steps", "10")
    script = "import sys; from diffbir.pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *argv], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _wait_for(lambda: (out / "00.png").is_file(), proc, "the first output")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    interrupted = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(interrupted) == 1 and "not processed" in interrupted[0]
    finished = _pngs(out)
    restored = int(stdout.split("summary: ")[1].split(" restored")[0])
    assert restored == len(finished) >= 1
    for name in finished:
        assert read_image(out / name).shape == (32, 32, 3)  # complete, readable images
    assert not list(out.rglob(f"*{TEMP_SUFFIX}"))
    # the next run keeps them and does the rest
    code, stdout, _ = _run(argv, capsys)
    assert code == 0 and f"{6 - restored} restored, {restored} skipped" in stdout
    assert all(_pngs(out)[name] == data for name, data in finished.items())


# ------------------------------------------------------------ config and weight files


def test_model_config_errors_name_file_and_key(weights_dir, tmp_path, capsys):  # noqa: F811
    _image(tmp_path / "in" / "a.png")
    tiny = (REPO / "configs" / "model" / "control_ldm_tiny.yaml").read_text()
    cases = {
        "syntax.yaml": (tiny.replace("name: control_ldm", "name: [control_ldm"), "line"),
        "unknown.yaml": (tiny + "  colour: red\n", "params.colour"),
        "type.yaml": (tiny.replace("latent_scale_factor: 0.18215", "latent_scale_factor: abc"),
                      "params.latent_scale_factor: expected a finite number"),
        "nested.yaml": (tiny.replace("legacy: false\n  controlnet", "legsy: false\n  controlnet"),
                        "legsy"),
    }  # fmt: skip
    for name, (text, says) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        argv = _args(weights_dir, tmp_path / f"out_{name}", "--input", str(tmp_path / "in"))
        argv[argv.index("control_ldm_tiny")] = str(path)
        code, _, err = _run(argv, capsys)
        assert code == 2 and str(path) in err and says in err, (name, err)
        assert "Traceback" not in err


def test_inference_preset_and_override_errors_name_file_and_key(tmp_path, capsys):
    _image(tmp_path / "in" / "a.png")
    cases = {
        "syntax.yaml": ("restore:\n  steps: [\n", "not valid YAML (line 3"),
        "type.yaml": ("restore:\n  steps: abc\n", "restore.steps: Value 'abc'"),
        "unknown.yaml": ("restore:\n  colour: 1\n", "restore.colour: Key 'colour'"),
    }
    for name, (text, says) in cases.items():
        (tmp_path / name).write_text(text)
        argv = _args(tmp_path / "w", tmp_path / "out", "--input", str(tmp_path / "in"))
        code, _, err = _run([*argv, "--config", str(tmp_path / name)], capsys)
        assert code == 2 and f"--config {tmp_path / name}: " in err and says in err, err
    for override, says in (("restore.strength=nan", "--strength: expected a finite number"),
                           ("restore.steps=abc", "'restore.steps=abc'")):  # fmt: skip
        argv = _args(tmp_path / "w", tmp_path / "out", "--input", str(tmp_path / "in"))
        code, _, err = _run([*argv, override], capsys)
        assert code == 2 and says in err, err
    assert not (tmp_path / "out").exists()


def test_non_float_weight_tensor_is_refused(weights_dir, tmp_path, capsys):  # noqa: F811
    model = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(CheckpointError, match="weight .*int32"):
        load_weights(model, {"weight": torch.ones(1, 1, 1, 1, dtype=torch.int32),
                             "bias": torch.zeros(1)}, "f.pth")  # fmt: skip
    bad = tmp_path / "w"
    bad.mkdir()
    for f in weights_dir.iterdir():
        (bad / f.name).symlink_to(f)
    control = torch.load(weights_dir / "v2.pth", weights_only=True)
    key = next(k for k, v in control.items() if v.is_floating_point())
    control[key] = control[key].to(torch.int32)
    (bad / "v2.pth").unlink()
    torch.save(control, bad / "v2.pth")
    _image(tmp_path / "in" / "a.png")
    code, _, err = _run(_args(bad, tmp_path / "out", "--input", str(tmp_path / "in")), capsys)
    assert code == 1 and key in err and "torch.int32" in err and "v2.pth" in err


# ------------------------------------------------------------ training CLIs


class _Payload:
    """A pickled object that weights_only=True must refuse."""


def _train_error(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    return err


def _rm_args(tmp_path: Path, real47_dir: Path, *extra: str) -> list[str]:
    return ["--config", "rm_tiny", f"output_dir={tmp_path / 'run'}",
            f"data.train.dataset.source={real47_dir}", f"data.val.dataset.source={real47_dir}",
            *extra]  # fmt: skip


def test_training_config_values_name_the_key(tmp_path, real47_dir, capsys):
    from diffbir.training.cli import main_gm, main_rm

    rm_yaml = str(REPO / "configs" / "train" / "rm_tiny.yaml")
    for override, says in (
        ("trainer.max_steps=abc", "trainer.max_steps: expected an integer > 0, got 'abc'"),
        ("optim.lr=.nan", "optim.lr: expected a finite number > 0, got nan"),
        ("trainer.deterministic=maybe", "trainer.deterministic: expected true or false"),
        ("data.train.batch_size=0", "data.train.batch_size: expected an integer > 0, got 0"),
        ("optim.betas=[0.9,", "bad config override 'optim.betas=[0.9,'"),
    ):
        err = _train_error(main_rm, _rm_args(tmp_path, real47_dir, override), capsys)
        assert says in err, err
        assert "override" in says or rm_yaml in err  # a value of the file names the file
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 1\nmodel: {config: x\n")
    err = _train_error(main_gm, ["--config", str(broken)], capsys)
    assert str(broken) in err and "not valid YAML (line" in err


def test_training_resume_and_unreadable_list_fail_at_setup(tmp_path, real47_dir, capsys):
    from diffbir.training.cli import main_rm

    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "extra": _Payload()}, unsafe)
    flat = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, flat)
    for path, says in ((truncated, "not a loadable training checkpoint"),
                       (unsafe, "not a loadable training checkpoint"),
                       (flat, "not a Lightning training checkpoint")):  # fmt: skip
        err = _train_error(main_rm, [*_rm_args(tmp_path, real47_dir), "--resume", str(path)],
                           capsys)  # fmt: skip
        assert "--resume" in err and str(path) in err and says in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()

    broken = [tmp_path / "empty.png", tmp_path / "garbage.jpg"]
    broken[0].write_bytes(b"")
    broken[1].write_bytes(b"not a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in broken))
    err = _train_error(main_rm, _rm_args(tmp_path, real47_dir, f"data.train.dataset.source="
                                         f"{listing}"), capsys)  # fmt: skip
    assert "data.train.dataset.source" in err and str(listing) in err and "none of the 2" in err


# ------------------------------------------------------------ evaluation


def test_eval_reads_images_like_inference_and_checks_out(tmp_path, capsys, monkeypatch):
    from diffbir.evaluation import cli as eval_cli
    from diffbir.evaluation.metrics import EvaluationError
    from diffbir.evaluation.metrics import read_image as eval_read

    rng = np.random.default_rng(0)
    rotated = tmp_path / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(rotated, exif=exif)
    deep = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 65536, (8, 12), dtype=np.uint16)).save(deep)
    alpha = tmp_path / "alpha.png"
    Image.fromarray(rng.integers(0, 256, (8, 12, 4), dtype=np.uint8), "RGBA").save(alpha)
    for path in (rotated, deep, alpha):
        ours = eval_read(path)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, read_image(path)), path.name
    assert eval_read(rotated).shape == (1, 3, 12, 8)  # upright
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with pytest.raises(EvaluationError, match=f"{deep}: too large"):
        eval_read(deep)
    monkeypatch.undo()

    results = tmp_path / "res"
    _image(results / "a.png")
    out_file = tmp_path / "table.md"
    out_file.write_text("keep")
    code = eval_cli.main(["--result", f"x={results}", "--metrics", "psnr", "--gt", str(results),
                          "--out", str(out_file)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--out: expected a folder, got a file" in err
    assert out_file.read_text() == "keep"

    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "a.png").write_bytes(b"")
    code = eval_cli.main(["--result", f"x={results}", "--metrics", "psnr", "--gt", str(gt),
                          "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"{gt / 'a.png'}: empty file" in err


# ------------------------------------------------------------ download, make-benchmark


def test_download_bad_arguments_are_usage_errors(tmp_path, capsys):
    from diffbir.weights import main as download

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, says in (
        (["--all", "v2.pth"], "--all: takes no file names"),
        (["--list", "v2.pth"], "--list: takes no file names"),
        (["--base-url", "mirror.example", "v2.pth"], "--base-url: expected an http(s)://"),
        (["--weights-dir", str(a_file), "v2.pth"], "--weights-dir: expected a folder"),
        (["nope.pth"], "unknown weight file(s): ['nope.pth']"),
    ):
        try:
            code = download(["--quiet", *argv])
        except SystemExit as exit_info:
            code = exit_info.code
        err = capsys.readouterr().err
        assert code == 2 and says in err, (argv, err)
    assert a_file.read_text() == "x"


def test_make_benchmark_bad_arguments_and_unreadable_images(tmp_path, capsys):
    from diffbir.data.make_benchmark import main as make_benchmark

    src = tmp_path / "in"
    _image(src / "good.png", 32, 32)
    (src / "bad.png").write_bytes(b"not a png")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    base = ["--input", str(src), "--crop", "16", "--scale", "4"]
    for argv, says in (
        ([*base, "--output", str(tmp_path / "o"), "--scale", "0"], "--scale: expected"),
        ([*base, "--output", str(tmp_path / "o"), "--crop", "10"], "--crop: expected"),
        ([*base, "--output", str(a_file)], "--output: "),
        (["--input", str(a_file), "--output", str(tmp_path / "o")], "--input: expected a folder"),
    ):
        with pytest.raises(SystemExit) as info:
            make_benchmark(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and says in err, (argv, err)
    out = tmp_path / "o"
    assert make_benchmark([*base, "--output", str(out)]) == 1  # bad.png skipped, reported
    assert sorted(_pngs(out)) == ["hq/good.png", "lq/good.png"]
