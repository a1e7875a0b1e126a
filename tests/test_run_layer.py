"""The run layer: one definition of every option (flags, preset keys and error names generated
from it), one runner whose checks all come before anything is written or loaded, and one way of
stopping on Ctrl-C in every path (issue 18)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import _args, weights_dir  # noqa: F401  (module fixture: tiny official files)

from diffbir.config import CONFIG_ROOT
from diffbir.pipeline import cli
from diffbir.pipeline.arguments import RUN_PREFIX, SHORTHAND_PREFIX, build_parser, parse
from diffbir.pipeline.options import SHORTHANDS, InferenceConfig, RunOptions
from diffbir.pipeline.presets import resolve_config
from diffbir.schema import leaves, spec_of

REPO = Path(__file__).resolve().parent.parent


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------ one definition of every option


def test_every_config_field_has_one_flag_and_every_flag_one_field() -> None:
    fields = {key: spec_of(f).flag for key, f, _ in leaves(InferenceConfig)}
    fields |= {RUN_PREFIX + key: spec_of(f).flag for key, f, _ in leaves(RunOptions)}
    shorthands = {SHORTHAND_PREFIX + s.flag.lstrip("-"): s for s in SHORTHANDS}
    actions = [
        a for a in build_parser()._actions
        if a.option_strings and a.dest not in ("help", "config")
    ]  # fmt: skip
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in actions:
        assert action.dest in fields or action.dest in shorthands, action.option_strings
        by_dest.setdefault(action.dest, []).append(action)
    for key, flag in fields.items():
        assert flag is not None, f"{key} has no flag"
        assert len(by_dest.get(key, [])) == 1, key
        assert flag in by_dest[key][0].option_strings, (key, flag)
    flags = [s for a in actions for s in a.option_strings]
    assert len(flags) == len(set(flags)), "a flag is defined twice"
    for shorthand in shorthands.values():  # a shorthand only sets fields that have flags
        assert set(shorthand.expand({})) <= set(fields)


def test_flags_presets_and_overrides_meet_in_one_config(tmp_path: Path) -> None:
    cfg, run = cli.config_from_argv(["--config", "v2", "restore.steps=7", "--cfg-scale", "3",
                                     "--tiled", "--diffusion-tile", "384", "--no-progress",
                                     "--output", str(tmp_path)])  # fmt: skip
    assert (cfg.version, cfg.restore.steps, cfg.restore.cfg_scale) == ("v2", 7, 3.0)
    assert (cfg.restore.tiles.diffusion, cfg.restore.tiles.vae_decoder) == (384, 256)
    assert (run.progress, run.output) == (False, str(tmp_path))
    assert parse(["--progress"]).run.progress and parse([]).flags == {}


# ------------------------------------------------------------ refusals before any write


def test_official_seed_mode_with_two_processes_is_refused_before_the_weights(tmp_path, capsys):
    """The mode/process conflict is found first: with no weight file anywhere, the message is
    about the mode, and nothing was created."""
    _image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    argv = _args(tmp_path / "no_weights", out, "--input", str(tmp_path / "in"),
                 "--seed-mode", "official", "--devices", "2")  # fmt: skip
    code, _, err = _run(argv, capsys)
    assert code == 2 and err.startswith("error: --seed-mode official") and "2" in err, err
    assert "missing" not in err and not out.exists()


def test_invalid_precision_in_a_preset_is_refused_before_config_yaml(tmp_path, capsys):
    _image(tmp_path / "in" / "a.png")
    preset = tmp_path / "preset.yaml"
    preset.write_text("precision: fp64\n")
    out = tmp_path / "out"
    argv = _args(tmp_path / "no_weights", out, "--input", str(tmp_path / "in"))
    code, _, err = _run([*argv, "--config", str(preset)], capsys)
    assert code == 2 and "--precision: expected one of bf16, fp16, fp32, got 'fp64'" in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="--precision"):
        resolve_config(None, ["precision=fp64"])


def test_a_wrong_type_in_a_model_config_names_key_and_value(weights_dir, tmp_path, capsys):  # noqa: F811
    _image(tmp_path / "in" / "a.png")
    tiny = (CONFIG_ROOT / "model" / "control_ldm_tiny.yaml").read_text()
    assert "model_channels: 32" in tiny
    bad = tmp_path / "wide.yaml"
    bad.write_text(tiny.replace("model_channels: 32", "model_channels: wide", 1))
    out = tmp_path / "out"
    argv = _args(weights_dir, out, "--input", str(tmp_path / "in"))
    argv[argv.index("control_ldm_tiny")] = str(bad)
    code, _, err = _run(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{bad}: params.unet_cfg.model_channels: expected an integer, got 'wide'" in err, err
    assert not (out / "config.yaml").exists()


def test_a_malformed_prompts_csv_is_refused_naming_file_and_line(weights_dir, tmp_path, capsys):  # noqa: F811
    _image(tmp_path / "in" / "a.png")
    _image(tmp_path / "in" / "b.png", seed=1)
    table = tmp_path / "prompts.csv"
    table.write_text('stem,prompt\na,"a house at dusk\nb,a cat\n')  # the quote is never closed
    out = tmp_path / "out"
    argv = _args(weights_dir, out, "--input", str(tmp_path / "in"), "--prompts", str(table))
    code, _, err = _run(argv, capsys)
    assert code == 2 and f"--prompts {table}, line 2: not valid CSV" in err, err
    assert not out.exists()


# ------------------------------------------------------------ Ctrl-C in every path


def _start(argv: list[str]) -> subprocess.Popen:
    """``diffbir-infer`` as a user starts it (Lightning re-runs this command for rank 1)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / "inference.py"), *argv]
    return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


def _interrupt_after_first_output(proc: subprocess.Popen, out: Path) -> tuple[str, str]:
    deadline = time.monotonic() + 600
    while not list(out.glob("[!.]*.png")):
        if proc.poll() is not None:
            pytest.fail(f"ended ({proc.returncode}) before the first output: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no output after 10 minutes")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=300)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[!.]*.png"))}


@pytest.mark.parametrize("mode", ["official-seed", "two-processes"])
def test_ctrl_c_prints_the_summary_of_what_was_written_and_exits_130(
    weights_dir, tmp_path, capsys, mode: str  # noqa: F811
):
    src = tmp_path / "in"
    for k in range(4):
        _image(src / f"{k}.png", seed=k)
    out = tmp_path / "out"
    extra = ["--seed-mode", "official"] if mode == "official-seed" else ["--devices", "2"]
    argv = _args(weights_dir, out, "--input", str(src), "--steps", "12", *extra)
    proc = _start(argv)
    stdout, stderr = _interrupt_after_first_output(proc, out)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert sum(line.startswith("interrupted:") for line in stderr.splitlines()) == 1, stderr
    written = _pngs(out)
    assert stdout.count("summary:") == 1, stdout
    assert f"summary: {len(written)} restored" in stdout, stdout
    assert 1 <= len(written) < 4
    # the same command finishes the rest, keeping what was written (a new process: Lightning
    # starts rank 1 by running the command line again, which must not be pytest's)
    rerun = _start(argv)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert f"{4 - len(written)} restored, {len(written)} skipped" in stdout
    assert all(_pngs(out)[name] == data for name, data in written.items())
    if mode == "official-seed":  # the resumed run drew the official stream: as a full run
        full = tmp_path / "full"
        assert cli.main(_args(weights_dir, full, "--input", str(src), "--steps", "12",
                              *extra)) == 0  # fmt: skip
        assert _pngs(full) == _pngs(out)
