"""Browser tests: a page served by a child process on a free local port, driven in Debian's
headless Chromium by Playwright (no browser download: Playwright gets ``executable_path``)."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

# Headless, and nothing that reaches for the network on its own: this machine's closed network
# refuses such connections, and Chromium then retries them at every start.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# Set by .ci/run when no browser can be installed on the machine; the value says why.
SKIP_ENV = "DIFFBIR_SKIP_BROWSER"
# Where screenshots go; by default a folder under pytest's temporary directory.
ARTEFACTS_ENV = "DIFFBIR_TEST_ARTEFACTS"


def chromium_executable() -> Path | None:
    """Debian's Chromium: ``$DIFFBIR_CHROMIUM``, else ``chromium`` on the PATH."""
    found = os.environ.get("DIFFBIR_CHROMIUM") or shutil.which("chromium")
    return Path(found) if found and Path(found).is_file() else None


def browser_unavailable(*modules: tuple[str, str]) -> str | None:
    """Why the browser tests cannot run here, or ``None`` when Playwright, Chromium and each
    ``(module, how to install it)`` of ``modules`` are installed. Inside CI, where .ci/run
    installs them all, a missing one is an install failure, not a reason to skip, unless
    .ci/run said it could not install a browser."""
    if os.environ.get(SKIP_ENV):
        return f"no browser on this machine: {os.environ[SKIP_ENV]}"
    needed = (("playwright", "pip install -e '.[dev]'"), *modules)
    missing = [f"the Python package {name} ({how})" for name, how in needed
               if importlib.util.find_spec(name) is None]
    if chromium_executable() is None:
        missing.append("Debian's chromium (apt-get install chromium, or set DIFFBIR_CHROMIUM)")
    if not missing:
        return None
    reason = "browser test needs " + " and ".join(missing)
    if os.environ.get("CI"):
        raise RuntimeError(f"{reason}; .ci/run installs them (or sets {SKIP_ENV} with a reason)")
    return reason


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def serve(
    command: Sequence[str], url: str, log: Path, env: dict[str, str] | None = None,
    timeout: float = 180.0, cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Start ``command`` (a server that will answer ``url``) in ``cwd``, wait until ``url``
    answers 200, and stop the process on exit, whatever happened. Its output goes to ``log``,
    whose tail is in the error when the server dies or does not answer within ``timeout``
    seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd,
        )
        try:
            deadline = time.monotonic() + timeout
            while not _answers(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer {url} in {timeout:.0f} s:\n"
                                       f"{_tail(log)}")
                time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def fetch_png(page, src: str) -> np.ndarray:
    """The pixels of the PNG that the page shows at ``src``, fetched by the test in the page's
    browser context (so the same cookies and origin) and decoded; fails if it is not a PNG, so
    that a lossy re-encoding cannot pass unnoticed."""
    response = page.request.get(src)
    assert response.ok, f"GET {src}: HTTP {response.status}"
    with Image.open(io.BytesIO(response.body())) as img:
        assert img.format == "PNG", f"{src}: served as {img.format}, expected a lossless PNG"
        return np.asarray(img)
