"""Inference presets (configs/inference/*.yaml): they are dumps of the structured config, load
and build a restorer; precedence defaults < preset < key=value < flags; config.yaml beside the
outputs reproduces a run byte for byte; per-image prompts (--prompts CSV, prompts.csv)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbir.config import CONFIG_ROOT
from diffbir.pipeline import cli
from diffbir.pipeline.options import RestoreOptions
from diffbir.pipeline.presets import (
    PRESET_GROUP,
    default_config,
    dump,
    preset_name,
    preset_text,
    resolve_config,
)
from diffbir.pipeline.prompts import read_prompts
from diffbir.versions import DEFAULT_VERSION, VERSIONS

PRESETS = sorted((CONFIG_ROOT / PRESET_GROUP).glob("*.yaml"))


def test_presets_cover_every_version_and_task() -> None:
    """Exactly one preset per official version and task, so that test_versions (and
    test_unaligned_faces) build each one; v1 has no unaligned-face task."""
    expected = {
        preset_name(v.name, task) for v in VERSIONS.values() for task in v.tasks if task != "custom"
    }
    assert {p.stem for p in PRESETS} == expected
    assert "v1_unaligned_face" not in expected and "v2.1_unaligned_face" in expected


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_is_the_dump_of_its_version_and_task(path: Path) -> None:
    """Each preset loads and is exactly what the version table gives (no drift); that each one
    builds its restorer from tiny weights is checked in test_versions.py."""
    cfg, _ = resolve_config(path)
    assert path.stem == preset_name(cfg.version, cfg.task)
    assert path.read_text() == preset_text(cfg.version, cfg.task)
    assert cfg.restore.steps == VERSIONS[cfg.version].steps


def test_precedence_defaults_preset_overrides_flags() -> None:
    cfg, _ = resolve_config()
    steps = VERSIONS[DEFAULT_VERSION].steps
    assert (cfg.version, cfg.task, cfg.restore.steps) == (DEFAULT_VERSION, "sr", steps)
    cfg, _ = resolve_config("v2", ["restore.steps=7", "restore.cfg_scale=2.5"])
    assert (cfg.restore.steps, cfg.restore.cfg_scale, cfg.restore.upscale) == (7, 2.5, 4.0)
    cfg, _ = resolve_config("v2", ["restore.steps=7"], {"restore.steps": 3, "seed": 5})
    assert (cfg.restore.steps, cfg.seed) == (3, 5)
    assert isinstance(cfg.restore, RestoreOptions)
    cfg, _ = resolve_config(None, [], {"version": "v2", "task": "face"})  # no preset: defaults
    assert (cfg.restore.steps, cfg.restore.upscale) == (50, 1.0)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="restore.stepz"):
        resolve_config("v2", ["restore.stepz=3"])
    with pytest.raises(ValueError, match="restore.steps=many"):
        resolve_config("v2", ["restore.steps=many"])
    with pytest.raises(ValueError, match="--steps"):
        resolve_config("v2", ["restore.steps=1"])
    with pytest.raises(ValueError, match="--task face: the preset v2.1 is for task sr.*"):
        resolve_config("v2.1", [], {"task": "face"})
    with pytest.raises(ValueError, match="--version v2: the preset v2.1_face is for version v2.1"):
        resolve_config("v2.1_face", ["version=v2"])
    with pytest.raises(FileNotFoundError, match="no config named 'v9'"):
        resolve_config("v9")


# ---------------------------------------------------------------- runs of diffbir-infer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, real47_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    for source, name in (("11.jpg", "a.png"), ("12.jpg", "b.png")):
        Image.open(real47_dir / source).convert("RGB").resize((20, 16), Image.BICUBIC).save(
            root / name
        )
    return root


def _infer(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue() + err.getvalue()


def _base(weights: Path, inputs: Path, output: Path) -> list[str]:
    return ["--input", str(inputs), "--output", str(output), "--weights-dir", str(weights),
            "--device", "cpu", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def preset_run(official_tiny_dir: Path, tiny_configs: Path, inputs: Path, tmp_path_factory):
    output = tmp_path_factory.mktemp("run")
    argv = [*_base(official_tiny_dir, inputs, output), "--config", "v2", "restore.steps=3",
            "restore.min_side=0", "--upscale", "2", "--cfg-scale", "3"]  # fmt: skip
    rc, log = _infer(*argv)
    assert rc == 0, log
    return output


def test_flags_override_the_preset_and_config_yaml_records_it(preset_run: Path) -> None:
    cfg, _ = resolve_config(preset_run / "config.yaml")
    assert (cfg.version, cfg.task) == ("v2", "sr")
    assert (cfg.restore.steps, cfg.restore.cfg_scale, cfg.restore.upscale) == (3, 3.0, 2.0)
    assert cfg.restore.neg_prompt == VERSIONS["v2"].neg_prompt  # from the preset
    with Image.open(preset_run / "a.png") as img:
        assert img.size == (40, 32)
    assert read_prompts(preset_run / "prompts.csv") == {"a": "", "b": ""}


def test_rerun_from_config_yaml_gives_the_same_bytes(
    preset_run: Path, official_tiny_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    argv = [*_base(official_tiny_dir, inputs, again), "--config", str(preset_run / "config.yaml")]
    rc, log = _infer(*argv)
    assert rc == 0, log
    for name in ("a.png", "b.png", "config.yaml", "prompts.csv"):
        assert (again / name).read_bytes() == (preset_run / name).read_bytes(), name


def test_other_settings_in_a_used_output_folder_are_refused(
    preset_run: Path, official_tiny_dir: Path, inputs: Path
) -> None:
    before = (preset_run / "config.yaml").read_bytes()
    base = [*_base(official_tiny_dir, inputs, preset_run), "--config", "v2", "--upscale", "2",
            "restore.min_side=0", "--cfg-scale", "3"]  # fmt: skip
    rc, log = _infer(*base, "restore.steps=4")
    assert rc == 2 and "restore.steps" in log and "--overwrite" in log
    assert (preset_run / "config.yaml").read_bytes() == before
    # the same settings (batch size aside) resume: nothing to redo
    rc, log = _infer(*base, "restore.steps=3", "--batch-size", "2")
    assert rc == 0 and "0 restored, 2 skipped" in log, log


def test_missing_weights_write_nothing_and_an_unused_folder_takes_new_settings(
    official_tiny_dir: Path, tiny_configs: Path, inputs: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    empty = tmp_path / "no_weights"
    empty.mkdir()
    rc, log = _infer(*_base(empty, inputs, output), "--version", "v2", "--steps", "4")
    assert rc == 1 and "missing" in log and not (output / "config.yaml").exists()
    output.mkdir(exist_ok=True)
    (output / "config.yaml").write_text(dump(default_config("v2")))  # a run that restored none
    rc, log = _infer(*_base(official_tiny_dir, inputs, output), "--version", "v2", "--steps", "2",
                     "--min-side", "0", "--upscale", "1")  # fmt: skip
    assert rc == 0, log
    assert "steps: 2" in (output / "config.yaml").read_text()


def test_per_image_prompts_share_a_batch(
    official_tiny_dir: Path, tiny_configs: Path, inputs: Path, tmp_path: Path
) -> None:
    table = tmp_path / "prompts.csv"
    table.write_text('stem,prompt\na,"a red house, at dusk"\nunknown,x\n')
    common = ["--version", "v2", "--steps", "2", "--min-side", "0", "--upscale", "1",
              "--cfg-scale", "3"]  # fmt: skip
    batched = tmp_path / "batched"
    argv = [*_base(official_tiny_dir, inputs, batched), *common, "--prompts", str(table),
            "--batch-size", "2", "--pos-prompt", "a photo"]  # fmt: skip
    rc, log = _infer(*argv)
    assert rc == 0 and "1 stem(s) match no input: unknown" in log, log
    assert read_prompts(batched / "prompts.csv") == {"a": "a red house, at dusk", "b": "a photo"}
    for stem, prompt in (("a", "a red house, at dusk"), ("b", "a photo")):
        alone_in = tmp_path / f"in_{stem}"
        alone_in.mkdir()
        (alone_in / f"{stem}.png").write_bytes((inputs / f"{stem}.png").read_bytes())
        alone = tmp_path / f"alone_{stem}"
        rc, log = _infer(
            *_base(official_tiny_dir, alone_in, alone), *common, "--pos-prompt", prompt
        )
        assert rc == 0, log
        ref = np.asarray(Image.open(alone / f"{stem}.png"), dtype=np.int16)
        got = np.asarray(Image.open(batched / f"{stem}.png"), dtype=np.int16)
        assert np.abs(ref - got).max() <= 1, stem
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n")
    rc, log = _infer(
        *_base(official_tiny_dir, inputs, tmp_path / "o"), *common, "--prompts", str(bad)
    )
    assert rc == 2 and "line 1: expected two columns" in log


def test_prompts_are_encoded_once_in_one_batch(official_tiny_dir: Path, tiny_configs: Path):
    from diffbir.pipeline.loading import build_restorer

    restorer = build_restorer("sr", version="v2", weights_dir=official_tiny_dir, device="cpu")
    calls: list[list[str]] = []
    encode = restorer.cldm.encode_text
    restorer.cldm.encode_text = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    options = RestoreOptions(upscale=1.0, steps=2, min_side=0, cfg_scale=2.0)
    lq = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mixed = restorer.restore(lq, [1, 2, 3], options, ["x", "y", "x"])
    assert calls == [["x", "y", options.neg_prompt]]
    one = restorer.restore(lq[1:2], [2], RestoreOptions(**{**options.__dict__, "pos_prompt": "y"}))
    torch.testing.assert_close(mixed.samples[1], one.samples[0], atol=1e-5, rtol=0)
    assert not torch.allclose(mixed.samples[0], mixed.samples[1])
