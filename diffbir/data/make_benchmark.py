"""Write a synthetic benchmark: center-cropped HQ images and their degraded LQ counterparts.

`OUT/hq/<stem>.png` holds the HQ crop, `OUT/lq/<stem>.png` the LQ image. `realesrgan` gives an
LQ of 1/scale the crop size; `first_order` degrades at the HQ size (paper Eq. 9) and then
resizes (area) to 1/scale (scale 1 keeps the HQ size). Each image's generator is seeded from
(seed, file name), so output does not depend on the order or the set of input files.
Images smaller than the crop are skipped with a warning.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

from diffbir.data.datasets import IMAGE_EXTENSIONS, _read_image
from diffbir.data.degradation import FirstOrderDegradation
from diffbir.data.realesrgan import RealESRGANDegradation
from diffbir.files import OutputFolderError, atomic_path, check_output_folder

logger = logging.getLogger(__name__)


def image_rng(seed: int, name: str) -> np.random.Generator:
    """Generator determined by (seed, file name)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest[:8], "little")])


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    height, width = img.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return img[top : top + size, left : left + size]


def write_png(path: Path, img: np.ndarray) -> None:
    """Write an RGB [0, 1] image as 8-bit PNG atomically (see :mod:`diffbir.files`)."""
    bgr = (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., ::-1]
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError(f"cannot encode PNG for {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def degrade_image(hq: np.ndarray, degradation: str, scale: int, rng: np.random.Generator):
    if degradation == "realesrgan":
        return RealESRGANDegradation(scale=scale).degrade(hq, rng)
    lq = FirstOrderDegradation().degrade(hq, rng)
    if scale == 1:
        return lq
    height, width = hq.shape[:2]
    return cv2.resize(lq, (width // scale, height // scale), interpolation=cv2.INTER_AREA)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffbir-make-benchmark", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input", required=True, help="folder of HQ images (searched recursively)")
    parser.add_argument("--output", required=True, help="output folder (gets hq/ and lq/)")
    parser.add_argument(
        "--degradation", choices=["realesrgan", "first_order"], default="realesrgan"
    )
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--crop", type=int, default=512, help="HQ center-crop size")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``diffbir-make-benchmark``: 0 ok, 1 unreadable images (skipped, the
    others written), 2 bad arguments, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    in_dir, out_dir = Path(args.input), Path(args.output)
    if not in_dir.is_dir():
        parser.error(f"--input: expected a folder, got {in_dir}")
    if args.scale < 1:
        parser.error(f"--scale: expected an integer >= 1, got {args.scale}")
    if args.crop < 1 or args.crop % args.scale:
        parser.error(
            f"--crop: expected a positive multiple of --scale {args.scale}, got {args.crop}"
        )
    files = sorted(
        p for p in in_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        parser.error(f"--input: no image files in {in_dir} (expected {sorted(IMAGE_EXTENSIONS)})")
    names = [p.relative_to(in_dir).with_suffix("").as_posix().replace("/", "_") for p in files]
    if len(set(names)) != len(names):
        parser.error(f"--input: image names in {in_dir} collide after dropping extensions")
    try:
        for sub in ("hq", "lq"):
            check_output_folder(out_dir / sub, "--output")
    except OutputFolderError as err:
        parser.error(str(err))
    try:
        written, failed = _write_pairs(files, names, out_dir, args)
    except KeyboardInterrupt:
        print("interrupted: the pairs written so far are kept", file=sys.stderr)
        return 130
    logger.info("wrote %d image pairs to %s (%d unreadable)", written, out_dir, failed)
    return 1 if failed else 0


def _write_pairs(
    files: list[Path], names: list[str], out_dir: Path, args: argparse.Namespace
) -> tuple[int, int]:
    written = failed = 0
    for path, name in zip(files, names, strict=True):
        try:
            hq = _read_image(path)
        except (OSError, ValueError) as err:
            logger.warning("skipping unreadable %s: %s", path, err)
            failed += 1
            continue
        if min(hq.shape[:2]) < args.crop:
            logger.warning("skipping %s: smaller than --crop %d", path, args.crop)
            continue
        hq = center_crop(hq, args.crop)
        hq = (hq * 255.0).round() / 255.0  # the LQ derives from the HQ exactly as saved
        lq = degrade_image(
            hq.astype(np.float32), args.degradation, args.scale, image_rng(args.seed, name)
        )
        write_png(out_dir / "hq" / f"{name}.png", hq)
        write_png(out_dir / "lq" / f"{name}.png", lq)
        written += 1
    return written, failed
