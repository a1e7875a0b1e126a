"""The per-photo plan of the unaligned-face task: which faces, where, and how they are cropped.

:func:`plan_faces` does what the official loop does before any restoration: the photo is
upscaled (PIL bicubic), enlarged to a 512 short side if smaller, faces are detected on a copy
enlarged to a 640 short side, faces with a small eye distance are dropped, and each kept face
gets the affine that aligns it to the FFHQ template. Crops are made on demand
(:meth:`FacePlan.crop_batches`), so that a photo with hundreds of faces never holds them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from diffbir.faces.align import (
    EYE_DISTANCE_THRESHOLD,
    FACE_SIZE,
    align_matrix,
    check_photo,
    crop_face,
    detector_input,
    enlarge_small,
    inverse_matrix,
    landmarks_of,
    to_image_frame,
    upscale_photo,
)
from diffbir.faces.quirks import FaceQuirks

# A face detector: the detector input (H, W, 3) uint8, in the channel order it treats as BGR
# -> (N, 15) rows in that image's pixels: box x1, y1, x2, y2, score, five landmarks (x, y).
Detector = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PlannedFace:
    """One kept face: ``detection`` is its row in the detector's output; ``box`` (x1, y1, x2,
    y2, score) and ``landmarks`` (5, 2) are in the photo's pixels (float32); ``affine`` maps the
    photo onto the 512x512 aligned face, ``inverse`` back."""

    detection: int
    box: np.ndarray
    landmarks: np.ndarray
    affine: np.ndarray
    inverse: np.ndarray


@dataclass(frozen=True)
class FaceBatch:
    """Consecutive faces ``start:start + len(crops)`` of a plan and their aligned crops
    (B, 512, 512, 3) uint8 RGB."""

    start: int
    crops: np.ndarray

    @property
    def indices(self) -> range:
        return range(self.start, self.start + len(self.crops))


@dataclass(frozen=True)
class FacePlan:
    """What one photo's faces are, before restoration.

    ``photo``: the upscaled photo enlarged to a 512 short side (RGB uint8): faces are found,
    cropped and pasted in its pixels, and the result has its size. ``background_size``: the
    (H, W) of the upscaled photo, the size the whole photo is restored to (as the sr task);
    the paste resizes it to ``photo``'s size. ``detections``: rows the detector returned;
    ``too_small`` and ``degenerate``: the rows dropped by the eye-distance filter and those
    whose landmarks admit no alignment.
    """

    photo: np.ndarray
    background_size: tuple[int, int]
    faces: tuple[PlannedFace, ...]
    quirks: FaceQuirks
    detections: int
    too_small: tuple[int, ...] = ()
    degenerate: tuple[int, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of ``photo`` and of the pasted result."""
        return self.photo.shape[0], self.photo.shape[1]

    def crop(self, index: int) -> np.ndarray:
        """The aligned 512x512 crop of face ``index`` (RGB uint8)."""
        return crop_face(self.photo, self.faces[index].affine, self.quirks.border_rgb)

    def crop_batches(self, batch_size: int) -> Iterator[FaceBatch]:
        """The crops in detection order, ``batch_size`` at a time, each made when asked for."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        for start in range(0, len(self.faces), batch_size):
            # no local name keeps a batch: it is freed once the caller drops it
            yield FaceBatch(start, self._crops(start, min(start + batch_size, len(self.faces))))

    def _crops(self, start: int, stop: int) -> np.ndarray:
        crops = np.empty((stop - start, FACE_SIZE, FACE_SIZE, 3), np.uint8)
        for i in range(start, stop):
            crops[i - start] = self.crop(i)
        return crops


def plan_faces(lq: np.ndarray, upscale: float, detect: Detector, quirks: FaceQuirks) -> FacePlan:
    """The plan of photo ``lq`` (RGB uint8) restored at ``upscale``, faces found by ``detect``."""
    check_photo(lq, "photo")
    if not upscale > 0:
        raise ValueError(f"upscale: expected a number > 0, got {upscale}")
    upscaled = upscale_photo(lq, upscale)
    photo = enlarge_small(upscaled)
    det_img, scale = detector_input(photo)
    raw = np.asarray(detect(quirks.detector_image(det_img)))
    if raw.size and (raw.ndim != 2 or raw.shape[1] != 15):
        raise ValueError(f"face detector: expected (N, 15) rows, got an array of shape {raw.shape}")
    rows = to_image_frame(raw, scale)
    small = quirks.eye_distance(rows) < EYE_DISTANCE_THRESHOLD
    faces, degenerate = [], []
    for i in np.flatnonzero(~small):
        landmarks = landmarks_of(rows[i : i + 1])[0]
        affine = align_matrix(landmarks)
        if affine is None:
            degenerate.append(int(i))
            continue
        faces.append(PlannedFace(int(i), rows[i, :5], landmarks, affine, inverse_matrix(affine)))
    return FacePlan(
        photo=photo,
        background_size=upscaled.shape[:2],
        faces=tuple(faces),
        quirks=quirks,
        detections=len(rows),
        too_small=tuple(int(i) for i in np.flatnonzero(small)),
        degenerate=tuple(degenerate),
    )
