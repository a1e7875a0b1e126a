"""Shared fixtures: the parity fixture folder, the reference tolerance, one torch thread."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# The read-only shared data: $DIFFBIR_SHARED, else ../shared next to the clone, else /work/shared
# (where the project's machines keep it), so that a clone anywhere finds it.
SHARED = Path(
    os.environ.get("DIFFBIR_SHARED")
    or next(
        (p for p in (REPO_ROOT.parent / "shared", Path("/work/shared")) if p.is_dir()),
        REPO_ROOT.parent / "shared",
    )
)


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """The suite runs tiny models: one intra-op thread is as fast, and it does not stall when
    another process holds one of a small machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _parity_dir() -> Path:
    return Path(os.environ.get("DIFFBIR_PARITY_DIR", SHARED / "parity"))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    path = _parity_dir()
    if not (path / "refs.pt").is_file():
        pytest.fail(f"parity fixtures not found in {path} (set DIFFBIR_PARITY_DIR)")
    return path


@pytest.fixture(scope="session")
def refs(parity_dir: Path) -> dict:
    return torch.load(parity_dir / "refs.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def hparams(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "hparams.json").read_text())


@pytest.fixture(scope="session")
def real47_dir() -> Path:
    path = SHARED / "data" / "real47"
    if not path.is_dir():
        pytest.fail(f"real47 images not found in {path}")
    return path


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    return SHARED / "checkpoints"


def read_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from a ``checkpoints/*.tsv`` manifest."""
    shapes = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        shapes[key] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
    return shapes


def assert_close_ref(ours: torch.Tensor, ref: torch.Tensor, name: str = "") -> None:
    """SPEC tolerance: max|ours - ref| <= 1e-4 * max(1, max|ref|)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"{name}: max abs error {err:.3e} > tolerance {tol:.3e}"


# ------------------------------------------- official file names holding the tiny parity models

# official file name -> (parity file it holds, format); formats as the official files are stored
OFFICIAL_TINY = {
    "v2-1_512-ema-pruned.ckpt": ("sd.ckpt", "wrapped"),
    "sd2.1-base-zsnr-laionaes5.ckpt": ("sd.ckpt", "wrapped"),
    "v1_general.pth": ("controlnet.pth", "flat"),
    "v1_face.pth": ("controlnet.pth", "flat"),
    "v2.pth": ("controlnet.pth", "flat"),
    "DiffBIR_v2.1.pt": ("controlnet.pth", "flat"),
    "general_swinir_v1.ckpt": ("swinir.ckpt", "module"),
    "face_swinir_v1.ckpt": ("swinir.ckpt", "module"),
    "realesrgan_s4_swinir_100k.pth": ("swinir.ckpt", "flat"),
    "BSRNet.pth": ("bsrnet.pth", "flat"),
    "scunet_color_real_psnr.pth": ("scunet.pth", "flat"),
}
MARKER_KEY = {
    "sd.ckpt": "model.diffusion_model.out.2.bias",
    "controlnet.pth": "middle_block_out.0.bias",
    "swinir.ckpt": "conv_last.bias",
    "bsrnet.pth": "conv_last.bias",
    "scunet.pth": "m_tail.0.weight",
}


def marker(name: str) -> float:
    """The value that the tiny file saved under official ``name`` holds in its marker tensor."""
    return 0.01 * (1 + sorted(OFFICIAL_TINY).index(name))


@pytest.fixture(scope="session")
def official_tiny_dir(tmp_path_factory, parity_dir: Path) -> Path:
    """The tiny parity models under every official file name, in the official formats, each file
    told apart by a marker tensor filled with :func:`marker` (see ``MARKER_KEY``)."""
    from diffbir.checkpoint import read_state_dict

    root = tmp_path_factory.mktemp("official_tiny")
    for name, (source, fmt) in OFFICIAL_TINY.items():
        sd = read_state_dict(parity_dir / source)
        key = MARKER_KEY[source]
        sd[key] = torch.full_like(sd[key], marker(name))
        if fmt == "wrapped":
            torch.save({"state_dict": sd, "global_step": 0}, root / name)
        elif fmt == "module":
            torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / name)
        else:
            torch.save(sd, root / name)
    return root


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    """``configs/`` with the tiny model configs under the full-size names (control_ldm, swinir,
    bsrnet, scunet), so that the official selection path builds tiny models."""
    from diffbir import config

    root = tmp_path_factory.mktemp("configs")
    (root / "model").mkdir()
    for name in ("control_ldm", "swinir", "bsrnet", "scunet"):
        text = (config.CONFIG_ROOT / "model" / f"{name}_tiny.yaml").read_text()
        (root / "model" / f"{name}.yaml").write_text(text)
    for group in ("inference", "train"):
        (root / group).symlink_to(config.CONFIG_ROOT / group)
    patch = pytest.MonkeyPatch()
    patch.setattr(config, "CONFIG_ROOT", root)
    yield root
    patch.undo()


# ------------------------------------------------------------- headless Chromium (tests/browser.py)


@pytest.fixture(scope="session")
def artefacts_dir(tmp_path_factory) -> Path:
    """Where tests leave files for a person to look at (screenshots): ``$DIFFBIR_TEST_ARTEFACTS``,
    else ``artefacts/`` under pytest's temporary directory."""
    from browser import ARTEFACTS_ENV

    given = os.environ.get(ARTEFACTS_ENV)
    path = Path(given) if given else tmp_path_factory.getbasetemp() / "artefacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def chromium():
    """One headless Debian Chromium per test module (not left idle for the rest of the suite),
    driven by Playwright; skipped, with the reason, only where no browser is installed (see
    ``browser.browser_unavailable``). The pages of these tests are Gradio's, so the demo extra
    counts as part of the browser."""
    from browser import CHROMIUM_FLAGS, browser_unavailable, chromium_executable

    reason = browser_unavailable(("gradio", "pip install -e '.[demo]'"))
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # Playwright gives each launch a new empty profile (its own --user-data-dir).
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(chromium_executable()), args=list(CHROMIUM_FLAGS), headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(chromium, artefacts_dir: Path, request):
    """A page in a fresh browser context (its own cookies, so its own Gradio session). At the
    end, failed or not, a full-page screenshot is saved under ``artefacts_dir`` (its path is
    printed after the results); the context is closed whatever happened."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        shot = artefacts_dir / (request.node.name.replace("/", "_") + ".png")
        try:
            page.screenshot(path=str(shot), full_page=True)
            request.node.user_properties.append((SCREENSHOT, str(shot)))
        finally:
            context.close()


SCREENSHOT = "screenshot"  # a test report's property: a screenshot's path


def pytest_terminal_summary(terminalreporter) -> None:
    """The paths of the screenshots taken, after the results (a test's own output is captured).
    They travel with the test reports, so a run over several workers (``-n``) lists them too."""
    shots = dict.fromkeys(
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        for key, value in getattr(report, "user_properties", ())
        if key == SCREENSHOT
    )
    if shots:
        terminalreporter.write_sep("-", "browser test screenshots")
        for shot in shots:
            terminalreporter.write_line(shot)
