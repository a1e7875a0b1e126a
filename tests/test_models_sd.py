"""Stable Diffusion parts and IRControlNet: official keys, parity with the reference, behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_ref, read_manifest

from diffbir.checkpoint import CheckpointError, read_state_dict, save_state_dict
from diffbir.config import build_model, load_config
from diffbir.models.control_ldm import ControlLDM


@pytest.fixture(scope="module")
def full_meta() -> ControlLDM:
    with torch.device("meta"):
        return build_model("control_ldm")


@pytest.fixture(scope="module")
def tiny(parity_dir) -> ControlLDM:
    model = build_model("control_ldm_tiny").eval()
    model.load_sd_weights(read_state_dict(parity_dir / "sd.ckpt"), "sd.ckpt")
    model.load_controlnet_weights(read_state_dict(parity_dir / "controlnet.pth"), "controlnet.pth")
    return model


def _shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_full_size_sd_keys_and_shapes(full_meta, manifests_dir):
    assert _shapes(full_meta.sd_state_dict()) == read_manifest(manifests_dir / "sd21_base.tsv")


def test_full_size_controlnet_keys_and_shapes(full_meta, manifests_dir):
    manifest = read_manifest(manifests_dir / "irControlNet_v2.tsv")
    assert _shapes(full_meta.controlnet.state_dict()) == manifest
    assert len(full_meta.controlnet.zero_convs) + 1 == 13


def test_tiny_config_matches_parity_hparams(hparams):
    assert dict(load_config("control_ldm_tiny")["params"]) == hparams["cldm"]


@torch.no_grad()
def test_text_encoder_parity(tiny, refs):
    assert_close_ref(tiny.encode_text(refs["prompts"]), refs["c_txt"], "c_txt")


@torch.no_grad()
def test_vae_parity(tiny, refs):
    assert_close_ref(tiny.vae_encode(refs["cond_img"] * 2 - 1), refs["c_img"], "c_img")
    assert_close_ref(tiny.vae_decode(refs["c_img"]), refs["vae_decoded"], "vae_decoded")
    cond = tiny.prepare_condition(refs["cond_img"], [""])
    assert_close_ref(cond["latent"], refs["c_img"], "prepare_condition latent")


@torch.no_grad()
@pytest.mark.parametrize(("strength", "key"), [(1.0, "eps"), (0.5, "eps_strength_0.5")])
def test_noise_prediction_parity(tiny, refs, strength, key):
    cond = {"text": tiny.encode_text([""]), "latent": refs["c_img"]}
    eps = tiny(refs["x_t"], refs["t"], cond, control_strength=strength)
    assert_close_ref(eps, refs[key], key)


@torch.no_grad()
def test_unet_alone_parity(tiny, refs):
    eps = tiny.unet(refs["x_t"], refs["t"], tiny.encode_text([""]))
    assert_close_ref(eps, refs["unet_only_eps"], "unet_only_eps")


@torch.no_grad()
def test_controlnet_init_from_unet_parity(tiny, refs):
    model = copy.deepcopy(tiny)
    model.init_controlnet_from_unet()
    ours, ref = model.controlnet.state_dict(), refs["controlnet_from_unet"]
    assert set(ours) == set(ref)
    for key in ref:
        assert_close_ref(ours[key], ref[key], key)


@torch.no_grad()
def test_fresh_controlnet_leaves_unet_prediction_unchanged(tiny, refs):
    model = copy.deepcopy(tiny)
    model.init_controlnet_from_unet()
    cond = {"text": model.encode_text(["a photo"]), "latent": refs["c_img"]}
    eps = model(refs["x_t"], refs["t"], cond)
    assert torch.equal(eps, model.unet(refs["x_t"], refs["t"], cond["text"]))


def test_freeze_sd_leaves_only_controlnet_trainable(tiny):
    model = copy.deepcopy(tiny)
    model.freeze_sd()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"controlnet"}
    assert not model.unet.training and not model.vae.training and not model.text_encoder.training


def test_gradient_checkpointing_gives_same_gradients(tiny, refs):
    model = copy.deepcopy(tiny)
    model.freeze_sd()
    model.controlnet.train()
    cond = {"text": model.encode_text([""]).detach(), "latent": refs["c_img"]}

    def grads(enabled: bool) -> list[torch.Tensor]:
        model.set_gradient_checkpointing(enabled)
        model.controlnet.zero_grad()
        model(refs["x_t"], refs["t"], cond).square().mean().backward()
        return [p.grad.clone() for p in model.controlnet.parameters()]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_attention_uses_scaled_dot_product_attention(tiny, refs, monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    with torch.no_grad():
        cond = {"text": tiny.encode_text([""]), "latent": refs["c_img"]}
        monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
        tiny(refs["x_t"], refs["t"], cond)
    # every UNet/ControlNet transformer block: one self and one cross attention
    sites = sum(1 for _ in tiny.modules() if type(_).__name__ == "TransformerBlock")
    assert len(calls) == 2 * sites


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_is_close(tiny, refs, dtype):
    model = copy.deepcopy(tiny).to(dtype)
    cond = {"text": model.encode_text([""]), "latent": refs["c_img"].to(dtype)}
    eps = model(refs["x_t"].to(dtype), refs["t"], cond)
    assert eps.dtype == dtype
    assert (eps.float() - refs["eps"]).abs().max() < 0.05 * refs["eps"].abs().max()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_controlnet_export_round_trip(tiny, tmp_path, suffix, manifests_dir):
    path = tmp_path / f"controlnet{suffix}"
    save_state_dict(tiny.controlnet.state_dict(), path)
    loaded = read_state_dict(path)
    assert set(loaded) == set(tiny.controlnet.state_dict())  # flat, no prefix: the v2.pth format
    other = build_model("control_ldm_tiny")
    other.load_controlnet_weights(loaded, str(path))
    for key, value in tiny.controlnet.state_dict().items():
        assert torch.equal(other.controlnet.state_dict()[key], value)


def test_wrong_sd_file_is_reported(parity_dir, tmp_path):
    sd = read_state_dict(parity_dir / "sd.ckpt")
    sd.pop("model.diffusion_model.out.2.weight")
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    model = build_model("control_ldm_tiny")
    with pytest.raises(CheckpointError) as err:
        model.load_sd_weights(sd, "my_sd.ckpt")
    message = str(err.value)
    assert "my_sd.ckpt" in message and "out.2.weight" in message and "extra.weight" in message
    with pytest.raises(ValueError, match="no 'model.diffusion_model"):
        model.load_sd_weights(read_state_dict(parity_dir / "controlnet.pth"), "controlnet.pth")


def test_unsupported_architecture_option_is_rejected(hparams):
    params = copy.deepcopy(hparams["cldm"])
    params["unet_cfg"]["legacy"] = True
    with pytest.raises(ValueError, match="unet_cfg.legacy"):
        ControlLDM(**params)
