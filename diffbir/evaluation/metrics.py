"""Image-quality metrics for the paper's tables, by name.

Conventions (the paper does not state them; its no-reference metrics are pyiqa's, so we follow
pyiqa's defaults for the full-reference ones too):

- ``psnr``: RGB, images in [0, 1], 10·log10(1 / MSE) averaged over the three channels
  (pyiqa ``psnr``). Identical images give ``inf``. ``psnr_y``: the same on the luma
  Y = 0.299 R + 0.587 G + 0.114 B.
- ``ssim``: luma SSIM (Wang et al. 2004): Y = 0.299 R + 0.587 G + 0.114 B on the 0..255 scale,
  rounded to integers; 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, L = 255, mean over
  the "valid" part of the map (pyiqa ``ssim`` convention, which additionally clips negative
  contrast-structure terms to 0; we keep the textbook formula). ``ssim_rgb``: the mean of the
  per-channel SSIMs on 0..255 RGB values, not rounded.
- ``lpips`` (AlexNet, v0.1), ``musiq`` (KonIQ), ``maniqa`` (KonIQ), ``clipiqa``, ``fid``: pyiqa's
  metrics of those names. They fetch their weights on first use; when that fails (no network,
  missing module) the metric is *unavailable* with a short reason and the others still run.

All images are RGB tensors ``(1, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import urllib.error
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor

from diffbir.pipeline.image_io import IMAGE_EXTENSIONS, ImageReadError
from diffbir.pipeline.image_io import read_image as read_pipeline_image

IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))  # the files diffbir-infer reads
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class EvaluationError(ValueError):
    """Bad evaluation input (folder, flag, config key); the message says what was expected."""


class MetricUnavailable(RuntimeError):
    """A metric that cannot run here (weights not downloadable, module missing, ...)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} unavailable: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class MetricInfo:
    """What a metric name means and how to rank it."""

    name: str
    label: str
    higher_is_better: bool
    needs_gt: bool
    per_image: bool
    description: str


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("psnr", "PSNR", True, True, True, "PSNR on RGB in [0,1] (pyiqa convention)"),
        MetricInfo("psnr_y", "PSNR-Y", True, True, True, "PSNR on luma 0.299R+0.587G+0.114B"),
        MetricInfo("ssim", "SSIM", True, True, True, "SSIM on rounded 0..255 luma"),
        MetricInfo("ssim_rgb", "SSIM-RGB", True, True, True, "mean per-channel SSIM on RGB"),
        MetricInfo("lpips", "LPIPS", False, True, True, "pyiqa lpips (AlexNet, v0.1)"),
        MetricInfo("musiq", "MUSIQ", True, False, True, "pyiqa musiq (KonIQ-10k)"),
        MetricInfo("maniqa", "MANIQA", True, False, True, "pyiqa maniqa (KonIQ-10k)"),
        MetricInfo("clipiqa", "CLIP-IQA", True, False, True, "pyiqa clipiqa"),
        MetricInfo("fid", "FID", False, False, False, "pyiqa fid: result folder vs reference"),
    )
}

ImageMetric = Callable[[Tensor, Tensor | None], float]
SetMetric = Callable[[Path, Path], float]


def metric_info(name: str) -> MetricInfo:
    """The :class:`MetricInfo` of ``name``; EvaluationError listing the known names otherwise."""
    if name not in METRICS:
        raise EvaluationError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    return METRICS[name]


# ---------------------------------------------------------------- images and folders


def read_image(path: str | Path) -> Tensor:
    """Read an image file as a float32 RGB tensor (1, 3, H, W) in [0, 1], exactly as
    ``diffbir-infer`` reads its inputs (EXIF orientation, 16-bit, alpha dropped, size limit)."""
    try:
        img = read_pipeline_image(path)
    except ImageReadError as err:
        raise EvaluationError(f"cannot read image {path}: {err.reason}") from err
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).contiguous()


def list_images(folder: str | Path, what: str = "folder") -> dict[str, Path]:
    """Images of ``folder`` by file stem; errors on a missing/empty folder or duplicate stems."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{what} {folder} is not a directory")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in images:
            raise EvaluationError(
                f"{what} {folder}: two images share the stem {path.stem!r} "
                f"({images[path.stem].name}, {path.name}); images are matched by stem"
            )
        images[path.stem] = path
    if not images:
        raise EvaluationError(
            f"{what} {folder} contains no images (expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)})"
        )
    return images


# ---------------------------------------------------------------- PSNR / SSIM (our own)


def _luma(img: Tensor) -> Tensor:
    weights = img.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (img * weights).sum(dim=1, keepdim=True)


def _check_pair(result: Tensor, gt: Tensor | None) -> Tensor:
    if gt is None:
        raise EvaluationError("a full-reference metric needs a ground-truth image")
    if result.shape != gt.shape:
        raise EvaluationError(
            f"result and ground truth differ in size: {tuple(result.shape[-2:])} vs "
            f"{tuple(gt.shape[-2:])} (H, W)"
        )
    return gt


def psnr(result: Tensor, gt: Tensor | None, *, luma: bool = False) -> float:
    """PSNR in dB for images in [0, 1] (RGB, or luma when ``luma``); ``inf`` when identical."""
    gt = _check_pair(result, gt)
    x, y = result.double(), gt.double()
    if luma:
        x, y = _luma(x), _luma(y)
    mse = float(np.mean((x.numpy() - y.numpy()) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Per-pixel SSIM of (H, W) float64 images, valid part only (Gaussian 11, σ 1.5)."""
    window = _gaussian_window()
    size = window.size
    if min(x.shape) < size:
        raise EvaluationError(f"SSIM needs images of at least {size}x{size} pixels, got "
                              f"{tuple(x.shape)}")
    crop = size // 2

    def blur(t: np.ndarray) -> np.ndarray:
        # separable float64 filter; the border pixels (touched by padding) are cropped off
        out = cv2.sepFilter2D(t, cv2.CV_64F, window, window, borderType=cv2.BORDER_REFLECT)
        return out[crop:-crop, crop:-crop]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def ssim(result: Tensor, gt: Tensor | None, *, luma: bool = True) -> float:
    """SSIM on the rounded 0..255 luma (default) or the mean over RGB channels on 0..255."""
    gt = _check_pair(result, gt)
    x, y = result.double() * 255.0, gt.double() * 255.0
    if luma:
        x, y = _luma(x).round(), _luma(y).round()
    planes = zip(x.flatten(0, -3).numpy(), y.flatten(0, -3).numpy(), strict=True)
    return float(np.mean([_ssim_map(a, b, 255.0).mean() for a, b in planes]))


# ---------------------------------------------------------------- pyiqa metrics

PYIQA_NAMES = {"lpips": "lpips", "musiq": "musiq", "maniqa": "maniqa", "clipiqa": "clipiqa",
               "fid": "fid"}
_DOWNLOAD_LINE = re.compile(r'Downloading:?\s+"?(\S+?)"?\s+to\s+(\S+)')


def _traceback_value(err: BaseException, name: str) -> str | None:
    """The innermost string local ``name`` in the traceback of ``err`` (e.g. a download URL)."""
    tb = err.__traceback__
    found = None
    while tb is not None:
        value = tb.tb_frame.f_locals.get(name)
        found = value if isinstance(value, str) else found
        tb = tb.tb_next
    return found


def _explain_failure(err: BaseException, log: str) -> str:
    """One line saying why pyiqa could not build a metric."""
    downloads = _DOWNLOAD_LINE.findall(log)
    if isinstance(err, ModuleNotFoundError):
        hint = ""
        if err.name == "pkg_resources":
            hint = " (pyiqa's CLIP code imports the `clip` package, which needs setuptools<81)"
        return f"missing Python module {err.name!r}{hint}"
    network = isinstance(err, urllib.error.URLError | ConnectionError | TimeoutError) or (
        type(err).__name__ in {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}
    )
    if network:
        cause = getattr(err, "reason", None) or str(err).splitlines()[0]
        if downloads:
            url, target = downloads[-1]
            return f"weights not downloadable ({cause}): {url}; place the file at {target}"
        url, target = _traceback_value(err, "url"), _traceback_value(err, "download_target")
        if url:
            place = f"; place the file at {target}" if target else ""
            return f"weights not downloadable ({cause}): {url}{place}"
        repo = _traceback_value(err, "repo_id")
        where = f" repo {repo}" if repo else ""
        return f"weights not downloadable from the Hugging Face Hub{where} ({type(err).__name__})"
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first_line}"


def create_pyiqa_metric(pyiqa_name: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``pyiqa.create_metric`` with its download chatter captured; MetricUnavailable on failure."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            import pyiqa

            model = pyiqa.create_metric(pyiqa_name, device=torch.device(device))
    except Exception as err:  # pyiqa surfaces network, import and config errors as-is
        raise MetricUnavailable(pyiqa_name, _explain_failure(err, log.getvalue())) from err
    sys.stderr.write(log.getvalue())
    return model


class PyiqaImageMetric:
    """Per-image pyiqa metric (full-reference when ``needs_gt``)."""

    def __init__(self, pyiqa_name: str, needs_gt: bool, device: str | torch.device) -> None:
        self.model = create_pyiqa_metric(pyiqa_name, device)
        self.needs_gt = needs_gt

    @torch.no_grad()
    def __call__(self, result: Tensor, gt: Tensor | None) -> float:
        result = result.clamp(0, 1)
        if self.needs_gt:
            gt = _check_pair(result, gt).clamp(0, 1)
            return float(self.model(result, gt).item())
        return float(self.model(result).item())


class PyiqaSetMetric:
    """Folder-vs-folder pyiqa metric (FID)."""

    def __init__(self, pyiqa_name: str, device: str | torch.device) -> None:
        self.model = create_pyiqa_metric(pyiqa_name, device)

    @torch.no_grad()
    def __call__(self, result_dir: Path, ref_dir: Path) -> float:
        return float(self.model(str(result_dir), str(ref_dir), verbose=False))


def _own_metric(name: str) -> ImageMetric:
    table: dict[str, ImageMetric] = {
        "psnr": lambda r, g: psnr(r, g),
        "psnr_y": lambda r, g: psnr(r, g, luma=True),
        "ssim": lambda r, g: ssim(r, g),
        "ssim_rgb": lambda r, g: ssim(r, g, luma=False),
    }
    return table[name]


def create_metric(name: str, device: str | torch.device = "cpu") -> ImageMetric | SetMetric:
    """The callable for metric ``name``; MetricUnavailable when it cannot run here."""
    info = metric_info(name)
    if name not in PYIQA_NAMES:
        return _own_metric(name)
    try:
        if info.per_image:
            return PyiqaImageMetric(PYIQA_NAMES[name], info.needs_gt, device)
        return PyiqaSetMetric(PYIQA_NAMES[name], device)
    except MetricUnavailable as err:
        raise MetricUnavailable(name, err.reason) from err


def load_metrics(
    names: Iterable[str], device: str | torch.device = "cpu",
    factory: Callable[[str, str | torch.device], ImageMetric | SetMetric] = create_metric,
) -> tuple[dict[str, ImageMetric | SetMetric], dict[str, str]]:
    """Build every metric that can run; returns (metrics by name, reasons of unavailable ones)."""
    loaded: dict[str, ImageMetric | SetMetric] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        metric_info(name)
        try:
            loaded[name] = factory(name, device)
        except MetricUnavailable as err:
            unavailable[name] = err.reason
    return loaded, unavailable
