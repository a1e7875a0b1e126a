"""Faces in whole photos (``diffbir.faces``): the official helper's intermediates of
``parity/faces.pt`` reproduced, the quirk options, the networks and their weight files, and the
edge cases (no face, tiny faces, degenerate landmarks, hundreds of faces)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from diffbir.checkpoint import CheckpointError, empty_parameters
from diffbir.faces import (
    CORRECTED,
    FACE_TEMPLATE,
    OFFICIAL,
    FacePaster,
    ParseNetParser,
    RetinaFaceDetector,
    build_detector,
    build_parser,
    face_masks,
    load_detector,
    load_face_networks,
    load_parser,
    plan_faces,
)
from diffbir.faces import paste as paste_module
from diffbir.faces.align import detector_input
from diffbir.faces.paste import face_parse_mask, resize_background
from diffbir.weights import OFFICIAL_WEIGHTS, MissingWeightsError

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def faces_ref(parity_dir: Path) -> dict:
    return torch.load(parity_dir / "faces.pt", map_location="cpu", weights_only=True)


def _case(faces_ref: dict, name: str) -> dict:
    return next(c for c in faces_ref["cases"] if c["name"] == name)


CASES = ("5_x1", "11_x2", "48_x4")


class InjectedDetector:
    """Returns fixed rows (detector frame) and keeps the image it was given."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.asarray(rows, dtype=np.float32)
        self.seen: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.seen = image
        return self.rows


def _plan(case: dict, quirks=OFFICIAL):
    detector = InjectedDetector(case["injected"].numpy())
    plan = plan_faces(case["lq"].numpy(), case["upscale"], detector, quirks)
    return plan, detector


def _full(band_values: np.ndarray, band, height: int) -> np.ndarray:
    full = np.zeros((height, *band_values.shape[1:]), band_values.dtype)
    full[band.rows] = band_values
    return full


def _max_abs(a: np.ndarray, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------ parity with the official helper


@pytest.mark.parametrize("name", CASES)
def test_plan_reproduces_the_official_helper(faces_ref: dict, name: str) -> None:
    case = _case(faces_ref, name)
    plan, detector = _plan(case)
    assert np.array_equal(plan.photo, case["input_img"].numpy())  # upscaled, then enlarged
    assert plan.background_size == tuple(case["upscaled"].shape[:2])
    assert detector.seen.shape == tuple(case["det_input_shape"])
    assert np.array_equal(detector.seen, detector_input(plan.photo)[0])  # RGB, unchanged
    assert [f.detection for f in plan.faces] == list(case["kept_idx"])
    assert plan.detections == len(case["injected"])
    assert len(plan.faces) + len(plan.too_small) == plan.detections
    assert np.array_equal(np.stack([f.box for f in plan.faces]), case["det_faces"].numpy())
    assert np.array_equal(np.stack([f.landmarks for f in plan.faces]), case["landmarks"].numpy())
    for i, face in enumerate(plan.faces):
        assert _max_abs(face.affine, case["affine_matrices"][i]) < 1e-9
        assert _max_abs(face.inverse, case["inverse_affine_matrices"][i]) < 1e-9
    crops = np.concatenate([b.crops for b in plan.crop_batches(1)])
    assert crops.dtype == np.uint8 and _max_abs(crops, case["cropped_faces"]) <= 1


@pytest.mark.parametrize("name", CASES)
def test_masks_reproduce_the_official_helper(faces_ref: dict, name: str) -> None:
    """Soft square masks and parse masks (from the stored parse argmax) of every face."""
    case = _case(faces_ref, name)
    height, width = case["input_img"].shape[:2]
    for i in range(len(case["kept_idx"])):
        parse_512 = face_parse_mask(case["parse_argmax"][i].numpy())
        masks = face_masks(case["inverse_affine_matrices"][i].numpy(), (height, width), parse_512)
        assert masks.w_edge == case["w_edge"][i]
        # outside its band a face's official masks are 0: the band loses nothing
        soft = _full(masks.soft, masks.band, height)
        parse = _full(masks.parse, masks.band, height)
        assert _max_abs(soft, case["soft_mask"][i]) <= 1e-6
        assert _max_abs(parse, case["parse_mask"][i]) <= 1e-6  # stored as float32 copies
        assert np.array_equal(masks.blend, np.minimum(masks.parse, masks.soft))


@pytest.mark.parametrize("name", CASES)
def test_paste_reproduces_the_official_photo(faces_ref: dict, name: str) -> None:
    case = _case(faces_ref, name)
    plan, _ = _plan(case)
    restored_bg = case["restored_bg"].numpy()
    assert np.array_equal(resize_background(restored_bg, plan.size), case["bg_resized"].numpy())
    paster = FacePaster(plan, restored_bg)
    faces, argmax = case["restored_faces"].numpy(), case["parse_argmax"].numpy()
    paster.paste(faces[:1], argmax[:1])  # in batches, in detection order
    paster.paste(faces[1:], argmax[1:])
    out = paster.result()
    assert out.shape == tuple(case["output"].shape) and out.dtype == np.uint8
    assert _max_abs(out, case["output"]) <= 1


def test_band_equals_the_whole_photo_computation() -> None:
    """A face's warps and soft mask on its band of rows equal those on the whole photo, for
    random similarities (sizes, angles, faces across every border)."""
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    ones = np.ones((512, 512), np.float32)
    parse_512 = rng.random((512, 512))
    height, width = 300, 400
    for _ in range(30):
        scale, angle = rng.uniform(0.05, 1.2), rng.uniform(-np.pi, np.pi)
        linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        center = rng.uniform(-50, 450, 2)
        inverse = np.hstack([linear, (center - linear @ (256, 256))[:, None]])
        masks = face_masks(inverse, (height, width), parse_512)
        warped = cv2.warpAffine(face, inverse, (width, height))
        coverage = cv2.erode(cv2.warpAffine(ones, inverse, (width, height)), np.ones((2, 2)))
        soft, w_edge = paste_module.soft_square_mask(coverage)
        band = masks.band
        assert np.array_equal(
            paste_module._warp_back(face, inverse, band, width), warped[band.rows]
        )
        assert not warped[: band.top].any() and not warped[band.bottom :].any()
        assert np.array_equal(_full(masks.coverage, band, height), coverage)
        assert masks.w_edge == w_edge and _max_abs(_full(masks.soft, band, height), soft) < 1e-12
        parse = cv2.warpAffine(parse_512, inverse, (width, height))
        assert np.array_equal(_full(masks.parse, band, height), parse)


# ------------------------------------------------------------------------------- the quirk options


def test_eye_distance_option_changes_which_faces_are_kept(faces_ref: dict) -> None:
    """11_x2's third face (eye distance 8.4 px) is dropped only by the official measure."""
    case = _case(faces_ref, "11_x2")
    official, _ = _plan(case, OFFICIAL)
    corrected, _ = _plan(case, CORRECTED)
    assert [f.detection for f in official.faces] == [0, 1] and official.too_small == (2,)
    assert [f.detection for f in corrected.faces] == [0, 1, 2] and corrected.too_small == ()
    rows = case["injected"].numpy()
    true_distance = np.hypot(rows[2, 5] - rows[2, 7], rows[2, 6] - rows[2, 8])
    assert CORRECTED.eye_distance(rows[2:])[0] == pytest.approx(true_distance)
    assert OFFICIAL.eye_distance(rows[2:])[0] < 5 <= true_distance


def test_channel_order_option_changes_border_and_detector_input(faces_ref: dict) -> None:
    case = _case(faces_ref, "5_x1")  # face 1 crosses the left border
    official, seen_official = _plan(case, OFFICIAL)
    corrected, seen_corrected = _plan(case, CORRECTED)
    outside = np.all(official.crop(1) == (135, 133, 132), axis=-1)  # R=135: the official slip
    assert outside.sum() > 1000
    assert np.all(corrected.crop(1)[outside] == (132, 133, 135))  # B=135, as intended
    assert np.array_equal(seen_corrected.seen, seen_official.seen[..., ::-1])  # BGR, as trained


def test_channel_order_option_changes_parser_input(faces_ref: dict) -> None:
    case = _case(faces_ref, "48_x4")
    faces = case["restored_faces"].numpy()
    for quirks, expected in ((OFFICIAL, faces[..., ::-1]), (CORRECTED, faces)):
        plan, _ = _plan(case, quirks)
        given = []

        def parse(batch: np.ndarray, given=given) -> np.ndarray:
            given.append(batch.copy())
            return case["parse_argmax"].numpy()[: len(batch)]

        paster = FacePaster(plan, case["restored_bg"].numpy(), parse)
        paster.paste(faces)
        assert np.array_equal(given[0], expected)
        assert _max_abs(paster.result(), case["output"]) <= 1  # same argmax: same photo


# ----------------------------------------------------------------------------------- the networks


def test_detector_forward_on_random_weights() -> None:
    torch.manual_seed(0)
    net = build_detector()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        boxes, scores, landmarks = net(x)
    anchors = 2 * (8 * 12 + 4 * 6 + 2 * 3)  # two anchors per cell at strides 8, 16, 32
    assert boxes.shape == (1, anchors, 4) and landmarks.shape == (1, anchors, 10)
    assert scores.shape == (1, anchors, 2)
    assert torch.allclose(scores.sum(-1), torch.ones(1, anchors))
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    rows = RetinaFaceDetector(net)(image)
    assert rows.dtype == np.float32 and rows.ndim == 2 and rows.shape[1] == 15
    assert np.all(rows[:, 4] > 0.8)  # facexlib's score threshold


def test_parser_forward_on_random_weights() -> None:
    """The full-size ParseNet(512, 512, 19), run on 64 px faces (it is fully convolutional;
    a 512 px forward takes tens of seconds on one CPU thread)."""
    torch.manual_seed(0)
    net = build_parser()
    faces = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    inputs = []
    net.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    argmax = ParseNetParser(net)(faces)
    assert argmax.shape == (2, 64, 64) and argmax.dtype == np.uint8 and argmax.max() < 19
    expected = (torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert torch.equal(inputs[0], expected)  # the official preprocessing, in float32
    swapped = ParseNetParser(net)(OFFICIAL.parser_faces(faces))
    assert not np.array_equal(swapped, argmax)  # the channel order reaches the network


def _write_official(
    net: torch.nn.Module, path: Path, prefix: str, counters: bool
) -> dict[str, torch.Tensor]:
    """Random weights of ``net``'s shapes in an official format: every key prefixed with
    ``prefix`` (the detector was trained with DataParallel: ``module.``), with or without
    BatchNorm's ``num_batches_tracked`` (files of older PyTorch lack them)."""
    gen = torch.Generator().manual_seed(1)
    sd = {
        k: torch.randn(v.shape, generator=gen)
        if v.is_floating_point()
        else torch.zeros(v.shape, dtype=v.dtype)
        for k, v in net.state_dict().items()
        if counters or not k.endswith("num_batches_tracked")
    }
    torch.save({f"{prefix}{k}": v for k, v in sd.items()}, path)
    return sd


def test_networks_load_official_files(tmp_path: Path) -> None:
    detector_file = tmp_path / "detection_Resnet50_Final.pth"
    parser_file = tmp_path / "parsing_parsenet.pth"
    with empty_parameters():
        written_detector = _write_official(build_detector("meta"), detector_file, "module.", False)
        written_parser = _write_official(build_parser("meta"), parser_file, "", True)
    detector, parser = load_face_networks(tmp_path)
    for net, written in ((detector.net, written_detector), (parser.net, written_parser)):
        own = net.state_dict()
        assert not net.training and all(torch.equal(own[k], v) for k, v in written.items())
    assert parser.net.state_dict().keys() == written_parser.keys()
    assert {k for k in detector.net.state_dict() if "num_batches" not in k} == set(written_detector)
    # the weights of another network are refused, naming the file
    with pytest.raises(CheckpointError, match="parsing_parsenet.pth: weights do not fit Retina"):
        load_detector(parser_file)
    with pytest.raises(CheckpointError, match="detection_Resnet50_Final.pth: weights do not fit"):
        load_parser(detector_file)


def test_missing_face_weights_are_listed(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError) as info:
        load_face_networks(tmp_path)
    msg = str(info.value)
    assert msg.startswith("2 weight file(s) missing")
    for name in ("detection_Resnet50_Final.pth", "parsing_parsenet.pth"):
        assert str((tmp_path / name).resolve()) in msg and OFFICIAL_WEIGHTS[name].url in msg


def test_building_the_networks_touches_no_network(tmp_path: Path) -> None:
    """In a fresh interpreter with sockets and torch.hub downloads refused: facexlib imports
    and both networks build (facexlib's own loaders would download)."""
    code = textwrap.dedent(
        """
        import socket
        import torch.hub

        def refuse(*args, **kwargs):
            raise RuntimeError("network access")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        torch.hub.download_url_to_file = refuse

        import facexlib  # every submodule, as its __init__ imports them
        from diffbir.checkpoint import empty_parameters
        from diffbir.faces import build_detector, build_parser

        with empty_parameters():  # the constructors run, without the time of random values
            build_detector("meta")
            build_parser("meta")
        print("built")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TORCH_HOME": str(tmp_path / "hub")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "built" in run.stdout, run.stderr[-2000:]
    assert not (tmp_path / "hub").exists()


# --------------------------------------------------------------------------------------- edge cases


def _template_rows(centers: np.ndarray, scale: float) -> np.ndarray:
    """Detection rows of upright faces: the template scaled by ``scale``, centred at each
    point (box around the landmarks, score 0.99)."""
    rows = []
    for cx, cy in centers:
        points = (FACE_TEMPLATE - 256) * scale + (cx, cy)
        x1, y1 = points.min(0) - 10 * scale
        x2, y2 = points.max(0) + 10 * scale
        rows.append([x1, y1, x2, y2, 0.99, *points.ravel()])
    return np.array(rows, np.float32)


def test_no_face_gives_the_background_at_the_plan_size() -> None:
    lq = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    plan = plan_faces(lq, 2, InjectedDetector(np.zeros((0, 15))), OFFICIAL)
    assert plan.faces == () and plan.detections == 0 and list(plan.crop_batches(4)) == []
    assert plan.size == (512, 768) and plan.background_size == (200, 300)
    background = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    out = FacePaster(plan, background).result()
    lanczos = cv2.resize(background, (768, 512), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(out, lanczos)


def test_tiny_and_degenerate_detections_are_dropped_and_counted() -> None:
    lq = np.full((600, 600, 3), 128, np.uint8)
    rows = _template_rows(np.array([[150.0, 150.0], [450.0, 450.0], [300.0, 150.0]]), 0.5)
    rows[1] = _template_rows(np.array([[450.0, 450.0]]), 0.06)[0]  # eye distance 7.6 px
    rows[2, 9] = np.nan  # a broken landmark (the nose): no alignment
    plan = plan_faces(lq, 1, InjectedDetector(rows), OFFICIAL)
    assert [f.detection for f in plan.faces] == [0]
    assert plan.too_small == (1,) and plan.degenerate == (2,)
    assert [f.detection for f in plan_faces(lq, 1, InjectedDetector(rows), CORRECTED).faces] == [
        0,
        1,
    ]


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="photo: expected an \\(H, W, 3\\) uint8"):
        plan_faces(
            np.zeros((8, 8, 3), np.float32), 1, InjectedDetector(np.zeros((0, 15))), OFFICIAL
        )
    lq = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="face detector: expected \\(N, 15\\) rows"):
        plan_faces(lq, 1, InjectedDetector(np.zeros((2, 14))), OFFICIAL)
    plan = plan_faces(
        lq, 1, InjectedDetector(_template_rows(np.array([[256.0, 256.0]]), 0.5)), OFFICIAL
    )
    paster = FacePaster(plan, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="parse_argmax: required"):
        paster.paste(np.zeros((1, 512, 512, 3), np.uint8))
    with pytest.raises(RuntimeError, match="0 of 1 faces pasted"):
        paster.result()
    with pytest.raises(ValueError, match="the plan has 1 faces, 0 pasted, got 2 more"):
        paster.paste(np.zeros((2, 512, 512, 3), np.uint8), np.zeros((2, 512, 512), np.uint8))


def test_hundreds_of_faces_in_batches_with_bounded_memory(monkeypatch) -> None:
    """256 faces on a 1024 px photo: crops come lazily in batches, and pasting holds one band
    at a time (peak well below one full-size float64 photo, whatever the number of faces)."""
    size, grid = 1024, 16
    centers = np.stack(np.meshgrid(np.arange(grid), np.arange(grid)), -1).reshape(-1, 2) + 0.5
    rows = _template_rows(centers * size / grid, 0.12)  # eye distance 15 px, 64 px apart
    # waves of 40 px: a crop warped back gives the photo again (a 1 px shift: 246 levels off)
    y, x = np.mgrid[:size, :size] * (2 * np.pi / 40)
    lq = (127.5 + 127 * np.stack([np.sin(x), np.sin(y), np.cos(x + y)], -1)).astype(np.uint8)
    plan = plan_faces(lq, 1, InjectedDetector(rows), OFFICIAL)
    assert len(plan.faces) == grid * grid
    batches = plan.crop_batches(100)
    first = next(batches)
    assert first.indices == range(0, 100) and np.array_equal(first.crops[37], plan.crop(37))
    # the parse mask of a face-class argmax, computed once (its two 101-px blurs cost ~0.4 s)
    parse_mask = face_parse_mask(np.ones((512, 512), np.uint8))
    monkeypatch.setattr(paste_module, "face_parse_mask", lambda _argmax: parse_mask)
    paster = FacePaster(plan, lq)
    canvas = size * size * 3 * 8
    argmax = np.ones((100, 512, 512), np.uint8)
    tracemalloc.start()
    try:
        for batch in itertools.chain([first], batches):
            paster.paste(batch.crops, argmax[: len(batch.crops)])
            del batch
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert paster.pasted == grid * grid
    batch_bytes = 100 * 512 * 512 * (3 + 1)  # crops and argmax of one batch
    assert peak < batch_bytes + canvas / 2, f"peak {peak / 2**20:.0f} MiB"
    out = paster.result()
    assert out.shape == (size, size, 3)
    assert _max_abs(out, lq) <= 1  # every crop pasted back where it came from
