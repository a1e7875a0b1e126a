"""diffbir.evaluation: metrics vs independent math, tables, CLI errors, presets."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffbir import models as diffbir_models
from diffbir.evaluation import cli, scoring
from diffbir.evaluation import presets as eval_presets
from diffbir.evaluation.metrics import (
    METRICS,
    MetricUnavailable,
    create_metric,
    load_metrics,
    psnr,
    read_image,
    ssim,
)
from diffbir.evaluation.tables import LAYOUTS, RowSpec, Table, render_markdown

EVAL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "eval"
LUMA = np.array([0.299, 0.587, 0.114])



def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _degrade(img: np.ndarray, how: str) -> np.ndarray:
    h, w = img.shape[:2]
    if how == "blur":
        return cv2.GaussianBlur(img, (0, 0), 1.0)
    factor = {"bicubic_x4": 4, "bicubic_x2": 2}[how]
    small = cv2.resize(img, (w // factor, h // factor), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def degraded(real47_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """real47 (as GT) degraded three ways into temporary result folders (PNG, same stems)."""
    root = tmp_path_factory.mktemp("degraded")
    folders = {how: root / how for how in ("bicubic_x4", "blur", "bicubic_x2")}
    for folder in folders.values():
        folder.mkdir()
    for path in _photos(real47_dir):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        for how, folder in folders.items():
            cv2.imwrite(str(folder / f"{path.stem}.png"), _degrade(img, how))
    return folders


def _uint8_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _reference_scores(result: Path, gt: Path,
                      names: tuple[str, ...] = ("psnr", "psnr_y", "ssim", "ssim_rgb")
                      ) -> dict[str, float]:
    """PSNR/SSIM by scikit-image on the uint8 images (independent of our code)."""
    x, y = _uint8_rgb(result), _uint8_rgb(gt)
    opts = {"data_range": 255, "gaussian_weights": True, "sigma": 1.5,
            "use_sample_covariance": False}
    scores = {
        "psnr": lambda: peak_signal_noise_ratio(y, x, data_range=255),
        "psnr_y": lambda: peak_signal_noise_ratio(y @ LUMA, x @ LUMA, data_range=255),
        "ssim": lambda: structural_similarity(np.round(x @ LUMA), np.round(y @ LUMA), **opts),
        "ssim_rgb": lambda: structural_similarity(x.astype(float), y.astype(float),
                                                  channel_axis=2, **opts),
    }
    return {name: scores[name]() for name in names}


# Tolerances: PSNR and RGB SSIM agree to float rounding; luma SSIM rounds Y to integers, where
# float32 noise can flip a value sitting exactly on .5, hence 1e-4.
TOLERANCE = {"psnr": 1e-6, "psnr_y": 1e-6, "ssim": 1e-4, "ssim_rgb": 1e-6}


def test_psnr_ssim_agree_with_skimage(real47_dir: Path, degraded: dict[str, Path]) -> None:
    pyiqa_psnr = pytest.importorskip("pyiqa").create_metric("psnr", device="cpu")
    for path in _photos(real47_dir)[:6]:
        result_path = degraded["bicubic_x4"] / f"{path.stem}.png"
        result, gt = read_image(result_path), read_image(path)
        ours = {"psnr": psnr(result, gt), "psnr_y": psnr(result, gt, luma=True),
                "ssim": ssim(result, gt), "ssim_rgb": ssim(result, gt, luma=False)}
        ref = _reference_scores(result_path, path)
        for name, value in ours.items():
            assert abs(value - ref[name]) <= TOLERANCE[name], (path.name, name, value, ref[name])
        # pyiqa's own PSNR (no weights needed; float32 with eps 1e-8 in the MSE)
        assert abs(ours["psnr"] - pyiqa_psnr(result, gt).item()) < 1e-4


def test_analytic_cases() -> None:
    gt = torch.full((1, 3, 32, 32), 100 / 255, dtype=torch.float64)
    brighter = torch.full((1, 3, 32, 32), 120 / 255, dtype=torch.float64)
    assert psnr(gt, gt) == math.inf
    assert ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    # MSE = (20/255)^2  =>  PSNR = 20 log10(255/20)
    assert psnr(brighter, gt) == pytest.approx(20 * math.log10(255 / 20), abs=1e-9)
    # flat images: SSIM = luminance term only, C1 = (0.01*255)^2
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 120 + c1) / (100**2 + 120**2 + c1)
    assert ssim(brighter, gt) == pytest.approx(expected, abs=1e-9)
    assert ssim(1 - gt, gt) < ssim(brighter, gt)
    with pytest.raises(ValueError, match="differ in size"):
        psnr(gt[..., :16], gt)


def test_pyiqa_metrics_without_weights_are_reported_not_fatal() -> None:
    """pyiqa's real behaviour here: every name is either loaded or unavailable with a reason."""
    names = ["psnr", "lpips", "musiq", "clipiqa"]
    loaded, unavailable = load_metrics(names)
    assert "psnr" in loaded
    assert set(loaded) | set(unavailable) == set(names)
    assert not set(loaded) & set(unavailable)
    for reason in unavailable.values():
        assert reason and "\n" not in reason and len(reason) < 400
    for name in ("lpips", "clipiqa"):
        if name in unavailable:  # offline: the reason names the file to fetch and where
            assert "weights not downloadable" in unavailable[name]
            assert "https://" in unavailable[name] and "place the file at" in unavailable[name]
    if "lpips" in unavailable:
        with pytest.raises(MetricUnavailable, match="lpips unavailable"):
            create_metric("lpips")


def _fails_for_lpips(name: str, device: str):
    if name == "lpips":
        raise MetricUnavailable(name, "weights missing (injected)")
    return create_metric(name, device)


def test_table_from_degraded_real47(real47_dir: Path, degraded: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "load_metrics", _load_with_injected_failure)
    names = {"Bicubic-x4": "bicubic_x4", "Blur": "blur", "Bicubic-x2": "bicubic_x2"}
    argv = ["--gt", str(real47_dir), "--metrics", "psnr,ssim,lpips", "--out", str(tmp_path)]
    for name, how in names.items():
        argv += ["--result", f"{name}={degraded[how]}"]
    assert cli.main(argv) == 0

    # independent means over all 47 images
    expected = {name: {"psnr": [], "ssim": []} for name in names}
    for path in _photos(real47_dir):
        for name, how in names.items():
            ref = _reference_scores(degraded[how] / f"{path.stem}.png", path, ("psnr", "ssim"))
            expected[name]["psnr"].append(ref["psnr"])
            expected[name]["ssim"].append(ref["ssim"])
    means = {n: {m: float(np.mean(v)) for m, v in d.items()} for n, d in expected.items()}

    with (tmp_path / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 47
    assert set(rows[0]) == {"dataset", "method", "image", "psnr", "ssim"}
    csv_psnr = np.mean([float(r["psnr"]) for r in rows if r["method"] == "Blur"])
    assert csv_psnr == pytest.approx(means["Blur"]["psnr"], abs=1e-6)

    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2] == "| Metrics | Bicubic-x4 | Blur | Bicubic-x2 |"
    for metric, label in (("psnr", "PSNR↑"), ("ssim", "SSIM↑")):
        row = next(line for line in lines if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        order = sorted(names, key=lambda n: means[n][metric], reverse=True)
        by_name = dict(zip(names, cells, strict=True))
        assert by_name[order[0]] == f"**{means[order[0]][metric]:.4f}**"
        assert by_name[order[1]] == f"<u>{means[order[1]][metric]:.4f}</u>"
        assert by_name[order[2]] == f"{means[order[2]][metric]:.4f}"
    lpips_row = next(line for line in lines if line.startswith("| LPIPS↓ |"))
    assert lpips_row.count("n/a [1]") == 3
    assert any(line.startswith("[1] n/a: LPIPS: weights missing (injected)") for line in lines)


def _load_with_injected_failure(names, device="cpu", **_):
    return load_metrics(names, device, factory=_fails_for_lpips)


def test_render_lower_is_better_ties_and_methods_as_rows() -> None:
    rows = [RowSpec("fid", "FID", higher_is_better=False, decimals=2),
            RowSpec("musiq", "MUSIQ", higher_is_better=True)]
    table = Table("T", ["D"], ["A", "B", "C"], rows, layout="methods_as_rows")
    table.values.update({("D", "A", "fid"): 40.0, ("D", "B", "fid"): 35.001,
                         ("D", "C", "fid"): 34.999, ("D", "A", "musiq"): 70.0,
                         ("D", "B", "musiq"): 60.0})
    table.na[("D", "C", "musiq")] = "MUSIQ: no weights"
    lines = render_markdown(table).splitlines()
    assert lines[2] == "| Methods | FID↓ | MUSIQ↑ |"
    assert lines[4] == "| A | <u>40.00</u> | **70.0000** |"
    assert lines[5] == "| B | **35.00** | <u>60.0000</u> |"  # 35.001 and 34.999 print equal
    assert lines[6] == "| C | **35.00** | n/a [1] |"
    assert "[1] n/a: MUSIQ: no weights  " in lines
    # Table 7's orientation: a column per dataset (and metric, when there are several)
    table7 = Table("T7", ["Set14", "BSD100"], ["ControlNet", "IRControlNet"], rows[1:],
                   layout="datasets_as_columns")
    table7.values.update({("Set14", "ControlNet", "musiq"): 1.0, ("BSD100", "ControlNet",
                          "musiq"): 3.0, ("Set14", "IRControlNet", "musiq"): 2.0})
    lines = render_markdown(table7).splitlines()
    assert lines[2:7] == ["| Methods | Set14 | BSD100 |", "|---|---|---|",
                          "| ControlNet | <u>1.0000</u> | 3.0000 |",
                          "| IRControlNet | **2.0000** | n/a [1] |", ""]


def test_cli_errors(real47_dir: Path, degraded: dict[str, Path], tmp_path: Path,
                    capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = str(tmp_path / "out")
    assert cli.main(["--gt", str(real47_dir), "--result", f"E={empty}", "--metrics", "psnr",
                     "--out", out]) == 2
    assert "contains no images" in capsys.readouterr().err

    other = tmp_path / "other"
    other.mkdir()
    cv2.imwrite(str(other / "no_such_stem.png"), np.zeros((16, 16, 3), np.uint8))
    assert cli.main(["--gt", str(real47_dir), "--result", f"O={other}", "--metrics", "psnr",
                     "--out", out]) == 2
    assert "same file stem" in capsys.readouterr().err

    assert cli.main(["--result", f"B={degraded['blur']}", "--metrics", "ssim,musiq",
                     "--out", out]) == 2
    assert "need ground truth" in capsys.readouterr().err

    assert cli.main(["--result", f"B={degraded['blur']}", "--metrics", "psnr,nope",
                     "--out", out]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err


def test_presets_load_and_use_known_metrics() -> None:
    presets = sorted(p.stem for p in EVAL_CONFIGS.glob("*.yaml"))
    assert presets == sorted(f"table{n}" for n in range(1, 12))
    row_keys = set(METRICS) | {"time_ms", "params_m"}
    for name in presets:
        cfg = eval_presets.load_preset(name)
        assert set(cfg.metrics) <= set(METRICS), name
        assert cfg.layout in LAYOUTS
        for column in cfg.columns.values():
            assert column.label
        for key, per_dataset in (cfg.get("reported") or {}).items():
            assert key in cfg.columns, (name, key)
            for ds_key, values in per_dataset.items():
                assert ds_key in cfg.datasets, (name, ds_key)
                assert set(values) <= row_keys, (name, set(values) - row_keys)
    table2 = eval_presets.load_preset("table2")
    scales = [eval_presets.column_config(table2, k, None).restore.guidance.scale
              for k in table2.columns]
    assert scales == [0.0, 0.5, 1.0]
    assert eval_presets.load_preset("table5").layout == "methods_as_rows"
    with pytest.raises(ValueError, match="bad config override"):
        eval_presets.load_preset("table2", ["datasets.no_such_key=1"])
    typo = eval_presets.load_preset("table2", ["inference.restore.stepz=1"])  # as diffbir-infer's
    with pytest.raises(ValueError, match="column diffbir_s0: .*restore.stepz"):
        eval_presets.column_config(typo, "diffbir_s0", None)


def test_preset_runs_inference_then_scores(real47_dir: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """table2 on a tiny paired set; inference replaced by bicubic upscaling (records argv)."""
    root = tmp_path / "div2k"
    (root / "lq").mkdir(parents=True)
    (root / "hq").mkdir()
    for path in _photos(real47_dir)[:3]:
        img = cv2.imread(str(path))[:64, :64]
        cv2.imwrite(str(root / "hq" / f"{path.stem}.png"), img)
        cv2.imwrite(str(root / "lq" / f"{path.stem}.png"),
                    cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA))
    calls = []

    def fake_infer(cfg, lq, out):
        calls.append(cfg)
        out.mkdir(parents=True)
        scale = int(cfg.restore.upscale)
        for path in lq.iterdir():
            img = cv2.imread(str(path))
            size = (img.shape[1] * scale, img.shape[0] * scale)
            cv2.imwrite(str(out / path.name), cv2.resize(img, size, interpolation=cv2.INTER_CUBIC))
        return 0

    monkeypatch.setattr(eval_presets, "restore_folder", fake_infer)
    out = tmp_path / "run"
    argv = ["--preset", "table2", "--data", f"div2k_val={root}", "--metrics", "psnr,ssim",
            "--weights-dir", "/w", "--out", str(out), "inference.restore.steps=7"]
    assert cli.main(argv) == 0
    assert len(calls) == 3
    configs = calls  # what the runner gets
    assert [c.restore.guidance.scale for c in configs] == [0.0, 0.5, 1.0]
    assert {(c.version, c.task, c.restore.upscale, c.restore.steps, c.seed, c.weights.dir)
            for c in configs} == {("v2", "sr", 4.0, 7, 231, "/w")}
    text = (out / "table.md").read_text()
    assert "| Metrics | DiffBIR (s=0) | DiffBIR (s=0.5) | DiffBIR (s=1) |" in text
    assert "as reported in the paper" in text and "20.5824" in text
    assert cli.main(argv) == 0 and len(calls) == 3  # result folders exist: no new inference


def test_table11_times_inference_and_counts_parameters(real47_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []

    def fake_infer(cfg, lq, out):
        out.mkdir(parents=True)
        for path in lq.iterdir():
            img = cv2.imread(str(path))
            sizes.append(img.shape)
            cv2.imwrite(str(out / path.name), cv2.resize(img, (512, 512)))
        return 0

    monkeypatch.setattr(eval_presets, "restore_folder", fake_infer)
    monkeypatch.setitem(diffbir_models.MODEL_REGISTRY, "test_linear", "torch.nn:Linear")
    model_yaml = tmp_path / "linear.yaml"
    model_yaml.write_text("name: test_linear\nparams: {in_features: 1000, out_features: 2000}\n")
    out = tmp_path / "run"
    argv = ["--preset", "table11", "--data", f"timing={real47_dir}", "--out", str(out),
            "timing.num_images=3", f"params.diffbir=[{model_yaml},{model_yaml}]"]
    assert cli.main(argv) == 0
    assert sizes == [(128, 128, 3)] * 4  # one warm-up run of 1 image, then 3 images
    lines = (out / "table.md").read_text().splitlines()
    assert lines[2] == "| Metrics | DiffBIR |"
    assert lines[4].startswith("| Inference Time (ms)↓ | ")
    float(lines[4].split("|")[2].strip("* <u>/"))
    assert lines[5] == "| Model Size (M)↓ | 4.00 |"  # 2 × (1000·2000 + 2000) parameters


def test_count_parameters_builds_on_meta_device(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(diffbir_models.MODEL_REGISTRY, "test_linear", "torch.nn:Linear")
    model_yaml = tmp_path / "big.yaml"
    model_yaml.write_text("name: test_linear\nparams: {in_features: 100000, out_features: 100000}")
    count = eval_presets.count_parameters([str(model_yaml)])
    assert count == pytest.approx(10000.1)  # 40 GB if real


def test_pyiqa_wrapper_paths_with_weightless_metrics(degraded: dict[str, Path],
                                                     real47_dir: Path) -> None:
    """The pyiqa wrapper on metrics that need no download (FR 'psnr', NR 'entropy')."""
    from diffbir.evaluation.metrics import PyiqaImageMetric

    gt_path = _photos(real47_dir)[0]
    result = read_image(degraded["blur"] / f"{gt_path.stem}.png")
    gt = read_image(gt_path)
    assert PyiqaImageMetric("psnr", True, "cpu")(result, gt) == pytest.approx(psnr(result, gt),
                                                                              abs=1e-4)
    assert math.isfinite(PyiqaImageMetric("entropy", False, "cpu")(result, None))


def _fake_metric_factory(name: str, device: str):
    """Real PSNR/SSIM; no-reference metrics replaced by the mean brightness (no downloads)."""
    if name in ("psnr", "ssim"):
        return create_metric(name, device)
    if name == "lpips":
        raise MetricUnavailable(name, "weights missing (injected)")
    return lambda result, gt: float(result.mean())


def test_ablation_preset_with_per_dataset_metrics(real47_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """table6: no-reference rows for RealSRSet, full-reference rows for ImageNet; weights from
    the ablation training runs are checked before any inference starts."""
    photos = _photos(real47_dir)[:2]
    realsr, imagenet = tmp_path / "realsr", tmp_path / "imagenet"
    for folder in (realsr, imagenet / "lq", imagenet / "hq"):
        folder.mkdir(parents=True)
    for path in photos:
        img = cv2.imread(str(path))[:64, :64]
        cv2.imwrite(str(realsr / f"{path.stem}.png"), cv2.resize(img, (16, 16)))
        cv2.imwrite(str(imagenet / "hq" / f"{path.stem}.png"), img)
        cv2.imwrite(str(imagenet / "lq" / f"{path.stem}.png"), cv2.resize(img, (16, 16)))
    calls = []

    def fake_infer(cfg, lq, out):
        calls.append(cfg)
        out.mkdir(parents=True)
        for path in lq.iterdir():
            img = cv2.resize(cv2.imread(str(path)), (64, 64), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(out / path.name), img)
        return 0

    monkeypatch.setattr(eval_presets, "restore_folder", fake_infer)
    monkeypatch.setattr(scoring, "load_metrics",
                        lambda names, device="cpu": load_metrics(names, device,
                                                                 factory=_fake_metric_factory))
    out = tmp_path / "run"
    argv = ["--preset", "table6", "--data", f"realsrset={realsr}", "--data",
            f"imagenet_val={imagenet}", "--out", str(out)]
    assert cli.main(argv) == 2 and not calls  # runs/gm_ablation_no_rm/... does not exist here
    weights = tmp_path / "controlnet.pth"
    weights.write_bytes(b"")
    argv += [f"columns.no_rm.infer.weights.controlnet={weights}",
             f"columns.with_rm.infer.weights.controlnet={weights}"]
    assert cli.main(argv) == 0
    assert len(calls) == 4
    assert {(c.task, c.weights.controlnet) for c in calls} == {("custom", str(weights)),
                                                              ("sr", str(weights))}
    lines = (out / "table.md").read_text().splitlines()
    assert lines[2] == "| Datasets | Metrics | w/o RM | w/ RM |"
    labels = [line.split("|")[2].strip() for line in lines[4:10]]
    assert labels == ["MANIQA↑", "MUSIQ↑", "CLIP-IQA↑", "PSNR↑", "SSIM↑", "LPIPS↓"]
    assert lines[4].startswith("| RealSRSet |") and lines[7].startswith("| ImageNet-Val-1k |")
    assert lines[9].count("n/a [1]") == 2
    with (out / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["dataset"] for r in rows if r["psnr"]} == {"imagenet_val"}
    assert {r["dataset"] for r in rows if r["musiq"]} == {"realsrset"}


def test_fid_against_a_reference_folder(real47_dir: Path, degraded: dict[str, Path],
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FID is a folder-vs-reference metric: real pyiqa FID is loaded or reported unavailable;
    the CLI hands it each result folder with --fid-ref (wiring checked with a stand-in)."""
    loaded, unavailable = load_metrics(["fid"])
    assert set(loaded) | set(unavailable) == {"fid"}
    if unavailable:
        assert "not downloadable" in unavailable["fid"] or "module" in unavailable["fid"]
    calls = []

    def fake_fid(result_dir: Path, ref_dir: Path) -> float:
        calls.append((result_dir, ref_dir))
        return float(len(list(result_dir.iterdir())) - len(list(ref_dir.iterdir())))

    monkeypatch.setattr(scoring, "load_metrics", lambda names, device="cpu": (
        {"fid": fake_fid}, {}))
    argv = ["--result", f"Blur={degraded['blur']}", "--result", f"X4={degraded['bicubic_x4']}",
            "--metrics", "fid", "--fid-ref", str(real47_dir), "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert calls == [(degraded["blur"], real47_dir), (degraded["bicubic_x4"], real47_dir)]
    assert "| FID↓ | **0.0000** | **0.0000** |" in (tmp_path / "table.md").read_text()
