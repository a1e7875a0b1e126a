"""Stage-1 networks (SwinIR, BSRNet, SCUNet): official key layout and parity with the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_close_ref, read_manifest

from diffbir.checkpoint import load_weights, read_state_dict
from diffbir.config import build_model, load_config

# (config name, manifest, parity file, refs prefix)
MODELS = [
    ("swinir", "swinir_general.tsv", "swinir.ckpt", "swinir"),
    ("bsrnet", "bsrnet.tsv", "bsrnet.pth", "bsrnet"),
    ("scunet", "scunet_psnr.tsv", "scunet.pth", "scunet"),
]


def _tiny(name: str, parity_dir: Path, drop: tuple[str, ...] = ()) -> torch.nn.Module:
    file = next(f for n, _, f, _ in MODELS if n == name)
    model = build_model(load_config(f"{name}_tiny")).eval()
    sd = read_state_dict(parity_dir / file)
    sd = {k: v for k, v in sd.items() if not k.endswith(drop)} if drop else sd
    load_weights(model, sd, str(parity_dir / file))
    return model


@pytest.mark.parametrize(("name", "manifest"), [(m[0], m[1]) for m in MODELS])
def test_full_size_keys_match_manifest(name: str, manifest: str, manifests_dir: Path) -> None:
    with torch.device("meta"):
        model = build_model(load_config(name))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = read_manifest(manifests_dir / manifest)
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_tiny_config_matches_hparams(name: str, hparams: dict) -> None:
    assert dict(load_config(f"{name}_tiny").params) == hparams[name]


@pytest.mark.parametrize(("name", "prefix"), [(m[0], m[3]) for m in MODELS])
def test_parity(name: str, prefix: str, parity_dir: Path, refs: dict) -> None:
    model = _tiny(name, parity_dir)
    with torch.no_grad():
        out = model(refs[f"{prefix}_in"])
    assert_close_ref(out, refs[f"{prefix}_out"], name)


def test_swinir_loads_without_derived_buffers(parity_dir: Path, refs: dict) -> None:
    buffers = ("attn_mask", "relative_position_index")
    model = _tiny("swinir", parity_dir, drop=buffers)
    stored = {
        k: v for k, v in read_state_dict(parity_dir / "swinir.ckpt").items() if k.endswith(buffers)
    }
    ours = model.state_dict()
    assert stored and all(torch.equal(ours[k], v) for k, v in stored.items())
    with torch.no_grad():
        out = model(refs["swinir_in"])
    assert_close_ref(out, refs["swinir_out"], "swinir without buffers")


def test_swinir_other_sizes(parity_dir: Path, refs: dict) -> None:
    model = _tiny("swinir", parity_dir)
    x = refs["swinir_in"]
    with torch.no_grad():
        # the full img_size (64 -> 512 px input) uses the stored mask; others compute their own
        big = model(torch.rand(1, 3, 512, 512))
        small = model(x[..., :64, :64])
        odd = model(x[..., :, :100])
        wide = model(torch.cat([x, x.flip(-1)], dim=-1))
    assert big.shape == (1, 3, 512, 512)
    assert small.shape == (1, 3, 64, 64)
    assert odd.shape == (1, 3, 64, 100)
    assert wide.shape == (1, 3, 64, 256)
    assert torch.isfinite(wide).all()


def test_bsrnet_and_scunet_sizes(parity_dir: Path) -> None:
    x = torch.rand(1, 3, 30, 70)
    with torch.no_grad():
        assert _tiny("bsrnet", parity_dir)(x).shape == (1, 3, 120, 280)
        assert _tiny("scunet", parity_dir)(x).shape == (1, 3, 30, 70)


def test_swinir_rejects_unknown_upsampler() -> None:
    with pytest.raises(ValueError, match="upsampler"):
        build_model(load_config("swinir_tiny", overrides=["params.upsampler=pixelshuffle"]))


def test_config_overrides_apply_in_order_and_errors_name_the_bad_one() -> None:
    cfg = load_config("swinir_tiny", ["params.embed_dim=24", "params.embed_dim=12"])
    assert cfg.params.embed_dim == 12
    with pytest.raises(ValueError) as info:
        load_config("swinir_tiny", ["params.embed_dim=24", "params.embeddim=8", "name=x"])
    message = str(info.value)
    assert "'params.embeddim=8'" in message and "embed_dim=24" not in message
    assert "\n" not in message
