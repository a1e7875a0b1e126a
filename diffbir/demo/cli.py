"""``diffbir-demo``: serve the web page of :mod:`diffbir.demo.page` on this machine.

The config comes from the command line exactly as ``diffbir-infer``'s does: the same generated
parser (:func:`~diffbir.pipeline.arguments.build_parser`, without the run options, which the
page decides) and :func:`~diffbir.pipeline.presets.resolve_config`; the demo adds only where it
serves. The models are loaded once, before the page is served; everything the server writes
(uploads, examples, results) goes in one temporary folder, removed when it stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffbir.demo.restore import ModelCache
from diffbir.demo.serve import DEFAULT_HOST, ShareLinkError, import_gradio, launch
from diffbir.pipeline.arguments import build_parser as config_parser
from diffbir.pipeline.arguments import invocation
from diffbir.pipeline.cli import USER_ERRORS, exit_status
from diffbir.pipeline.device import resolve_device
from diffbir.pipeline.image_io import write_png
from diffbir.pipeline.loading import plan_from_config
from diffbir.pipeline.options import InferenceConfig
from diffbir.pipeline.presets import resolve_config
from diffbir.pipeline.runner import EXIT_INTERRUPTED
from diffbir.pipeline.samples import SAMPLE_NAMES, load_sample

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DESCRIPTION = (
    "A web page that restores uploaded photos with DiffBIR: the same restorations as "
    "diffbir-infer, through the same config and runner. The options below give the page its "
    "starting values (the defaults of --version, then --config PRESET, then key=value "
    "overrides, then flags); device, precision and weight files are fixed for the server. "
    "Served on this machine only unless --host or --share say otherwise (see the README)."
)


def build_parser() -> argparse.ArgumentParser:
    """``diffbir-infer``'s config arguments, then where to serve."""
    parser = config_parser("diffbir-demo", DESCRIPTION, run_options=False)
    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0: every "
        "network this machine is on, with no login: see the README)",
    )
    server.add_argument(
        "--port", type=int, metavar="N", help="port (default: 7860, or the next free one)"
    )
    server.add_argument(
        "--share",
        action="store_true",
        help="also open a public link through Gradio's tunnel service (anyone with the link "
        "can use this machine's models)",
    )
    return parser


def write_examples(folder: Path, cfg: InferenceConfig) -> list[Path]:
    """The sample photos of ``diffbir-infer`` without ``--input`` (scikit-image's, degraded at
    the config's upscale), as PNG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLE_NAMES:
        img = load_sample(name, scale=max(cfg.restore.upscale, 1.0))
        paths.append(write_png(folder / f"{name}.png", (img * 255).round().astype(np.uint8)))
    return paths


def _stop_on_sigterm() -> None:
    """``kill`` stops the server as Ctrl-C does, so that its temporary folder is removed."""

    def handler(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve(cfg: InferenceConfig, root: Path, host: str, port: int | None, share: bool) -> None:
    """Load the models of ``cfg``, write the examples and serve the page until stopped; jobs
    and Gradio's files go under ``root``."""
    cache = ModelCache()
    device = resolve_device(cfg.device)
    print(f"loading the models of {cfg.version} (task {cfg.task}) on {device} ...", flush=True)
    cache(plan_from_config(cfg), cfg, device)
    from diffbir.demo.page import build_page

    page = build_page(cfg, root, cache, write_examples(root / "examples", cfg))
    if share or host not in LOCAL_HOSTS:
        print(
            f"warning: serving beyond this machine ({'a public link' if share else host}): "
            "anyone who reaches the page can upload files and run restorations on it; there "
            "is no login",
            file=sys.stderr,
        )
    launch(page, host=host, port=port, share=share)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffbir-demo``; returns the exit status (0 stopped, 1 weights missing
    or unreadable, or no share link, 2 bad arguments or config, 130 interrupted while
    loading)."""
    namespace = vars(build_parser().parse_intermixed_args(argv))
    _stop_on_sigterm()
    try:
        given = invocation(namespace)
        cfg, _ = resolve_config(given.preset, given.overrides, given.flags)
        parent = os.environ.get("GRADIO_TEMP_DIR")
        with tempfile.TemporaryDirectory(prefix="diffbir-demo-", dir=parent) as root:
            # Gradio keeps uploads and the files it serves there; some of its modules read
            # the variable when imported, so it is set first.
            os.environ["GRADIO_TEMP_DIR"] = str(Path(root) / "gradio")
            import_gradio()
            serve(cfg, Path(root), namespace["host"], namespace["port"], namespace["share"])
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ShareLinkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_status(err)
    return 0
