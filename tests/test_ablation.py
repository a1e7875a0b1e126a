"""IRControlNet ablation variants: build, zero-init behaviour, training, state-dict differences."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_ref, read_manifest
from omegaconf import OmegaConf

from diffbir.checkpoint import read_state_dict
from diffbir.config import build_model, load_config
from diffbir.data.realesrgan import RealESRGANDegradation
from diffbir.models.ablation import (
    VARIANTS,
    AblationControlLDM,
    AblationControlNet,
    unet_with_controls,
)
from diffbir.models.control_ldm import ControlLDM, unet_kwargs
from diffbir.training.data import build_paired_dataset

ABLATIONS = [v for v in VARIANTS if v != "ircontrolnet"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Tiny config: model_channels 32, channel_mult [1, 2], 1 res block. Condition-network blocks
# 0..3 output 32, 32, 32, 64 channels (the skips), the middle block 64. UNet decoder block j uses
# control 3 - j; its main-path input is 64 (middle), 64, 64, 32 wide.
CONV = (3, 3)
EXPECTED_CHANGES: dict[str, dict[str, tuple[int, ...]]] = {
    "controlnet": {"input_blocks.0.0.weight": (32, 4, *CONV)},  # z_t only
    "no_zt": {"input_blocks.0.0.weight": (32, 4, *CONV)},  # c_RM only
    "random_init": {},
    "decoder": {  # control i -> main path of decoder block 3 - i: widths 32, 64, 64, 64
        "zero_convs.1.0.weight": (64, 32, 1, 1), "zero_convs.1.0.bias": (64,),
        "zero_convs.2.0.weight": (64, 32, 1, 1), "zero_convs.2.0.bias": (64,),
    },
    "concat": {  # main + skip: 32+32, 64+32, 64+32, 64+64
        "zero_convs.0.0.weight": (64, 32, 1, 1), "zero_convs.0.0.bias": (64,),
        "zero_convs.1.0.weight": (96, 32, 1, 1), "zero_convs.1.0.bias": (96,),
        "zero_convs.2.0.weight": (96, 32, 1, 1), "zero_convs.2.0.bias": (96,),
        "zero_convs.3.0.weight": (128, 64, 1, 1), "zero_convs.3.0.bias": (128,),
    },
    "sft": {  # gamma and beta: twice the width of what they modulate
        **{f"zero_convs.{i}.0.weight": (2 * c, c, 1, 1) for i, c in enumerate((32, 32, 32, 64))},
        **{f"zero_convs.{i}.0.bias": (2 * c,) for i, c in enumerate((32, 32, 32, 64))},
        "middle_block_out.0.weight": (128, 64, 1, 1), "middle_block_out.0.bias": (128,),
    },
}  # fmt: skip
# Variant 1's extra keys: ControlNet's condition encoder (hint widths 8, 16, 16, 32 -> 32)
HINT_PREFIX = "input_hint_block."



def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def sd_weights(parity_dir: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(parity_dir / "sd.ckpt")


def _variant(name: str, sd_weights: dict) -> AblationControlLDM:
    model = build_model(f"control_ldm_tiny_{name}").eval()
    model.load_sd_weights(sd_weights, "sd.ckpt")
    model.init_controlnet_from_unet()
    return model


@pytest.fixture(scope="module")
def reference(sd_weights) -> ControlLDM:
    model = build_model("control_ldm_tiny").eval()
    model.load_sd_weights(sd_weights, "sd.ckpt")
    model.init_controlnet_from_unet()
    return model


def test_configs_select_variants_of_the_tiny_and_full_models() -> None:
    base = {size: load_config(f"control_ldm{size}").params for size in ("", "_tiny")}
    for name in ABLATIONS:
        for size in ("", "_tiny"):
            cfg = load_config(f"control_ldm{size}_{name}")
            assert cfg.name == "control_ldm_ablation" and cfg.params.variant == name
            for part in ("unet_cfg", "controlnet_cfg", "vae_cfg", "clip_cfg"):
                assert cfg.params[part] == base[size][part], (name, size, part)
    with pytest.raises(ValueError, match="unknown IRControlNet variant 'nope'"):
        build_model({"name": "control_ldm_ablation",
                     "params": {**load_config("control_ldm_tiny").params, "variant": "nope"}})


@pytest.mark.parametrize("name", ABLATIONS)
def test_state_dict_differs_from_ircontrolnet_exactly_as_the_variant_says(
    name: str, reference: ControlLDM, sd_weights
) -> None:
    model = _variant(name, sd_weights)
    ours, theirs = _shapes(model.controlnet), _shapes(reference.controlnet)
    added = set(ours) - set(theirs)
    assert not set(theirs) - set(ours), "no IRControlNet key may go missing"
    if name == "controlnet":
        assert added and all(k.startswith(HINT_PREFIX) for k in added)
        assert ours[HINT_PREFIX + "0.weight"] == (8, 3, *CONV)  # takes the RGB image
        last = max(int(k.split(".")[1]) for k in added)
        assert ours[f"{HINT_PREFIX}{last}.weight"] == (32, 32, *CONV)  # -> model_channels
        assert sum(".weight" in k for k in added) == 1 + 2 * 3 + 1  # first, 3 x (conv, stride 2)
    else:
        assert not added
    changed = {k: v for k, v in ours.items() if k in theirs and theirs[k] != v}
    assert changed == EXPECTED_CHANGES[name]
    # the frozen Stable Diffusion parts are untouched: the official SD file loads as it is
    for part in ("unet", "vae", "text_encoder"):
        assert _shapes(getattr(model, part)) == _shapes(getattr(reference, part))


@pytest.mark.parametrize("name", ABLATIONS)
def test_initialisation_follows_the_variant(name: str, reference: ControlLDM, sd_weights) -> None:
    model = _variant(name, sd_weights)
    net, unet = model.controlnet.state_dict(), model.unet.state_dict()
    for key, value in net.items():
        if key.startswith(("zero_convs.", "middle_block_out.")):
            assert not value.any(), key
    copied = [k for k in net if k in unet and net[k].shape == unet[k].shape]
    assert len(copied) > 50
    if name == "random_init":  # PyTorch's init: no conv/linear weight is the UNet's
        assert not any(torch.equal(net[k], unet[k]) for k in copied if net[k].ndim > 1)
    else:
        assert all(torch.equal(net[k], unet[k]) for k in copied)
    first = net["input_blocks.0.0.weight"]
    if name in ("no_zt", "controlnet"):  # 4 input channels: a plain copy of the UNet's conv
        assert torch.equal(first, unet["input_blocks.0.0.weight"])
    if name == "controlnet":
        hint = [v for k, v in net.items() if k.startswith(HINT_PREFIX) and k.endswith("weight")]
        assert all(v.any() for v in hint[:-1]) and not hint[-1].any()  # random, zero conv last


@pytest.mark.parametrize("name", ABLATIONS)
def test_fresh_variant_leaves_unet_prediction_unchanged(name: str, sd_weights, refs) -> None:
    model = _variant(name, sd_weights)
    with torch.no_grad():
        cond = model.prepare_condition(refs["cond_img"], [""])
        eps = model(refs["x_t"], refs["t"], cond)
        unet_only = model.unet(refs["x_t"], refs["t"], cond["text"])
    assert torch.equal(eps, unet_only)
    assert_close_ref(eps, refs["unet_only_eps"], f"{name}: fresh variant eps")


def test_ircontrolnet_variant_reproduces_the_reference(parity_dir: Path, sd_weights, refs) -> None:
    """variant "ircontrolnet" runs the same numbers as ControlLDM: the injection code is right."""
    params = dict(load_config("control_ldm_tiny").params, variant="ircontrolnet")
    model = build_model({"name": "control_ldm_ablation", "params": params}).eval()
    model.load_sd_weights(sd_weights, "sd.ckpt")
    model.load_controlnet_weights(read_state_dict(parity_dir / "controlnet.pth"), "controlnet")
    with torch.no_grad():
        cond = {"text": model.encode_text([""]), "latent": refs["c_img"]}
        assert_close_ref(model(refs["x_t"], refs["t"], cond), refs["eps"], "eps")
        half = model(refs["x_t"], refs["t"], cond, control_strength=0.5)
        assert_close_ref(half, refs["eps_strength_0.5"], "eps_strength_0.5")
        with pytest.raises(ValueError, match="expects 5 control tensors"):
            unet_with_controls(model.unet, refs["x_t"], refs["t"], cond["text"], [], "skip")


@pytest.mark.parametrize("name", ABLATIONS)
def test_variant_trains_a_few_steps(name: str, sd_weights) -> None:
    """Plain eps-MSE on random latents: only the condition network moves, and it starts to act."""
    torch.manual_seed(0)
    model = _variant(name, sd_weights)
    model.freeze_sd()
    frozen = copy.deepcopy(model.unet.state_dict())
    start = copy.deepcopy(model.controlnet.state_dict())
    optimizer = torch.optim.Adam(model.controlnet.parameters(), lr=1e-3)
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        cond = model.prepare_condition(image, ["", "a photo"])
        z0 = torch.randn(2, 4, 4, 4)
    acp = torch.linspace(0.99, 0.01, 1000)
    losses = []
    for _ in range(3):
        t = torch.randint(0, 1000, (2,))
        noise = torch.randn_like(z0)
        a = acp[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(z_t, t, cond), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in model.unet.state_dict().items())
    end = model.controlnet.state_dict()
    moved = {k for k in end if not torch.equal(end[k], start[k])}
    assert {k for k in moved if k.startswith(("zero_convs.", "middle_block_out."))}
    assert any(k.startswith("input_blocks.1.") for k in moved), "gradients pass the zero convs"
    if name == "controlnet":
        assert any(k.startswith(HINT_PREFIX) for k in moved)
    with torch.no_grad():
        t = torch.tensor([500, 500])
        assert not torch.equal(model(z0, t, cond), model.unet(z0, t, cond["text"]))


def test_pixel_hint_variant_needs_the_condition_image(sd_weights) -> None:
    model = _variant("controlnet", sd_weights)
    cond = {"text": model.encode_text([""]), "latent": torch.zeros(1, 4, 4, 4)}
    with pytest.raises(ValueError, match=r"reads cond\['image'\]"):
        model(torch.zeros(1, 4, 4, 4), torch.tensor([1]), cond)


def test_gm_training_task_trains_a_variant(parity_dir: Path, tmp_path: Path) -> None:
    """The GM task of diffbir.training builds, conditions and back-propagates a variant."""
    from diffbir.training.cli import load_training_config
    from diffbir.training.gm import GenerationModuleTask

    cfg = load_training_config("gm_tiny", [
        "model.config=control_ldm_tiny_controlnet", f"model.sd_weights={parity_dir / 'sd.ckpt'}",
        "model.stage1=null", f"output_dir={tmp_path}",
    ])  # fmt: skip
    task = GenerationModuleTask(cfg)
    hq = torch.rand(2, 3, 32, 32)
    _, cond = task.condition(hq.flip(-1), ["", ""])
    assert set(cond) == {"text", "latent", "image"}
    loss = task.diffusion_loss(hq, cond, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("cldm.controlnet.") for n in grads)
    assert any(n.startswith("cldm.controlnet.input_hint_block.") for n in grads)  # in the graph
    assert grads["cldm.controlnet.zero_convs.0.0.weight"].any()  # zero convs learn first


def test_ablation_training_configs_point_at_the_variants() -> None:
    for name in ABLATIONS:
        cfg = load_config(CONFIGS / "train" / f"gm_ablation_{name}.yaml")
        assert cfg.model.config == f"control_ldm_{name}"
        assert cfg.output_dir == f"runs/gm_ablation_{name}"
        assert cfg.model.stage1 is not None
    one_stage = load_config(CONFIGS / "train" / "gm_ablation_no_rm.yaml")
    assert one_stage.model.stage1 is None and one_stage.model.config == "control_ldm"
    gm = load_config(CONFIGS / "train" / "gm.yaml")
    for name in [*ABLATIONS, "no_rm"]:
        cfg = load_config(CONFIGS / "train" / f"gm_ablation_{name}.yaml")
        assert cfg.data == gm.data and cfg.optim == gm.optim and cfg.trainer == gm.trainer


@pytest.mark.parametrize(("name", "base"), [("rm_realesrgan", "rm"),
                                            ("gm_ablation_realesrgan", "gm")])
def test_realesrgan_degradation_configs(name: str, base: str, real47_dir: Path) -> None:
    """Table 8: the paper's training configs with Real-ESRGAN's degradation swapped in; the
    training dataset builds from them and yields HQ-sized LQ from the second-order model."""
    cfg = OmegaConf.to_container(load_config(CONFIGS / "train" / f"{name}.yaml"))
    ref = OmegaConf.to_container(load_config(CONFIGS / "train" / f"{base}.yaml"))
    for split in ("train", "val"):
        params = dict(cfg["data"][split]["dataset"], source=str(real47_dir), out_size=64)
        dataset = build_paired_dataset(params, f"data.{split}.dataset", seed=3)
        assert isinstance(dataset.degradation, RealESRGANDegradation)
        item = dataset[0]
        assert item["lq"].shape == item["hq"].shape == (3, 64, 64)
        assert not torch.equal(item["lq"], item["hq"])
        degradation = cfg["data"][split]["dataset"].pop("degradation")
        ref["data"][split]["dataset"].pop("degradation")
        assert degradation == {"type": "realesrgan", "scale": 4}
    assert cfg.pop("output_dir") == f"runs/{name}"
    ref.pop("output_dir")
    if base == "gm":
        assert cfg["model"]["stage1"].pop("weights") == "runs/rm_realesrgan/export/swinir.pth"
        ref["model"]["stage1"].pop("weights")
    assert cfg == ref


def test_variants_restore_through_diffbir_infer_in_an_ablation_table(
    parity_dir: Path, real47_dir: Path, tmp_path: Path, sd_weights
) -> None:
    """Table 9 preset end to end on tiny models: diffbir-eval runs the real diffbir-infer with
    each column's variant config and weights, then scores. Fresh concat and SFT variants both
    act as the plain UNet (zero init), so their restorations, and scores, are identical."""
    import cv2

    from diffbir.checkpoint import save_state_dict
    from diffbir.evaluation import cli

    data = tmp_path / "imagenet"
    for sub in ("lq", "hq"):
        (data / sub).mkdir(parents=True)
    photo = cv2.imread(str(sorted(real47_dir.iterdir())[0]))[:32, :32]
    cv2.imwrite(str(data / "hq" / "a.png"), photo)
    cv2.imwrite(str(data / "lq" / "a.png"), cv2.GaussianBlur(photo, (0, 0), 1.5))
    overrides = [
        "inference.task=custom", "inference.restore.steps=2", "inference.restore.upscale=1",
        "inference.device=cpu", "inference.weights.cldm_config=control_ldm_tiny",
        f"inference.weights.sd={parity_dir / 'sd.ckpt'}", "inference.restore.min_side=32",
        f"columns.ircontrolnet.infer.weights.controlnet={parity_dir / 'controlnet.pth'}",
    ]
    for name in ("concat", "sft"):
        weights = tmp_path / f"{name}.pth"
        save_state_dict(_variant(name, sd_weights).controlnet.state_dict(), weights)
        overrides += [f"columns.{name}.infer.weights.cldm_config=control_ldm_tiny_{name}",
                      f"columns.{name}.infer.weights.controlnet={weights}"]
    out = tmp_path / "run"
    argv = ["--preset", "table9", "--data", f"imagenet_val={data}", "--metrics", "psnr,ssim",
            "--out", str(out), *overrides]
    assert cli.main(argv) == 0
    results = out / "results" / "imagenet_val"
    restored = {n: cv2.imread(str(results / n / "a.png"))
                for n in ("ircontrolnet", "concat", "sft")}
    assert restored["concat"].shape == photo.shape
    assert np.array_equal(restored["concat"], restored["sft"])
    assert not np.array_equal(restored["concat"], restored["ircontrolnet"])
    lines = (out / "table.md").read_text().splitlines()
    assert lines[2] == "| Methods | PSNR↑ | SSIM↑ |"
    assert [line.split("|")[1].strip() for line in lines[4:7]] == [
        "IRControlNet", "Variant 5: w/ control concat features", "Variant 6: w/ SFT modulation"]
    assert lines[5].split("|")[2:4] == lines[6].split("|")[2:4]


# Full size: where each variant's condition network departs from the official v2.pth layout
FULL_SIZE_CHANGES = {
    "controlnet": {"input_blocks.0.0.weight"},
    "no_zt": {"input_blocks.0.0.weight"},
    "random_init": set(),
    "decoder": {"zero_convs."},
    "concat": {"zero_convs."},
    "sft": {"zero_convs.", "middle_block_out."},
}


@pytest.mark.parametrize("name", ABLATIONS)
def test_full_size_variants_against_the_official_manifest(name: str, manifests_dir: Path) -> None:
    params = load_config(f"control_ldm_{name}").params
    kwargs = unet_kwargs(OmegaConf.to_container(params.controlnet_cfg), "controlnet_cfg")
    hint = params.get("hint_encoder_channels", (16, 32, 96, 256))
    with torch.device("meta"):
        net = AblationControlNet(**kwargs, variant=name, hint_encoder_channels=tuple(hint))
    ours, official = _shapes(net), read_manifest(manifests_dir / "irControlNet_v2.tsv")
    assert not set(official) - set(ours)
    added = set(ours) - set(official)
    assert all(k.startswith(HINT_PREFIX) for k in added) and bool(added) == (name == "controlnet")
    changed = {k for k in official if ours[k] != official[k]}
    assert bool(changed) == bool(FULL_SIZE_CHANGES[name])
    assert all(k.startswith(tuple(FULL_SIZE_CHANGES[name])) for k in changed), changed


def test_controlnet_variant_restores_through_the_tiled_pipeline(
    parity_dir: Path, tmp_path: Path, sd_weights
) -> None:
    """Variant 1 reads the condition image: the Restorer passes it, and tiled diffusion crops
    it at 8x the latent tile. One covering tile equals untiled; several tiles run."""
    from diffbir.checkpoint import save_state_dict
    from diffbir.pipeline import RestoreOptions, TileOptions, WeightPaths, build_restorer

    model = _variant("controlnet", sd_weights)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero hint encoder and zero convs: the image changes the result
        for name, param in model.controlnet.named_parameters():
            if name.startswith(("input_hint_block.", "zero_convs.", "middle_block_out.")):
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    weights = tmp_path / "variant1.pth"
    save_state_dict(model.controlnet.state_dict(), weights)
    restorer = build_restorer(
        "custom",
        WeightPaths(parity_dir / "sd.ckpt", weights, None),
        version="v2",
        cldm_config="control_ldm_tiny_controlnet",
        device="cpu",
    )
    lq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    opts = {"upscale": 2.0, "steps": 2, "min_side": 0}
    plain = restorer.restore(lq, [3], RestoreOptions(**opts)).samples
    covering = TileOptions(diffusion=64)
    tiled = restorer.restore(lq, [3], RestoreOptions(**opts, tiles=covering)).samples
    assert torch.equal(plain, tiled)
    several = TileOptions(diffusion=32, diffusion_stride=16)
    tiled = restorer.restore(lq, [3], RestoreOptions(**opts, tiles=several)).samples
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()
    hint = restorer.cldm.controlnet.input_hint_block[-1]
    with torch.no_grad():
        hint.weight.zero_()
        hint.bias.zero_()
    without_image = restorer.restore(lq, [3], RestoreOptions(**opts)).samples
    assert (without_image - plain).abs().max() > 1e-4
