"""The official weight files: where they come from, where they are looked for, and downloading.

Weight files are looked for in a weights folder: ``$DIFFBIR_WEIGHTS_DIR`` when set, else
``weights/`` under the repository. :func:`download` fetches a file with a progress bar, resumes a
partial ``<name>.part`` file (HTTP ``Range``; local ``file://`` URLs seek) and renames it into
place only when complete.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from diffbir.checkpoint import WeightsNotFoundError
from diffbir.files import OutputFolderError, check_output_folder
from diffbir.versions import DEFAULT_VERSION, VERSIONS, get_version, versions_of_file

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_ENV = "DIFFBIR_WEIGHTS_DIR"

_HF_SD = "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main"
_HF_V2 = "https://huggingface.co/lxq007/DiffBIR-v2/resolve/main"
_HF_V1 = "https://huggingface.co/lxq007/DiffBIR/resolve/main"
_KAIR = "https://github.com/cszn/KAIR/releases/download/v1.0"
_FACEXLIB = "https://github.com/xinntao/facexlib/releases/download"


@dataclass(frozen=True)
class WeightFile:
    """One official weight file: its file name, what it is used for and its download URL."""

    name: str
    use: str
    url: str


OFFICIAL_WEIGHTS: dict[str, WeightFile] = {
    w.name: w
    for w in (
        WeightFile(
            "v2-1_512-ema-pruned.ckpt",
            "Stable Diffusion 2.1-base: UNet, VAE and text encoder of v1 and v2",
            f"{_HF_SD}/v2-1_512-ema-pruned.ckpt",
        ),
        WeightFile(
            "sd2.1-base-zsnr-laionaes5.ckpt",
            "Stable Diffusion 2.1-base, v-prediction, zero terminal SNR: UNet, VAE and text "
            "encoder of v2.1",
            f"{_HF_V2}/sd2.1-base-zsnr-laionaes5.ckpt",
        ),
        WeightFile("v2.pth", "IRControlNet v2, every task (the paper)", f"{_HF_V2}/v2.pth"),
        WeightFile(
            "DiffBIR_v2.1.pt",
            "IRControlNet v2.1, every task",
            f"{_HF_V2}/DiffBIR_v2.1.pt",
        ),
        WeightFile("v1_general.pth", "IRControlNet v1, sr and denoise", f"{_HF_V1}/v1_general.pth"),
        WeightFile("v1_face.pth", "IRControlNet v1, face", f"{_HF_V1}/v1_face.pth"),
        WeightFile("BSRNet.pth", "stage 1 of v2 sr (BSRNet, x4)", f"{_KAIR}/BSRNet.pth"),
        WeightFile(
            "scunet_color_real_psnr.pth",
            "stage 1 of v2 denoise (SCUNet, PSNR model)",
            f"{_KAIR}/scunet_color_real_psnr.pth",
        ),
        WeightFile(
            "realesrgan_s4_swinir_100k.pth",
            "stage 1 of v2.1 sr and denoise (SwinIR, Real-ESRGAN degradations)",
            f"{_HF_V2}/realesrgan_s4_swinir_100k.pth",
        ),
        WeightFile(
            "general_swinir_v1.ckpt",
            "stage 1 of v1 sr and denoise (SwinIR)",
            f"{_HF_V1}/general_swinir_v1.ckpt",
        ),
        WeightFile(
            "face_swinir_v1.ckpt",
            "stage 1 of face, every version (SwinIR)",
            f"{_HF_V1}/face_swinir_v1.ckpt",
        ),
        WeightFile(
            "detection_Resnet50_Final.pth",
            "face detector of unaligned faces, v2 and v2.1 (facexlib's RetinaFace-ResNet50)",
            f"{_FACEXLIB}/v0.1.0/detection_Resnet50_Final.pth",
        ),
        WeightFile(
            "parsing_parsenet.pth",
            "face parser of unaligned faces, v2 and v2.1 (facexlib's ParseNet)",
            f"{_FACEXLIB}/v0.2.2/parsing_parsenet.pth",
        ),
    )
}


def version_downloads(version: str) -> list[str]:
    """The official files of ``version`` (every task), as ``diffbir-download --version`` fetches."""
    return get_version(version).all_files()


class MissingWeightsError(WeightsNotFoundError):
    """One or more weight files are missing; the message lists each with its download URL."""


class DownloadError(RuntimeError):
    """A download that failed or delivered a file of the wrong size."""


def default_weights_dir() -> Path:
    """``$DIFFBIR_WEIGHTS_DIR`` when set, else ``weights/`` under the repository."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else REPO_ROOT / "weights"


def weight_path(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Where the file ``name`` is expected in the weights folder (it need not exist)."""
    return (Path(weights_dir) if weights_dir is not None else default_weights_dir()) / name


def _url_for(path: Path) -> str | None:
    entry = OFFICIAL_WEIGHTS.get(path.name)
    return entry.url if entry else None


def check_weights(paths: Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """Check that every ``{role: path}`` exists; else raise one error listing every missing file.

    For a path whose file name is an official one, the message gives its download URL.
    """
    resolved = {role: Path(p) for role, p in paths.items()}
    missing = [(role, p) for role, p in resolved.items() if not p.is_file()]
    if missing:
        lines = [f"{len(missing)} weight file(s) missing:"]
        for role, p in missing:
            url = _url_for(p)
            where = f"looked for {p.resolve()}"
            source = f"download: {url}" if url else "not an official file name: check the path"
            lines.append(f"  - {p.name} ({role}): {where}; {source}")
        lines.append(
            "Download the official files with `diffbir-download --weights-dir DIR` (or "
            "`python scripts/download_weights.py`), or pass their paths with the weight flags "
            f"(weights folder: --weights-dir or ${WEIGHTS_ENV})."
        )
        raise MissingWeightsError("\n".join(lines))
    return resolved


def find_weight(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The path of official file ``name`` in the weights folder; raises if it is not there."""
    if name not in OFFICIAL_WEIGHTS:
        raise KeyError(f"unknown weight file {name!r}; expected one of {sorted(OFFICIAL_WEIGHTS)}")
    return check_weights({name: weight_path(name, weights_dir)})[name]


def _open(url: str, offset: int, timeout: float):
    """Open ``url`` from byte ``offset``; returns (stream, resumed, total size or None)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        local = Path(urllib.request.url2pathname(parsed.path))
        if not local.is_file():
            raise DownloadError(f"{url}: no such file {local}")
        size = local.stat().st_size
        stream = local.open("rb")
        if offset > size:  # not a prefix of this file: start again
            return stream, False, size
        stream.seek(offset)
        return stream, True, size
    request = urllib.request.Request(url, headers={"User-Agent": "diffbir-download"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    response = urllib.request.urlopen(request, timeout=timeout)
    length = response.headers.get("Content-Length")
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        total = content_range.rsplit("/", 1)[-1]
        size = int(total) if total.isdigit() else None
        return response, True, size
    return response, False, int(length) if length and length.isdigit() else None


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming that partial file if present.

    An existing ``dest`` is kept as is. The ``.part`` file is renamed to ``dest`` (atomically)
    only once the byte count matches the size the server announced.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    try:
        try:
            stream, resumed, total = _open(url, offset, timeout)
        except urllib.error.HTTPError as err:
            if err.code != 416 or not offset:
                raise
            # Range not satisfiable: the partial file holds every byte, or more (then restart).
            announced = (err.headers.get("Content-Range") or "").rsplit("/", 1)[-1]
            if announced.isdigit() and int(announced) != offset:
                part.unlink()
                return download(
                    url, dest, progress=progress, timeout=timeout, chunk_size=chunk_size
                )
            stream, resumed, total = None, True, offset
        if not resumed:
            offset = 0
        if stream is not None:
            with (
                stream,
                part.open("ab" if offset else "wb") as out,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress,
                ) as bar,
            ):
                while chunk := stream.read(chunk_size):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        kept = part.is_file() and part.stat().st_size > 0
        hint = f"the partial file {part} is kept, run again to resume" if kept else "run again"
        raise DownloadError(f"{url}: download failed ({err}); {hint}") from err
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(
            f"{url}: got {size} of {total} bytes; the partial file {part} is kept, run again to "
            "resume"
        )
    os.replace(part, dest)
    return dest


def download_official(
    names: Iterable[str], weights_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> list[Path]:
    """Download official files by name into the weights folder (existing files are kept)."""
    names = list(names)
    unknown = [n for n in names if n not in OFFICIAL_WEIGHTS]
    if unknown:
        raise KeyError(
            f"unknown weight file(s) {unknown}; expected names from {sorted(OFFICIAL_WEIGHTS)}"
        )
    return [
        download(OFFICIAL_WEIGHTS[n].url, weight_path(n, weights_dir), progress=progress)
        for n in names
    ]


CAPTIONER_DOWNLOADS = ("llava", "clip-tags")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffbir-download",
        description="Download the official DiffBIR weight files (resumes partial downloads).",
    )
    parser.add_argument(
        "names",
        nargs="*",
        help="file names to fetch (default: every file of --version)",
    )
    parser.add_argument(
        "--version",
        choices=sorted(VERSIONS),
        help=f"fetch the files of this model version, every task (default: {DEFAULT_VERSION})",
    )
    parser.add_argument("--all", action="store_true", help="fetch every official file")
    parser.add_argument("--list", action="store_true", help="list the official files and exit")
    parser.add_argument(
        "--weights-dir", help=f"target folder (default: ${WEIGHTS_ENV} or weights/ in the repo)"
    )
    parser.add_argument("--base-url", help="fetch <base-url>/<name> instead (a mirror)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--captioner",
        choices=CAPTIONER_DOWNLOADS,
        help="fetch this captioner's model into the Hugging Face cache ($HF_HUB_CACHE or "
        "$HF_HOME/hub, default ~/.cache/huggingface/hub) instead of DiffBIR files (add file "
        "names, --version or --all to fetch those too); llava is about 14 GB",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffbir-download``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.names and (args.all or args.list):
        parser.error(f"{'--all' if args.all else '--list'}: takes no file names, got {args.names}")
    if args.base_url and not args.base_url.startswith(("http://", "https://", "file://")):
        parser.error(f"--base-url: expected an http(s):// or file:// URL, got {args.base_url!r}")
    weights_dir = Path(args.weights_dir) if args.weights_dir else default_weights_dir()
    if args.list:
        for w in OFFICIAL_WEIGHTS.values():
            state = "present" if (weights_dir / w.name).is_file() else "missing"
            versions = ",".join(versions_of_file(w.name))
            print(f"{w.name}\t{state}\t{versions}\t{w.use}\t{w.url}")
        return 0
    if args.names and args.version:
        print("give file names or --version, not both", file=sys.stderr)
        return 2
    if args.captioner and args.base_url:
        parser.error("--base-url: mirrors DiffBIR files only, not --captioner models")
    if args.all:
        names = list(OFFICIAL_WEIGHTS)
    elif args.captioner and not (args.names or args.version):
        names = []
    else:
        names = args.names or version_downloads(args.version or DEFAULT_VERSION)
    unknown = [n for n in names if n not in OFFICIAL_WEIGHTS]
    if unknown:
        print(
            f"unknown weight file(s): {unknown}; known: {sorted(OFFICIAL_WEIGHTS)}", file=sys.stderr
        )
        return 2
    try:
        if names:
            check_output_folder(weights_dir, "--weights-dir")
    except OutputFolderError as err:
        print(f"diffbir-download: error: {err}", file=sys.stderr)
        return 2
    progress = not args.quiet
    try:
        failed = _download_captioner(args.captioner, progress=progress) if args.captioner else 0
        if names and _download_all(names, weights_dir, args.base_url, progress=progress):
            failed = 1
        return failed
    except KeyboardInterrupt:
        print("interrupted: partial downloads are kept and resume on the next run", file=sys.stderr)
        return 130


def _download_captioner(name: str, *, progress: bool) -> int:
    """Fetch captioner ``name``'s model into the Hugging Face cache; returns 1 on failure."""
    from diffbir.captioning import CaptionerUnavailableError, hub_model
    from diffbir.captioning.hub import fetch_model

    try:
        folder = fetch_model(hub_model(name), progress=progress)
    except (DownloadError, CaptionerUnavailableError) as err:
        print(f"failed  captioner {name}: {err}", file=sys.stderr)
        return 1
    print(f"ok      captioner {name}: {folder}")
    return 0


def _download_all(
    names: list[str], weights_dir: Path, base_url: str | None, *, progress: bool
) -> int:
    failed = 0
    for name in names:
        url = OFFICIAL_WEIGHTS[name].url
        if base_url:
            url = f"{base_url.rstrip('/')}/{name}"
        try:
            path = download(url, weights_dir / name, progress=progress)
            print(f"ok      {path}")
        except DownloadError as err:
            failed += 1
            print(f"failed  {name}: {err}", file=sys.stderr)
    if failed:
        print(f"{failed} of {len(names)} download(s) failed", file=sys.stderr)
    return 1 if failed else 0
