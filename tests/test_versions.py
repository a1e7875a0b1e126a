"""Model versions (v1, v2, v2.1, custom): the table, the restorer each version builds from tiny
weights saved under the official names and formats, the wrong-version refusal, downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MARKER_KEY, OFFICIAL_TINY, marker
from omegaconf import OmegaConf
from PIL import Image

from diffbir import weights
from diffbir.diffusion import NoiseSchedule
from diffbir.models.bsrnet import RRDBNet
from diffbir.models.scunet import SCUNet
from diffbir.models.swinir import SwinIR
from diffbir.pipeline import cli
from diffbir.pipeline.loading import (
    CustomModel,
    WeightPaths,
    WrongVersionError,
    build_from_config,
    build_restorer,
    custom_model,
    resolve_weight_paths,
)
from diffbir.pipeline.presets import preset_name, resolve_config
from diffbir.versions import DEFAULT_VERSION, VERSIONS, get_version, role_of_file, versions_of_file

SPEC_V21_POS = "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera"
SPEC_V21_NEG_END = "jpeg artifacts, deformed, lowres, over-smooth."

SD, SD_ZSNR = "v2-1_512-ema-pruned.ckpt", "sd2.1-base-zsnr-laionaes5.ckpt"
GENERAL_V1, FACE, REALESRGAN = (
    "general_swinir_v1.ckpt", "face_swinir_v1.ckpt", "realesrgan_s4_swinir_100k.pth"
)  # fmt: skip
# (version, task) -> (sd file, controlnet file, stage-1 file, stage-1 class, resize first)
EXPECTED = {
    ("v1", "sr"): (SD, "v1_general.pth", GENERAL_V1, SwinIR, True),
    ("v1", "denoise"): (SD, "v1_general.pth", GENERAL_V1, SwinIR, True),
    ("v1", "face"): (SD, "v1_face.pth", FACE, SwinIR, True),
    ("v2", "sr"): (SD, "v2.pth", "BSRNet.pth", RRDBNet, False),
    ("v2", "denoise"): (SD, "v2.pth", "scunet_color_real_psnr.pth", SCUNet, True),
    ("v2", "face"): (SD, "v2.pth", FACE, SwinIR, True),
    ("v2.1", "sr"): (SD_ZSNR, "DiffBIR_v2.1.pt", REALESRGAN, SwinIR, True),
    ("v2.1", "denoise"): (SD_ZSNR, "DiffBIR_v2.1.pt", REALESRGAN, SwinIR, True),
    ("v2.1", "face"): (SD_ZSNR, "DiffBIR_v2.1.pt", FACE, SwinIR, True),
}


def test_table_holds_the_spec_facts() -> None:
    v1, v2, v21 = VERSIONS["v1"], VERSIONS["v2"], VERSIONS["v2.1"]
    for v in (v1, v2):
        assert (v.parameterization, v.zero_terminal_snr) == ("eps", False)
    assert (v21.parameterization, v21.zero_terminal_snr) == ("v", True)
    assert (v2.sampler, v2.steps, v2.cfg_scale, v2.pos_prompt) == ("spaced", 50, 4.0, "")
    assert v2.neg_prompt == "low quality, blurry, low-resolution, noisy, unsharp, weird textures"
    assert (v21.sampler, v21.steps, v21.cfg_scale) == ("edm_dpm++_3m_sde", 10, 6.0)
    assert v21.pos_prompt.startswith(SPEC_V21_POS) and v21.neg_prompt.endswith(SPEC_V21_NEG_END)
    assert versions_of_file("face_swinir_v1.ckpt") == ["v1", "v2", "v2.1"]
    assert versions_of_file("v2-1_512-ema-pruned.ckpt") == ["v1", "v2"]
    assert versions_of_file("DiffBIR_v2.1.pt") == ["v2.1"] and versions_of_file("mine.pth") == []
    assert role_of_file("BSRNet.pth") == "stage1" and role_of_file("v2.pth") == "controlnet"
    # the face detector and parser of the unaligned-face task: v2 and v2.1, not v1
    assert versions_of_file("detection_Resnet50_Final.pth") == ["v2", "v2.1"]
    assert role_of_file("parsing_parsenet.pth") == "face_parser"
    # every official file of the table can be downloaded, and every download belongs to a version
    table_files = {name for v in VERSIONS.values() for name in v.all_files()}
    assert table_files == set(weights.OFFICIAL_WEIGHTS)
    with pytest.raises(ValueError, match="--version: expected one of"):
        get_version("v3")


@pytest.mark.parametrize(("version", "task"), sorted(EXPECTED))
def test_each_version_preset_builds_its_files_stage1_and_schedule(
    official_tiny_dir: Path, tiny_configs: Path, version: str, task: str
) -> None:
    sd_file, control_file, stage1_file, stage1_class, resize_first = EXPECTED[(version, task)]
    paths = resolve_weight_paths(task, official_tiny_dir, version=version)
    assert paths == WeightPaths(
        official_tiny_dir / sd_file,
        official_tiny_dir / control_file,
        official_tiny_dir / stage1_file,
    )
    # built through the version's preset (configs/inference/), as `diffbir-infer --config` does
    cfg, _ = resolve_config(preset_name(version, task), [f"weights.dir={official_tiny_dir}"])
    restorer = build_from_config(cfg, "cpu")
    # each file's marker tensor arrived in the model it belongs to
    sd_key = MARKER_KEY["sd.ckpt"]
    assert torch.all(restorer.cldm.sd_state_dict()[sd_key] == marker(sd_file))
    control_key = MARKER_KEY["controlnet.pth"]
    assert torch.all(restorer.cldm.controlnet.state_dict()[control_key] == marker(control_file))
    stage1 = restorer.cleaner
    assert isinstance(stage1.model, stage1_class) and stage1.resize_first == resize_first
    stage1_key = MARKER_KEY[OFFICIAL_TINY[stage1_file][0]]
    assert torch.all(stage1.model.state_dict()[stage1_key] == marker(stage1_file))
    # schedule: v2.1 is zero terminal SNR (its last alpha_bar is 0), v1/v2 the plain linear one
    expected = NoiseSchedule.linear(zero_terminal_snr=version == "v2.1").alphas_cumprod
    assert torch.equal(restorer.schedule.alphas_cumprod, expected)
    assert (restorer.schedule.alphas_cumprod[-1] == 0) == (version == "v2.1")
    assert restorer.parameterization == ("v" if version == "v2.1" else "eps")
    # defaults of the version (prompts, sampler, steps, CFG) and of the task (upscale)
    options = cfg.restore
    assert options.sampler.name == VERSIONS[version].sampler
    v = VERSIONS[version]
    assert (options.pos_prompt, options.neg_prompt) == (v.pos_prompt, v.neg_prompt)
    assert (options.steps, options.cfg_scale) == (v.steps, v.cfg_scale)
    assert options.upscale == (4.0 if task == "sr" else 1.0)


def test_a_file_of_another_version_is_refused_before_loading(tmp_path: Path) -> None:
    """Checked by name before anything is read: the files need not even exist."""
    paths = resolve_weight_paths(
        "sr", tmp_path, version="v2", controlnet=tmp_path / "DiffBIR_v2.1.pt"
    )
    with pytest.raises(WrongVersionError) as info:
        build_restorer("sr", paths, version="v2", device="cpu")
    msg = str(info.value)
    assert "--controlnet-weights" in msg and "DiffBIR_v2.1.pt" in msg
    assert "DiffBIR v2.1" in msg and "version v2 is selected" in msg and "--version v2.1" in msg
    assert "v2.pth" in msg  # the file the selected version uses
    zsnr = tmp_path / "sd2.1-base-zsnr-laionaes5.ckpt"
    with pytest.raises(WrongVersionError, match="--sd-weights.*v2.1.*version v1 is selected"):
        build_restorer(
            "face", resolve_weight_paths("face", tmp_path, version="v1", sd=zsnr), version="v1"
        )
    bsrnet = tmp_path / "BSRNet.pth"
    with pytest.raises(WrongVersionError, match="--stage1-weights.*--version v2"):
        paths = resolve_weight_paths("sr", tmp_path, version="v2.1", stage1=bsrnet)
        build_restorer("sr", paths, version="v2.1")
    # a file in the wrong role
    wrong_role = resolve_weight_paths("sr", tmp_path, version="v2", stage1=tmp_path / "v2.pth")
    with pytest.raises(WrongVersionError, match="--stage1-weights.*IRControlNet.*not a stage-1"):
        build_restorer("sr", wrong_role, version="v2")
    face_file = tmp_path / "detection_Resnet50_Final.pth"  # a face-task file, v2 and v2.1
    wrong_role = resolve_weight_paths("sr", tmp_path, version="v2", stage1=face_file)
    with pytest.raises(WrongVersionError, match="--stage1-weights.*face detector.*not a stage-1"):
        build_restorer("sr", wrong_role, version="v2")


def test_cli_refuses_a_wrong_version_file(official_tiny_dir: Path, tiny_configs, tmp_path, capsys):
    """A weight file of another version is a bad argument: exit 2, before anything is written."""
    args = [
        "--output", str(tmp_path / "out"), "--weights-dir", str(official_tiny_dir),
        "--controlnet-weights", str(official_tiny_dir / "DiffBIR_v2.1.pt"), "--version", "v2",
        "--steps", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "DiffBIR_v2.1.pt" in err and "--version v2.1" in err
    assert not (tmp_path / "out").exists()


def test_v21_restores_from_the_last_timestep_of_its_zero_snr_schedule(
    official_tiny_dir: Path, tiny_configs, tmp_path: Path, capsys
) -> None:
    """At the last timestep alpha_bar is 0: only v-prediction gives a finite x0 there."""
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), np.uint8)).save(image)
    args = [
        "--input", str(image.parent), "--output", str(tmp_path / "out"), "--version", "v2.1",
        "--weights-dir", str(official_tiny_dir), "--steps", "3", "--min-side", "0",
        "--upscale", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr()
    restored = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert restored.shape == (48, 40, 3) and restored.std() > 1


def _gm_config(tmp_path: Path, official_tiny_dir: Path, sd: str, **model) -> Path:
    cfg = OmegaConf.load(Path(__file__).parent.parent / "configs" / "train" / "gm_tiny.yaml")
    cfg.model.config = "control_ldm"
    cfg.model.sd_weights = str(official_tiny_dir / sd)
    cfg.model.stage1 = {"config": "swinir", "weights": str(tmp_path / "rm_export.pth")}
    for key, value in model.items():
        cfg.model[key] = value
    path = tmp_path / f"gm_{len(model)}.yaml"
    OmegaConf.save(cfg, path)
    return path


def _build(custom: CustomModel):
    return build_restorer(
        "sr",
        custom.paths,
        version=custom.version,
        cldm_config=custom.cldm_config,
        stage1_config=custom.stage1_config,
    )


def test_custom_version_reads_the_training_config(
    official_tiny_dir: Path, tiny_configs: Path, parity_dir: Path, tmp_path: Path
) -> None:
    from diffbir.checkpoint import read_state_dict, save_state_dict

    swinir = read_state_dict(parity_dir / "swinir.ckpt")
    save_state_dict(swinir, tmp_path / "rm_export.pth")  # our RM export: flat
    control = read_state_dict(parity_dir / "controlnet.pth")
    key = MARKER_KEY["controlnet.pth"]
    control[key] = torch.full_like(control[key], 7.0)
    ckpt = tmp_path / "last.ckpt"  # a GM training checkpoint (Lightning layout)
    torch.save({"state_dict": {f"cldm.controlnet.{k}": v for k, v in control.items()}}, ckpt)

    eps_cfg = _gm_config(tmp_path, official_tiny_dir, "v2-1_512-ema-pruned.ckpt")
    custom = custom_model(eps_cfg, ckpt)
    assert (custom.version.parameterization, custom.version.zero_terminal_snr) == ("eps", False)
    restorer = _build(custom)
    assert torch.all(restorer.cldm.controlnet.state_dict()[key] == 7.0)
    assert isinstance(restorer.cleaner.model, SwinIR) and restorer.cleaner.resize_first
    assert restorer.schedule.alphas_cumprod[-1] > 0

    v_cfg = _gm_config(tmp_path, official_tiny_dir, "sd2.1-base-zsnr-laionaes5.ckpt",
                       parameterization="v", zero_terminal_snr=True)  # fmt: skip
    export = tmp_path / "controlnet.pth"
    save_state_dict(control, export)  # the exported IRControlNet: flat
    custom = custom_model(v_cfg, export)
    assert (custom.version.parameterization, custom.version.zero_terminal_snr) == ("v", True)
    restorer = _build(custom)
    assert restorer.schedule.alphas_cumprod[-1] == 0 and restorer.parameterization == "v"

    # the config says eps, but the SD file is the v-prediction one of v2.1: refused
    wrong = _gm_config(tmp_path, official_tiny_dir, "sd2.1-base-zsnr-laionaes5.ckpt")
    custom = custom_model(wrong, export)
    with pytest.raises(WrongVersionError, match="model.parameterization.*--version v2.1"):
        _build(custom)
    with pytest.raises(ValueError, match="--train-config"):
        custom_model(None, export)


def test_gm_training_refuses_an_sd_file_of_another_schedule() -> None:
    from diffbir.config import load_config
    from diffbir.training.cli import check_setup
    from diffbir.training.data import TrainingSetupError

    zsnr = "model.sd_weights=weights/sd2.1-base-zsnr-laionaes5.ckpt"
    cfg = load_config("gm_tiny", [zsnr], "train")
    with pytest.raises(TrainingSetupError, match="model.sd_weights: .*v2.1 file.*eps-prediction"):
        check_setup(cfg, "gm")


def test_download_by_version(tmp_path: Path, capsys) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in weights.OFFICIAL_WEIGHTS:
        (mirror / name).write_bytes(name.encode())
    base = ["--base-url", mirror.as_uri(), "--quiet"]
    default_dir = tmp_path / "default"
    assert weights.main([*base, "--weights-dir", str(default_dir)]) == 0
    default_files = VERSIONS[DEFAULT_VERSION].all_files()
    assert sorted(p.name for p in default_dir.iterdir()) == sorted(default_files)
    v21_dir = tmp_path / "v2.1"
    assert weights.main([*base, "--weights-dir", str(v21_dir), "--version", "v2.1"]) == 0
    assert sorted(p.name for p in v21_dir.iterdir()) == sorted(
        ["sd2.1-base-zsnr-laionaes5.ckpt", "DiffBIR_v2.1.pt", "realesrgan_s4_swinir_100k.pth",
         "face_swinir_v1.ckpt", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"]
    )  # fmt: skip
    v2_dir = tmp_path / "v2"
    assert weights.main([*base, "--weights-dir", str(v2_dir), "--version", "v2"]) == 0
    assert sorted(p.name for p in v2_dir.iterdir()) == sorted(VERSIONS["v2"].all_files())
    capsys.readouterr()
    assert weights.main(["--list", "--weights-dir", str(v2_dir)]) == 0
    listing = capsys.readouterr().out
    assert "DiffBIR_v2.1.pt\tmissing\tv2.1\t" in listing and "v2.pth\tpresent\tv2\t" in listing
    assert weights.main(["v2.pth", "--version", "v2", "--weights-dir", str(v2_dir)]) == 2
