"""What the two quirks of the official face helper change on real photos (real47 by default).

Each photo is prepared as the unaligned-face task does (PIL bicubic upscale, short side enlarged
to 512, detector input at a 640 short side) at each ``--upscales`` factor.

Eye-distance filter: on the same detections, the faces kept by the official measure
(``norm([le_y - re_y, re_x - nose_x])``) and by the real eye distance (both against the
official threshold of 5 px); every detection on which they disagree is listed.

Channel order (``--detector retinaface`` only, it needs the real weights in ``--weights-dir``):
detections with the photo given as BGR (corrected) against RGB (official): counts and the mean
IoU of matched boxes; and, on the faces kept, the parse masks of the two channel orders (IoU of
their face classes). Also: how many photos are grey (there the channel order changes nothing).

``--detector mtcnn`` is a stand-in for the official RetinaFace when its weights are not at
hand: facenet-pytorch's MTCNN, whose weights ship in its package (same five landmarks;
``pip install --no-deps facenet-pytorch==2.6.0``, as it pins another torch).

    python scripts/face_quirks.py --detector mtcnn
    python scripts/face_quirks.py --detector retinaface --weights-dir weights
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from diffbir.faces import CORRECTED, OFFICIAL, load_face_networks
from diffbir.faces.align import (
    EYE_DISTANCE_THRESHOLD,
    detector_input,
    enlarge_small,
    to_image_frame,
    upscale_photo,
)
from diffbir.faces.paste import PARSE_FACE_CLASSES
from diffbir.faces.plan import plan_faces
from diffbir.pipeline.image_io import IMAGE_EXTENSIONS

# the shared data beside the clone, else where the project's machines keep it
SHARED = next(
    (
        p
        for p in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared"))
        if p.is_dir()
    ),
    Path("shared"),
)
GREY_LEVELS = 2.0  # mean |R - G| and |G - B| below this: a grey photo


def mtcnn_detector() -> Callable[[np.ndarray], np.ndarray]:
    """facenet-pytorch's MTCNN as a detector of (N, 15) rows; it takes RGB."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as err:
        raise SystemExit(
            "--detector mtcnn needs facenet-pytorch: pip install --no-deps facenet-pytorch==2.6.0"
        ) from err
    mtcnn = MTCNN(keep_all=True, min_face_size=10, device="cpu")  # RetinaFace finds ~10 px faces

    def detect(rgb: np.ndarray) -> np.ndarray:
        boxes, scores, points = mtcnn.detect(Image.fromarray(rgb), landmarks=True)
        if boxes is None:
            return np.zeros((0, 15), np.float32)
        keep = scores > 0.9
        rows = [boxes[keep], scores[keep, None], np.asarray(points[keep]).reshape(-1, 10)]
        return np.concatenate(rows, 1).astype(np.float32)

    return detect


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (N, 4+) with every box of ``b`` (M, 4+)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def eye_filter_report(name: str, rows: np.ndarray, size: tuple[int, int]) -> tuple[int, int]:
    """Faces kept by the official and by the real eye distance; prints disagreements."""
    slip, real = OFFICIAL.eye_distance(rows), CORRECTED.eye_distance(rows)
    kept_official, kept_real = slip >= EYE_DISTANCE_THRESHOLD, real >= EYE_DISTANCE_THRESHOLD
    for i in np.flatnonzero(kept_official != kept_real):
        width = rows[i, 2] - rows[i, 0]
        print(
            f"    {name} {size[1]}x{size[0]}: detection {i} box {rows[i, :4].round().tolist()} "
            f"(width {width:.0f} px): official measure {slip[i]:.1f}, eye distance {real[i]:.1f}"
        )
    return int(kept_official.sum()), int(kept_real.sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos-dir", type=Path, default=SHARED / "data" / "real47")
    p.add_argument("--upscales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--detector", choices=["retinaface", "mtcnn"], default="retinaface")
    p.add_argument("--weights-dir", type=Path, default=None)
    args = p.parse_args()

    networks = None
    if args.detector == "retinaface":
        networks = load_face_networks(args.weights_dir)
        detect_bgr = networks[0]
    else:
        detect_rgb = mtcnn_detector()
    photos = sorted(p for p in args.photos_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    lqs = {path.name: np.asarray(Image.open(path).convert("RGB")) for path in photos}
    grey = sum(
        max(np.abs(np.diff(lq.astype(np.int16), axis=-1)).mean(axis=(0, 1))) < GREY_LEVELS
        for lq in lqs.values()
    )
    print(f"{len(lqs)} photos, {grey} grey (the channel order changes nothing there)")

    for upscale in args.upscales:
        print(f"x{upscale:g}:")
        total = kept_official = kept_real = 0
        ratios, ious, parse_ious, counts = [], [], [], np.zeros(2, int)
        for name, lq in lqs.items():
            photo = enlarge_small(upscale_photo(lq, upscale))
            det_img, scale = detector_input(photo)
            if networks is None:
                rows = to_image_frame(detect_rgb(det_img), scale)
            else:  # the corrected order (BGR) for the filter; both orders compared below
                rows = to_image_frame(detect_bgr(det_img[..., ::-1].copy()), scale)
                rgb_rows = to_image_frame(detect_bgr(det_img), scale)
                counts += (len(rows), len(rgb_rows))
                if len(rows) and len(rgb_rows):
                    iou = box_iou(rows, rgb_rows).max(1)
                    ious.extend(iou[iou > 0.5])
                plan = plan_faces(lq, upscale, lambda _img, r=rows * scale: r, CORRECTED)
                for batch in plan.crop_batches(4):
                    as_trained = networks[1](batch.crops)
                    swapped = networks[1](OFFICIAL.parser_faces(batch.crops))
                    for a, b in zip(as_trained, swapped, strict=True):
                        fa, fb = np.isin(a, PARSE_FACE_CLASSES), np.isin(b, PARSE_FACE_CLASSES)
                        parse_ious.append((fa & fb).sum() / max(1, (fa | fb).sum()))
            total += len(rows)
            ko, kr = eye_filter_report(name, rows, photo.shape[:2])
            kept_official, kept_real = kept_official + ko, kept_real + kr
            real = CORRECTED.eye_distance(rows)
            ratios.extend(OFFICIAL.eye_distance(rows)[real > 0] / real[real > 0])
        print(
            f"  detections {total}: kept by the official measure {kept_official}, by the eye "
            f"distance {kept_real}"
        )
        if ratios:
            r = np.array(ratios)
            print(
                f"  official measure / eye distance: min {r.min():.2f}, median "
                f"{np.median(r):.2f}, max {r.max():.2f}"
            )
        if networks is not None:
            print(
                f"  detections BGR (as trained) {counts[0]}, RGB (official) {counts[1]}; "
                f"matched {len(ious)}, mean IoU {np.mean(ious) if ious else float('nan'):.3f}"
            )
            if parse_ious:
                print(
                    f"  parse masks RGB (as trained) vs BGR (official), face classes: mean IoU "
                    f"{np.mean(parse_ious):.3f}, min {np.min(parse_ious):.3f} "
                    f"({len(parse_ious)} faces)"
                )


if __name__ == "__main__":
    main()
