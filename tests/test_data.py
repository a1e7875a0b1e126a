"""Tests for diffbir.data: degradations, the training dataset and the benchmark writer."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffbir.data.datasets import PairedDegradationDataset
from diffbir.data.degradation import FirstOrderDegradation, FirstOrderParams, build_degradation
from diffbir.data.make_benchmark import main as make_benchmark
from diffbir.data.operations import (
    add_gaussian_noise,
    gaussian_kernel,
    generalized_gaussian_kernel,
    jpeg_compress,
    plateau_kernel,
    sinc_kernel,
)
from diffbir.data.realesrgan import RealESRGANDegradation


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.random((height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    img += 0.1 * rng.standard_normal((height, width, 3)).astype(np.float32)
    return np.clip(img, 0, 1)


def _write(path: Path, height: int, width: int, seed: int = 0) -> np.ndarray:
    img = (_textured(height, width, seed) * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img[..., ::-1])
    return img.astype(np.float32) / 255.0


# ------------------------------------------------------------------------------- degradations


def test_first_order_repeats_for_seed_and_differs_for_other_seed():
    hq = _textured(96, 80)
    deg = FirstOrderDegradation()
    a = deg.degrade(hq, np.random.default_rng(7))
    b = deg.degrade(hq, np.random.default_rng(7))
    c = deg.degrade(hq, np.random.default_rng(8))
    assert a.shape == hq.shape and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_sampled_params_stay_in_configured_ranges():
    deg = FirstOrderDegradation()
    rng = np.random.default_rng(0)
    draws = [deg.sample_params(rng) for _ in range(3000)]
    sigmas = np.array([[p.sigma_x, p.sigma_y] for p in draws])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 12
    r = np.array([p.downsample for p in draws])
    assert r.min() >= 1 and r.max() <= 12 and r.max() > 11 and r.min() < 1.1
    noise = np.array([p.noise_sigma for p in draws])
    assert noise.min() >= 0 and noise.max() <= 15
    q = np.array([p.jpeg_quality for p in draws])
    assert q.min() == 30 and q.max() == 100
    rot = np.array([p.rotation for p in draws])
    assert rot.min() >= -math.pi and rot.max() <= math.pi
    kinds = [p.kernel_type for p in draws]
    assert 0.4 < kinds.count("iso") / len(kinds) < 0.6
    assert all(p.sigma_x == p.sigma_y and p.rotation == 0 for p in draws if p.kernel_type == "iso")
    assert {p.downsample_interpolation for p in draws} == {"area", "linear", "cubic"}

    narrow = FirstOrderDegradation.from_config(
        {"sigma_range": [2, 3], "downsample_range": [4, 4], "jpeg_range": [50, 60]}
    )
    for p in (narrow.sample_params(rng) for _ in range(500)):
        assert 2 <= p.sigma_x <= 3 and p.downsample == 4 and 50 <= p.jpeg_quality <= 60


def test_config_construction_and_validation():
    node = OmegaConf.create(
        {"kernel_size": 21, "noise_range": [0, 5], "kernel_types": ["iso"], "kernel_probs": [1.0]}
    )
    deg = FirstOrderDegradation.from_config(node)
    assert deg.kernel_size == 21 and deg.noise_range == [0, 5] and deg.kernel_types == ["iso"]
    assert FirstOrderDegradation.from_config(None) == FirstOrderDegradation()
    with pytest.raises(ValueError, match="sigma_rnage"):
        FirstOrderDegradation.from_config({"sigma_rnage": [1, 2]})
    with pytest.raises(ValueError, match="jpeg_range"):
        FirstOrderDegradation(jpeg_range=[30, 120])
    with pytest.raises(ValueError, match="kernel_size"):
        FirstOrderDegradation(kernel_size=40)
    assert RealESRGANDegradation.from_config({"scale": 2}).scale == 2


def test_kernels_normalised_and_shaped():
    iso = gaussian_kernel(41, 3.0)
    assert iso.shape == (41, 41) and abs(iso.sum() - 1) < 1e-5
    x = np.arange(-20, 21)
    g = np.exp(-(x**2) / (2 * 3.0**2))
    np.testing.assert_allclose(iso, np.outer(g, g) / np.outer(g, g).sum(), atol=1e-7)
    np.testing.assert_allclose(iso, iso.T, atol=1e-8)

    aniso = gaussian_kernel(41, 1.0, 6.0, rotation=0.0)
    assert abs(aniso.sum() - 1) < 1e-5
    xx, yy = np.meshgrid(x, x)
    var_x, var_y = (aniso * xx**2).sum(), (aniso * yy**2).sum()
    assert var_y > 10 * var_x  # sigma_y is the vertical axis here
    rotated = gaussian_kernel(41, 1.0, 6.0, rotation=math.pi / 2)
    np.testing.assert_allclose(rotated, aniso.T, atol=1e-6)
    for kernel in (
        generalized_gaussian_kernel(21, 2.0, 3.0, 0.3, 1.5),
        plateau_kernel(21, 2.0, 3.0, 0.3, 1.5),
        sinc_kernel(21, math.pi / 2),
    ):
        assert kernel.shape == (21, 21) and abs(kernel.sum() - 1) < 1e-5


def test_noise_and_jpeg_effects():
    flat = np.full((256, 256, 3), 0.5, np.float32)
    noisy = add_gaussian_noise(flat, 10.0, np.random.default_rng(0))
    assert abs(noisy.std() - 10 / 255) < 0.02 * 10 / 255
    assert abs(noisy.mean() - 0.5) < 1e-3

    # Whole pipeline without blur/resize/compression loss: noise survives at about delta/255.
    deg = FirstOrderDegradation()
    params = FirstOrderParams("iso", 0.1, 0.1, 0.0, 1.0, "area", 10.0, 100)
    lq = deg.apply(flat, params, np.random.default_rng(0))
    assert 0.5 * 10 / 255 < lq.std() < 1.1 * 10 / 255
    clean = deg.apply(flat, FirstOrderParams("iso", 0.1, 0.1, 0.0, 1.0, "area", 0.0, 100), None)
    assert np.abs(clean - 0.5).max() < 2 / 255

    img = _textured(128, 128)
    errors = [np.abs(jpeg_compress(img, q) - img).mean() for q in (30, 60, 95)]
    assert errors[0] > errors[1] > errors[2] > 0
    bgr = (img * 255).round().astype(np.uint8)[..., ::-1]
    _, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 30])
    expected = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255
    np.testing.assert_array_equal(jpeg_compress(img, 30), expected)


def test_downsample_removes_detail():
    img = _textured(128, 128)
    deg = FirstOrderDegradation()
    mild = deg.apply(img, FirstOrderParams("iso", 0.1, 0.1, 0.0, 1.0, "area", 0.0, 100), None)
    strong = deg.apply(img, FirstOrderParams("iso", 0.1, 0.1, 0.0, 8.0, "area", 0.0, 100), None)
    assert np.abs(strong - img).mean() > 3 * np.abs(mild - img).mean()


def test_realesrgan_shape_and_repeatability():
    hq = _textured(64, 48)
    deg = RealESRGANDegradation()
    a = deg.degrade(hq, np.random.default_rng(3))
    assert a.shape == (16, 12, 3) and a.dtype == np.float32
    assert np.array_equal(a, deg.degrade(hq, np.random.default_rng(3)))
    assert not np.array_equal(a, deg.degrade(hq, np.random.default_rng(4)))
    with pytest.raises(ValueError, match="divisible"):
        deg.degrade(_textured(62, 48), np.random.default_rng(0))


# ------------------------------------------------------------------------------------ dataset


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _write(root / "a.png", 80, 96, seed=1)
    _write(root / "sub" / "b.jpg", 72, 72, seed=2)
    _write(root / "c.png", 40, 30, seed=3)  # smaller than the crop: resized up
    (root / "a.txt").write_text("a red thing\n")
    (root / "notes.md").write_text("not an image")
    return root


def test_dataset_from_folder(image_folder: Path):
    ds = PairedDegradationDataset(image_folder, out_size=64, seed=5)
    assert len(ds) == 3
    for i in range(len(ds)):
        item = ds[i]
        assert item["hq"].shape == (3, 64, 64) and item["lq"].shape == (3, 64, 64)
        assert item["hq"].dtype == torch.float32 and item["lq"].dtype == torch.float32
        assert 0 <= item["hq"].min() and item["hq"].max() <= 1
        assert 0 <= item["lq"].min() and item["lq"].max() <= 1
    names = [p.name for p, _ in ds.entries]
    assert names == ["a.png", "c.png", "b.jpg"]
    assert ds[0]["prompt"] == "a red thing" and ds[1]["prompt"] == ""

    again = PairedDegradationDataset(image_folder, out_size=64, seed=5)
    assert torch.equal(ds[0]["lq"], again[0]["lq"]) and torch.equal(ds[0]["hq"], again[0]["hq"])
    other = PairedDegradationDataset(image_folder, out_size=64, seed=6)
    assert not torch.equal(ds[0]["lq"], other[0]["lq"])
    first = ds[0]["lq"]
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["lq"])
    ds.set_epoch(0)
    assert torch.equal(first, ds[0]["lq"])


def test_center_crop_matches_image(tmp_path: Path):
    img = _write(tmp_path / "x.png", 80, 100, seed=4)
    ds = PairedDegradationDataset(tmp_path, out_size=48, crop="center", flip=False)
    hq = ds[0]["hq"].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(hq, img[16:64, 26:74], atol=1e-6)


def test_dataset_from_file_list_with_captions(tmp_path: Path, real47_dir: Path):
    _write(tmp_path / "data" / "one.png", 64, 64, seed=1)
    _write(tmp_path / "data" / "two.png", 64, 64, seed=2)
    real = sorted(real47_dir.glob("*.jpg"))[0]
    listing = tmp_path / "data" / "train.tsv"
    listing.write_text(f"one.png\ta cat\n\ntwo.png\n{real}\tan old photo\n")
    ds = PairedDegradationDataset(listing, out_size=32)
    assert [e[0] for e in ds.entries] == [
        tmp_path / "data" / "one.png",
        tmp_path / "data" / "two.png",
        real,
    ]
    assert [ds[i]["prompt"] for i in range(3)] == ["a cat", "", "an old photo"]
    assert ds[2]["hq"].shape == (3, 32, 32)

    dropped = PairedDegradationDataset(listing, out_size=32, prompt_dropout=1.0)
    assert [dropped[i]["prompt"] for i in range(3)] == ["", "", ""]
    half = PairedDegradationDataset(listing, out_size=32, prompt_dropout=0.5)
    prompts = []
    for epoch in range(20):
        half.set_epoch(epoch)
        prompts.append(half[0]["prompt"])
    assert 3 <= prompts.count("") <= 17 and "a cat" in prompts


def test_bad_file_is_skipped_and_counted(tmp_path: Path, caplog):
    _write(tmp_path / "a.png", 40, 40, seed=1)
    (tmp_path / "b.png").write_bytes(b"not a png")
    _write(tmp_path / "c.png", 40, 40, seed=3)
    ds = PairedDegradationDataset(tmp_path, out_size=32, flip=False, crop="center")
    with caplog.at_level(logging.WARNING, logger="diffbir.data.datasets"):
        item = ds[1]
    assert ds.skipped_files == 1
    assert any(str(tmp_path / "b.png") in rec.getMessage() for rec in caplog.records)
    replacement = PairedDegradationDataset(tmp_path, out_size=32, flip=False, crop="center")[2]
    assert torch.equal(item["hq"], replacement["hq"])  # deterministically the next file
    assert torch.equal(ds[1]["hq"], item["hq"]) and ds.skipped_files == 2


def test_construction_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PairedDegradationDataset(tmp_path / "missing.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty dataset"):
        PairedDegradationDataset(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    with pytest.raises(ValueError, match="empty dataset.*blank.txt"):
        PairedDegradationDataset(blank)
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="bad.txt"):
        PairedDegradationDataset(binary)
    with pytest.raises(ValueError, match="crop"):
        PairedDegradationDataset(blank, crop="middle")


# ---------------------------------------------------------------------------------- benchmark


def _read_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_make_benchmark_repeats_and_scales(tmp_path: Path):
    src = tmp_path / "in"
    _write(src / "x.png", 70, 90, seed=1)
    _write(src / "y.png", 64, 64, seed=2)
    _write(src / "tiny.png", 20, 20, seed=3)  # smaller than the crop: skipped
    args = ["--input", str(src), "--crop", "64", "--scale", "4", "--seed", "3"]
    assert make_benchmark([*args, "--output", str(tmp_path / "o1")]) == 0
    make_benchmark([*args, "--output", str(tmp_path / "o2")])
    first, second = _read_bytes(tmp_path / "o1"), _read_bytes(tmp_path / "o2")
    assert sorted(first) == ["hq/x.png", "hq/y.png", "lq/x.png", "lq/y.png"]
    assert first == second
    lq = cv2.imread(str(tmp_path / "o1" / "lq" / "x.png"))
    hq = cv2.imread(str(tmp_path / "o1" / "hq" / "x.png"))
    assert hq.shape == (64, 64, 3) and lq.shape == (16, 16, 3)
    assert not list((tmp_path / "o1").rglob("*.tmp"))

    # Per-image RNG depends on (seed, name) only: a subset gives the same bytes.
    (src / "x.png").unlink()
    make_benchmark([*args, "--output", str(tmp_path / "o3")])
    assert _read_bytes(tmp_path / "o3")["lq/y.png"] == first["lq/y.png"]
    make_benchmark([*args[:-1], "4", "--output", str(tmp_path / "o4")])
    assert _read_bytes(tmp_path / "o4")["lq/y.png"] != first["lq/y.png"]

    make_benchmark(
        [
            *args[:4],
            "--scale",
            "1",
            "--degradation",
            "first_order",
            "--output",
            str(tmp_path / "fo"),
        ]
    )
    assert cv2.imread(str(tmp_path / "fo" / "lq" / "y.png")).shape == (64, 64, 3)


def test_image_reader_handles_depths_gray_and_alpha(tmp_path: Path):
    from diffbir.data.datasets import _read_image

    rgb16 = (np.random.default_rng(0).random((8, 6, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), rgb16[..., ::-1])
    np.testing.assert_allclose(_read_image(tmp_path / "deep.png"), rgb16 / 65535.0, atol=1e-6)
    gray = np.arange(48, dtype=np.uint8).reshape(8, 6)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    out = _read_image(tmp_path / "gray.png")
    assert out.shape == (8, 6, 3) and np.allclose(out[..., 0], gray / 255.0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 255, 7  # red in BGRA, nearly transparent
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba)
    out = _read_image(tmp_path / "alpha.png")
    assert out.shape == (4, 4, 3) and np.allclose(out, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="junk.png"):
        (tmp_path / "junk.png").write_bytes(b"junk")
        _read_image(tmp_path / "junk.png")


def test_build_degradation_selects_the_model_by_type() -> None:
    assert isinstance(build_degradation(None), FirstOrderDegradation)
    assert isinstance(build_degradation({"noise_range": [0, 1]}), FirstOrderDegradation)
    model = build_degradation({"type": "realesrgan", "scale": 2})
    assert isinstance(model, RealESRGANDegradation) and model.scale == 2
    with pytest.raises(ValueError, match="'bsrgan' is not one of"):
        build_degradation({"type": "bsrgan"})
    with pytest.raises(ValueError, match="unknown RealESRGANDegradation field"):
        build_degradation({"type": "realesrgan", "sigma_range": [1, 2]})
