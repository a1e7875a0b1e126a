"""The restoration pipeline: image I/O, tiling, colour fix, size rules, seeds and memory bound."""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffbir.models.norm import GroupNorm32
from diffbir.pipeline.cleaner import target_size
from diffbir.pipeline.codec import latent_size
from diffbir.pipeline.color import adain, color_fix, wavelet
from diffbir.pipeline.device import cpu_has_fast_half
from diffbir.pipeline.image_io import ImageReadError, list_inputs, read_image, write_png
from diffbir.pipeline.loading import WeightPaths, build_restorer
from diffbir.pipeline.options import GuidanceOptions, RestoreOptions, TileOptions
from diffbir.pipeline.precision import part_dtype
from diffbir.pipeline.resize import short_side_size
from diffbir.pipeline.tiling import (
    TiledModel,
    gaussian_weight,
    run_tiled,
    tile_boxes,
    tile_starts,
)

# ---------------------------------------------------------------- image I/O


def _save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    Image.fromarray(arr).save(path, **kwargs)
    return path


def test_read_image_formats(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = read_image(_save(tmp_path / "rgb.png", rgb))
    assert img.dtype == np.float32 and img.shape == (6, 8, 3)
    np.testing.assert_allclose(img, rgb / 255.0, atol=1e-6)

    gray = read_image(_save(tmp_path / "gray.png", rgb[..., 0]))
    assert gray.shape == (6, 8, 3) and np.allclose(gray[..., 0], gray[..., 2])

    rgba = np.concatenate([rgb, np.full((6, 8, 1), 7, np.uint8)], axis=2)
    np.testing.assert_allclose(read_image(_save(tmp_path / "a.png", rgba)), rgb / 255.0, atol=1e-6)

    deep = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "g16.png")
    img16 = read_image(tmp_path / "g16.png")
    np.testing.assert_allclose(img16[..., 1], deep / 65535.0, atol=1e-6)

    rgb16 = np.random.default_rng(1).integers(0, 65536, (6, 8, 4), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgb16)  # BGRA
    np.testing.assert_allclose(
        read_image(tmp_path / "rgba16.png"), rgb16[..., 2::-1] / 65535.0, atol=1e-6
    )


def test_read_image_exif_rotation(tmp_path: Path) -> None:
    arr = np.zeros((4, 10, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "rot.jpg").shape == (10, 4, 3)


def test_read_image_bad_files(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.jpg", np.full((64, 64, 3), 128, np.uint8), quality=90)
    cases = {
        "empty.png": (b"", "empty"),
        "text.png": (b"this is not an image", "not a recognised image"),
        "cut.jpg": (good.read_bytes()[: good.stat().st_size // 2], "truncated"),
        "anim.gif": (b"GIF89a....", "unsupported"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        assert reason in info.value.reason, (name, info.value.reason)


def test_list_inputs_and_atomic_write(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.png", "notes.txt", ".hidden.png", "x.gif"):
        (tmp_path / name).write_bytes(b"x")
    found, ignored = list_inputs(tmp_path)
    assert [p.name for p in found] == ["a.JPG", "b.png", "x.gif"]
    # every entry is accounted for: hidden files and (without recursion) subfolders too
    assert [p.name for p in ignored] == [".hidden.png", "notes.txt", "sub"]
    found, ignored = list_inputs(tmp_path, recursive=True)
    assert "c.png" in [p.name for p in found]
    assert [p.name for p in ignored] == [".hidden.png", "notes.txt"]
    with pytest.raises(FileNotFoundError, match="--input"):
        list_inputs(tmp_path / "nope")

    out = write_png(tmp_path / "o" / "r.png", torch.rand(1, 3, 5, 7))
    assert read_image(out).shape == (5, 7, 3)
    assert [p.name for p in out.parent.iterdir()] == ["r.png"]  # no temporary left


# ---------------------------------------------------------------- tiling, colour, sizes


def test_tile_boxes_cover_and_weights() -> None:
    assert tile_starts(10, 16, 8) == [0]
    assert tile_starts(40, 16, 8) == [0, 8, 16, 24]
    assert tile_starts(41, 16, 12) == [0, 12, 24, 25]
    cover = torch.zeros(37, 50)
    for y0, y1, x0, x1 in tile_boxes(37, 50, 16, 12):
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    w = gaussian_weight(9, 16)
    assert w.min() > 0 and w.max() <= 1
    with pytest.raises(ValueError, match="stride"):
        tile_starts(40, 8, 16)


def test_run_tiled_matches_untiled_for_local_function() -> None:
    x = torch.rand(2, 3, 40, 56)

    def up(t: torch.Tensor) -> torch.Tensor:  # pointwise + x4 nearest: tiles cannot disagree
        return torch.nn.functional.interpolate(t * 2 + 1, scale_factor=4, mode="nearest")

    torch.testing.assert_close(run_tiled(up, x, 16, 8), up(x), rtol=0, atol=1e-5)

    def down(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(t, 8)

    torch.testing.assert_close(run_tiled(down, x, 16, 8, align=8), down(x), rtol=0, atol=1e-5)


def test_tiled_model_blends_exactly_and_builds_its_layout_once() -> None:
    """A pointwise model is unchanged by tiling; the boxes and Gaussian weights of a latent
    size are built at the first step and reused by the following ones."""
    calls = []

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        calls.append(tuple(x.shape[-2:]))
        assert cond["latent"].shape[-2:] == x.shape[-2:]
        assert cond["image"].shape[-2:] == (8 * x.shape[-2], 8 * x.shape[-1])
        return torch.tanh(x) * cond["latent"] + cond["text"].mean()

    x = torch.randn(1, 4, 12, 20)
    cond = {
        "latent": torch.randn(1, 4, 12, 20),
        "image": torch.rand(1, 3, 96, 160),
        "text": torch.randn(1, 7, 16),
    }
    tiled = TiledModel(model_fn, tile=8, stride=4)
    first, second = tiled(x, torch.zeros(1), cond), tiled(x, torch.zeros(1), cond)
    whole = torch.tanh(x) * cond["latent"] + cond["text"].mean()
    torch.testing.assert_close(first, whole, atol=1e-6, rtol=1e-6)
    assert torch.equal(first, second) and len(tiled._layouts) == 1
    assert len(calls) == 2 * 2 * 4 and set(calls) == {(8, 8)}


def test_shared_groupnorm_statistics_make_tiles_agree() -> None:
    """A GroupNorm + pointwise model differs per tile only through the statistics: with them
    shared, the tiled output equals the untiled one; with per-tile statistics it does not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(GroupNorm32(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1))
    ramp = torch.linspace(-2, 3, 40).view(1, 1, 1, 40)
    x = torch.randn(2, 8, 24, 40) + ramp  # statistics change across the image
    with torch.no_grad():
        whole = model(x)
        per_tile = run_tiled(model, x, 16, 12)
        shared = run_tiled(model, x, 16, 12, shared_norms=model)
        assert torch.equal(run_tiled(model, x, 40, shared_norms=model), whole.float())
    assert (per_tile - whole).abs().max() > 0.1
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    assert model[0].shared_stats is None  # the context is left


def test_shared_statistics_bring_the_tiled_vae_encoder_closer(
    parity_dir: Path, real47_dir: Path
) -> None:
    """On real photos, a tiled VAE encoding with whole-image GroupNorm statistics is closer to
    the untiled one than with per-tile statistics (the default of --vae-shared-norm)."""
    from diffbir.checkpoint import read_state_dict
    from diffbir.config import build_model

    cldm = build_model("control_ldm_tiny").eval()
    cldm.load_sd_weights(read_state_dict(parity_dir / "sd.ckpt"), "sd.ckpt")
    errors = {"per_tile": 0.0, "shared": 0.0}
    for path in sorted(real47_dir.iterdir())[:3]:
        img = cv2.resize(read_image(path), (192, 128), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1
        with torch.no_grad():
            whole = cldm.vae_encode(x)
            per_tile = run_tiled(cldm.vae_encode, x, 64, 48, align=8)
            shared = run_tiled(cldm.vae_encode, x, 64, 48, 8, shared_norms=cldm.vae.encoder)
        errors["per_tile"] += (per_tile - whole).abs().mean().item()
        errors["shared"] += (shared - whole).abs().mean().item()
    assert errors["shared"] < 0.9 * errors["per_tile"]
    assert TileOptions().vae_shared_norm == "encoder"
    with pytest.raises(ValueError, match="--vae-shared-norm"):
        TileOptions(vae_shared_norm="all")


def test_color_fix() -> None:
    gen = torch.Generator().manual_seed(0)
    content, style = (
        torch.rand(1, 3, 32, 32, generator=gen),
        torch.rand(1, 3, 32, 32, generator=gen),
    )
    torch.testing.assert_close(wavelet(content, content), content, atol=1e-5, rtol=0)
    out = adain(content, style * 0.5 + 0.2)
    torch.testing.assert_close(out.mean(dim=(2, 3)), (style * 0.5 + 0.2).mean(dim=(2, 3)))
    assert color_fix(content, style, "none") is content
    with pytest.raises(ValueError, match="color fix"):
        color_fix(content, style, "hsv")


def test_size_rules() -> None:
    """Official sizes: truncated, never rounded; padding to 64 (8 when tiled) then to 8 latents."""
    assert target_size(30, 41, 4) == (120, 164)
    assert target_size(30, 41, 1.55) == (46, 63)  # 46.5 and 63.55
    assert short_side_size(144, 208, 512) == (512, 739)  # a 36x52 input at x4: 739.56
    assert short_side_size(600, 300, 512) == (1024, 512)
    assert latent_size(512, 614, TileOptions()) == (64, 80)
    assert latent_size(512, 614, TileOptions(diffusion=256)) == (64, 77)
    assert latent_size(512, 614, TileOptions(vae_encoder=256)) == (64, 80)  # latent padded
    assert latent_size(512, 614, TileOptions(vae_encoder=256), sampled=False) == (64, 77)
    with pytest.raises(ValueError, match="multiple of 8"):
        TileOptions(diffusion=100)
    with pytest.raises(ValueError, match="--g-loss"):
        GuidanceOptions(loss="l1")


# ---------------------------------------------------------------- the restorer (tiny models)


@pytest.fixture(scope="module")
def restorer(parity_dir: Path):
    torch.manual_seed(0)
    paths = WeightPaths(
        parity_dir / "sd.ckpt", parity_dir / "controlnet.pth", parity_dir / "bsrnet.pth"
    )
    return build_restorer(
        "sr",
        paths,
        version="v2",
        cldm_config="control_ldm_tiny",
        stage1_config="bsrnet_tiny",
        device="cpu",
    )


def _opts(**kwargs) -> RestoreOptions:
    base = {"upscale": 2.0, "steps": 3, "min_side": 0, "cfg_scale": 3.0}
    return RestoreOptions(**{**base, **kwargs})


def test_restore_shapes_seeds_and_samples(restorer) -> None:
    lq = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    opts = _opts(min_side=64, color_fix="wavelet")
    result = restorer.restore(lq, [[5, 6], [7, 8]], opts)
    assert result.condition.shape == (2, 3, 40, 56)
    assert result.samples.shape == (2, 2, 3, 40, 56)
    assert 0 <= result.samples.min() and result.samples.max() <= 1
    assert not torch.equal(result.samples[0, 0], result.samples[0, 1])  # distinct seeds
    again = restorer.restore(lq[1:], [7], opts)  # another batch, one sample: same result
    torch.testing.assert_close(again.images[0], result.samples[1, 0], atol=1e-5, rtol=0)


def test_tiled_equals_untiled_when_one_tile_covers(restorer) -> None:
    lq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    guidance = GuidanceOptions(scale=0.5, space="rgb", loss="w_mse")
    plain = restorer.restore(lq, [[3]], _opts(guidance=guidance))
    tiles = TileOptions(stage1=32, vae_encoder=64, vae_decoder=64, diffusion=64)
    tiled = restorer.restore(lq, [[3]], _opts(guidance=guidance, tiles=tiles))
    assert torch.equal(plain.condition, tiled.condition)
    assert torch.equal(plain.samples, tiled.samples)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_restoration_is_close_to_fp32(
    restorer, parity_dir: Path, precision: str
) -> None:
    """The whole pipeline (stage 1, tiled VAE and diffusion, guidance, CFG) in bf16/fp16:
    weights in that dtype, the sampler state and the outputs in float32, close to fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = build_restorer(
            "sr",
            WeightPaths(
                parity_dir / "sd.ckpt", parity_dir / "controlnet.pth", parity_dir / "bsrnet.pth"
            ),
            cldm_config="control_ldm_tiny",
            version="v2",
            stage1_config="bsrnet_tiny",
            device="cpu",
            precision=precision,
        )
    slow = [w for w in caught if f"no native {precision} support" in str(w.message)]
    assert len(slow) == (0 if cpu_has_fast_half(dtype) else 1)
    for name, part in half.cldm.named_children():  # the precision policy
        assert {p.dtype for p in part.parameters()} == {part_dtype(name, dtype)}, name
    lq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tiles = TileOptions(stage1=24, vae_encoder=48, vae_decoder=48, diffusion=48)
    opts = _opts(guidance=GuidanceOptions(scale=0.5), tiles=tiles)
    ref, out = restorer.restore(lq, [[3]], opts), half.restore(lq, [[3]], opts)
    assert out.samples.dtype == out.condition.dtype == torch.float32
    for a, b in ((out.condition, ref.condition), (out.samples, ref.samples)):
        assert (a - b).abs().max() < 0.05 and (a - b).abs().mean() < 0.005


def test_tiled_guidance_has_an_effect(restorer) -> None:
    lq = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(3))
    tiles = TileOptions(stage1=16, vae_encoder=32, vae_decoder=32, diffusion=32)
    off = restorer.restore(lq, [[4]], _opts(tiles=tiles))
    on = restorer.restore(
        lq, [[4]], _opts(tiles=tiles, guidance=GuidanceOptions(scale=1.0, space="latent"))
    )
    assert off.samples.shape == on.samples.shape == (1, 1, 3, 48, 64)
    assert torch.isfinite(on.samples).all()
    assert (on.samples - off.samples).abs().max() > 1e-3


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live storages created by torch ops while active (kernel scratch excluded).

    Each op output's storage is counted once while any tensor returned by an op still holds it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0:
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.current += self.live[key][0]
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out


def _peak_bytes(restorer, lq: torch.Tensor, opts: RestoreOptions) -> int:
    with PeakTensorBytes() as tracker:
        restorer.restore(lq, [[0]], opts)
    return tracker.peak


def test_tiled_memory_is_bounded_by_the_tile(restorer) -> None:
    """Bound: a tiled run (tile T) on an image of 4x the tile area peaks at most 1.5x the peak of
    an untiled run on a one-tile image, while the untiled run on the large image needs > 2.5x."""
    tile = 64  # output pixels; the stage-1 tile is in input pixels (BSRNet x4 then /2)
    tiles = TileOptions(stage1=tile // 2, vae_encoder=tile, vae_decoder=tile, diffusion=tile)
    opts = _opts(steps=2, guidance=GuidanceOptions(scale=0.5))
    small = torch.rand(1, 3, tile // 2, tile // 2)
    large = torch.rand(1, 3, tile, tile)  # output 2*tile x 2*tile = 4 tile areas
    one_tile = _peak_bytes(restorer, small, opts)
    tiled = _peak_bytes(restorer, large, RestoreOptions(**{**opts.__dict__, "tiles": tiles}))
    untiled = _peak_bytes(restorer, large, opts)
    assert untiled > 2.5 * one_tile, (untiled, one_tile)
    assert tiled <= 1.5 * one_tile, (tiled, one_tile)


@pytest.mark.parametrize(
    ("task", "config", "file"),
    [("face", "swinir_tiny", "swinir.ckpt"), ("denoise", "scunet_tiny", "scunet.pth")],
)
def test_stage1_of_same_size_tasks(parity_dir: Path, task: str, config: str, file: str) -> None:
    """SwinIR (zero-padded to its size_multiple 64 by the caller) and SCUNet keep the size; the
    input is resized first."""
    paths = WeightPaths(parity_dir / "sd.ckpt", parity_dir / "controlnet.pth", parity_dir / file)
    restorer = build_restorer(
        task,
        paths,
        version="v2",
        cldm_config="control_ldm_tiny",
        stage1_config=config,
        device="cpu",
    )
    lq = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(5))
    out = restorer.condition(lq, _opts(upscale=1.5))
    assert out.shape == (1, 3, 30, 42) and torch.isfinite(out).all()
    assert getattr(restorer.cleaner.model, "size_multiple", 1) == (64 if task == "face" else 1)
