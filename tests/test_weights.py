"""Official weight registry, missing-weights message, and resumable downloads (no network)."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from diffbir import weights
from diffbir.weights import (
    OFFICIAL_WEIGHTS,
    DownloadError,
    MissingWeightsError,
    check_weights,
    download,
    find_weight,
)

PAYLOAD = bytes(range(256)) * 400  # 100 KiB


def test_registry_names_and_urls() -> None:
    expected = {
        "v2-1_512-ema-pruned.ckpt": "huggingface.co/stabilityai/stable-diffusion-2-1-base",
        "v2.pth": "huggingface.co/lxq007/DiffBIR-v2",
        "DiffBIR_v2.1.pt": "huggingface.co/lxq007/DiffBIR-v2",
        "sd2.1-base-zsnr-laionaes5.ckpt": "huggingface.co/lxq007/DiffBIR-v2",
        "realesrgan_s4_swinir_100k.pth": "huggingface.co/lxq007/DiffBIR-v2",
        "BSRNet.pth": "github.com/cszn/KAIR/releases/download/v1.0",
        "scunet_color_real_psnr.pth": "github.com/cszn/KAIR/releases/download/v1.0",
        "general_swinir_v1.ckpt": "huggingface.co/lxq007/DiffBIR/",
        "face_swinir_v1.ckpt": "huggingface.co/lxq007/DiffBIR/",
        "v1_general.pth": "huggingface.co/lxq007/DiffBIR/",
        "v1_face.pth": "huggingface.co/lxq007/DiffBIR/",
        "detection_Resnet50_Final.pth": "github.com/xinntao/facexlib/releases/download/v0.1.0",
        "parsing_parsenet.pth": "github.com/xinntao/facexlib/releases/download/v0.2.2",
    }
    assert set(OFFICIAL_WEIGHTS) == set(expected)
    for name, host in expected.items():
        url = OFFICIAL_WEIGHTS[name].url
        assert url.startswith("https://") and host in url and url.endswith("/" + name)
    readme = (weights.REPO_ROOT / "weights" / "README.md").read_text()
    for entry in OFFICIAL_WEIGHTS.values():
        assert entry.url in readme, entry.name


def test_missing_weights_lists_every_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "v2.pth").write_bytes(b"x")
    monkeypatch.setenv("DIFFBIR_WEIGHTS_DIR", str(tmp_path))
    assert find_weight("v2.pth") == tmp_path / "v2.pth"
    with pytest.raises(MissingWeightsError) as info:
        check_weights(
            {
                "sd": tmp_path / "v2-1_512-ema-pruned.ckpt",
                "controlnet": tmp_path / "v2.pth",
                "stage 1": tmp_path / "BSRNet.pth",
                "custom": tmp_path / "mine.pth",
            }
        )
    msg = str(info.value)
    assert msg.startswith("3 weight file(s) missing")
    for name in ("v2-1_512-ema-pruned.ckpt", "BSRNet.pth"):
        assert str((tmp_path / name).resolve()) in msg and OFFICIAL_WEIGHTS[name].url in msg
    assert "mine.pth" in msg and "v2.pth (" not in msg
    with pytest.raises(KeyError, match="unknown weight file"):
        find_weight("nope.pth")


def test_download_file_url_and_resume(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    dest = tmp_path / "w" / "file.bin"
    assert download(src.as_uri(), dest, progress=False).read_bytes() == PAYLOAD

    # A partial file is resumed, not restarted: its (marked) bytes are kept.
    dest2 = tmp_path / "w" / "file2.bin"
    part = dest2.with_name("file2.bin.part")
    part.write_bytes(b"\xff" * 1000)
    download(src.as_uri(), dest2, progress=False)
    assert dest2.read_bytes() == b"\xff" * 1000 + PAYLOAD[1000:]
    assert not part.exists()
    long_part = dest2.with_name("x.bin.part")
    long_part.write_bytes(b"x" * (len(PAYLOAD) + 1))  # longer than the file: fetched again
    assert download(src.as_uri(), dest2.with_name("x.bin"), progress=False).read_bytes() == PAYLOAD
    assert not long_part.exists()

    with pytest.raises(DownloadError, match="no such file") as err:
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "w" / "m.bin", progress=False)
    assert not (tmp_path / "w" / "m.bin").exists()
    assert "partial file" not in str(err.value)  # nothing was fetched, nothing is kept


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (``truncate`` limits the body of full responses)."""

    truncate: int | None = None
    seen_ranges: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        header = self.headers.get("Range")
        self.seen_ranges.append(header or "")
        if header:
            start = int(re.match(r"bytes=(\d+)-", header).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: self.truncate] if self.truncate and not header else body)


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "srv"
    root.mkdir()
    (root / "v2.pth").write_bytes(PAYLOAD)
    _RangeHandler.seen_ranges = []
    _RangeHandler.truncate = None
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_RangeHandler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_http_interrupted_then_resumed(tmp_path: Path, server: str) -> None:
    dest = tmp_path / "w" / "v2.pth"
    _RangeHandler.truncate = 30_000  # the connection drops after 30 kB
    with pytest.raises(DownloadError, match="run again to resume"):
        download(f"{server}/v2.pth", dest, progress=False, timeout=5)
    part = dest.with_name("v2.pth.part")
    assert not dest.exists() and part.stat().st_size == 30_000
    _RangeHandler.truncate = None
    download(f"{server}/v2.pth", dest, progress=False, timeout=5)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert _RangeHandler.seen_ranges[-1] == "bytes=30000-"

    # A complete .part (server answers 416) is just renamed.
    dest3 = tmp_path / "w3" / "v2.pth"
    dest3.parent.mkdir()
    dest3.with_name("v2.pth.part").write_bytes(PAYLOAD)
    assert download(f"{server}/v2.pth", dest3, progress=False).read_bytes() == PAYLOAD

    # A .part longer than the file (another file's bytes) is discarded and fetched again.
    dest4 = tmp_path / "w4" / "v2.pth"
    dest4.parent.mkdir()
    dest4.with_name("v2.pth.part").write_bytes(b"x" * (len(PAYLOAD) + 10))
    assert download(f"{server}/v2.pth", dest4, progress=False).read_bytes() == PAYLOAD


def test_download_cli(tmp_path: Path, server: str, capsys) -> None:
    target = tmp_path / "weights"
    assert weights.main(["--list", "--weights-dir", str(target)]) == 0
    assert "v2.pth\tmissing" in capsys.readouterr().out
    args = ["v2.pth", "--weights-dir", str(target), "--base-url", server, "--quiet"]
    assert weights.main(args) == 0
    assert (target / "v2.pth").read_bytes() == PAYLOAD
    assert weights.main(["BSRNet.pth", *args[1:]]) == 1  # 404 on the mirror
    assert "failed" in capsys.readouterr().err
    assert weights.main(["nope.pth", "--weights-dir", str(target)]) == 2
