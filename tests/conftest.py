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
