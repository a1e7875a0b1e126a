"""Geometry of the official face helper: photo sizes, detections, alignment and its inverse.

Facts from SPEC "Unaligned faces" (DiffBIR's own variant of facexlib's ``FaceRestoreHelper``,
``upscale_factor=1``, ``face_size=512``). Images are (H, W, 3) uint8 arrays; OpenCV does every
resize and warp, as the official code does (its 8-bit resizes and warps are fixed-point, so
another library would give other pixels).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

FACE_SIZE = 512
# The five landmarks (left eye, right eye, nose, left and right mouth corners) of an aligned
# 512x512 FFHQ face.
FACE_TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ]
)
MIN_SIDE = 512  # photos with a shorter short side are enlarged to it before anything else
DETECTOR_SIDE = 640  # the detector sees the photo enlarged to this short side (never shrunk)
EYE_DISTANCE_THRESHOLD = 5.0  # faces below it are dropped (see FaceQuirks.eye_distance)


def check_photo(img: np.ndarray, name: str = "photo") -> None:
    """Raise a ValueError unless ``img`` is an (H, W, 3) uint8 array (RGB)."""
    fits = (
        isinstance(img, np.ndarray)
        and img.dtype == np.uint8
        and img.ndim == 3
        and img.shape[2] == 3
        and min(img.shape[:2]) >= 1
    )
    if not fits:
        got = type(img).__name__
        if isinstance(img, np.ndarray):
            got = f"{img.dtype} array of shape {img.shape}"
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 RGB array, got {got}")


def upscale_photo(lq: np.ndarray, upscale: float) -> np.ndarray:
    """The official loop's first step: PIL bicubic to ``int(upscale * size)`` per side."""
    height, width = lq.shape[:2]
    size = (int(width * upscale), int(height * upscale))
    if size == (width, height):
        return lq.copy()
    return np.asarray(Image.fromarray(lq).resize(size, Image.BICUBIC))


def enlarge_small(img: np.ndarray) -> np.ndarray:
    """The helper's ``read_image``: a short side below 512 is enlarged to 512 by
    ``cv2.resize(fx=f, fy=f)`` (linear), f = 512 / short side; other photos are unchanged.

    Passing the factor, not the size, matters: OpenCV then maps pixels with 1/f, not with the
    ratio of the rounded sizes.
    """
    short = min(img.shape[:2])
    if short >= MIN_SIDE:
        return img
    f = MIN_SIDE / short
    return cv2.resize(img, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_LINEAR)


def detector_scale(height: int, width: int) -> float:
    """The factor the detector input is enlarged by: ``max(1, 640 / short side)``."""
    return max(1.0, DETECTOR_SIDE / min(height, width))


def detector_input(img: np.ndarray) -> tuple[np.ndarray, float]:
    """The image the detector runs on (linear resize to ``int(w * s), int(h * s)``) and ``s``."""
    height, width = img.shape[:2]
    scale = detector_scale(height, width)
    size = (int(width * scale), int(height * scale))
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR), scale


def to_image_frame(rows: np.ndarray, scale: float) -> np.ndarray:
    """Detection rows of the detector input -> the photo's frame: all 15 values (the score
    too, as the official code does) divided by ``scale``, in float32."""
    return np.asarray(rows, dtype=np.float32).reshape(-1, 15) / np.float32(scale)


def landmarks_of(rows: np.ndarray) -> np.ndarray:
    """The five (x, y) landmarks of each detection row: (N, 15) -> (N, 5, 2)."""
    return np.asarray(rows)[:, 5:15].reshape(-1, 5, 2)


def align_matrix(landmarks: np.ndarray) -> np.ndarray | None:
    """The 2x3 similarity mapping the landmarks onto :data:`FACE_TEMPLATE`, as the official:
    ``cv2.estimateAffinePartial2D(..., method=cv2.LMEDS)``; ``None`` when it cannot be estimated
    (degenerate landmarks)."""
    if not np.isfinite(landmarks).all():
        return None
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(landmarks, dtype=np.float32), FACE_TEMPLATE, method=cv2.LMEDS
    )
    if matrix is None or not np.isfinite(matrix).all():
        return None
    return matrix


def crop_face(img: np.ndarray, matrix: np.ndarray, border: tuple[int, int, int]) -> np.ndarray:
    """The aligned 512x512 face: linear warp, the outside filled with ``border``."""
    return cv2.warpAffine(
        img,
        matrix,
        (FACE_SIZE, FACE_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=border,
    )


def inverse_matrix(matrix: np.ndarray) -> np.ndarray:
    """The face -> photo affine (``cv2.invertAffineTransform``; the official's 0.5 px offset
    applies only to an upscale factor > 1, never in this task)."""
    return cv2.invertAffineTransform(matrix)
