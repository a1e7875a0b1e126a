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
import os
from pathlib import Path

import cv2
import numpy as np

from diffbir.data.datasets import IMAGE_EXTENSIONS, _read_image
from diffbir.data.degradation import FirstOrderDegradation, RealESRGANDegradation

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
    """Write an RGB [0, 1] image as 8-bit PNG atomically (temp file, then os.replace)."""
    bgr = (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)[..., ::-1]
    ok, buf = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError(f"cannot encode PNG for {path}")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def degrade_image(hq: np.ndarray, degradation: str, scale: int, rng: np.random.Generator):
    if degradation == "realesrgan":
        return RealESRGANDegradation(scale=scale).degrade(hq, rng)
    lq = FirstOrderDegradation().degrade(hq, rng)
    if scale == 1:
        return lq
    height, width = hq.shape[:2]
    return cv2.resize(lq, (width // scale, height // scale), interpolation=cv2.INTER_AREA)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    in_dir, out_dir = Path(args.input), Path(args.output)
    if not in_dir.is_dir():
        raise SystemExit(f"--input {in_dir} is not a folder")
    if args.scale < 1 or args.crop < 1 or args.crop % args.scale:
        raise SystemExit(f"--crop {args.crop} must be a positive multiple of --scale {args.scale}")
    files = sorted(
        p for p in in_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise SystemExit(f"no images found in --input {in_dir}")
    names = [p.relative_to(in_dir).with_suffix("").as_posix().replace("/", "_") for p in files]
    if len(set(names)) != len(names):
        raise SystemExit(f"image names in {in_dir} collide after dropping extensions")
    (out_dir / "hq").mkdir(parents=True, exist_ok=True)
    (out_dir / "lq").mkdir(parents=True, exist_ok=True)
    written = 0
    for path, name in zip(files, names, strict=True):
        hq = _read_image(path)
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
    logger.info("wrote %d image pairs to %s", written, out_dir)
    return 0
