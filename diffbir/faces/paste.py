"""Pasting restored faces back onto the restored photo, as the official helper does.

Per face, in detection order (SPEC "Unaligned faces"): the face is warped back with the inverse
affine; a square mask (the warped 512x512 ones, eroded 2x2, then eroded by 2*w_edge and blurred
with a (2*w_edge+1)^2 Gaussian, w_edge = int(sqrt(area)) // 20) is limited by the parse mask
(face classes of the parsing network, blurred twice, frame of 10 px cleared, warped back); the
photo becomes ``m * face + (1 - m) * photo`` in float64, truncated to uint8 once at the end.

Every per-face step works on a band of full-width rows around the face's footprint instead of the
whole photo: outside the footprint the official masks are 0 and the photo is unchanged, and
full-width rows keep OpenCV's per-pixel source coordinates exactly as in a whole-photo warp (a
column offset would change their fixed-point rounding). Memory and time per face are those of
its band; only the float64 photo lives as long as the paste.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from diffbir.faces.align import FACE_SIZE, check_photo
from diffbir.faces.plan import FacePlan

# A face parser: restored faces (B, 512, 512, 3) uint8 in the channel order it treats as RGB
# -> the argmax over its 19 classes (B, 512, 512).
Parser = Callable[[np.ndarray], np.ndarray]

# Parsing classes (19, CelebAMask-HQ order) kept as face: all but background (0), neck (14),
# cloth (16), hair (17) and hat (18).
PARSE_FACE_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
_PARSE_BLUR = ((101, 101), 11)  # kernel, sigma; applied twice
_PARSE_FRAME = 10  # pixels cleared along each edge of the blurred parse mask
# homogeneous corners of the 512x512 face, one pixel out (linear interpolation reaches that far)
_CORNERS = np.array([[x, y, 1] for x in (-1, FACE_SIZE) for y in (-1, FACE_SIZE)], np.float64)


@dataclass(frozen=True)
class Band:
    """Rows ``top:bottom`` of the photo (all columns) where a face's masks can be non-zero."""

    top: int
    bottom: int

    @property
    def rows(self) -> slice:
        return slice(self.top, self.bottom)


def face_band(inverse: np.ndarray, height: int) -> Band:
    """The rows a pasted face can touch, with room for the erosion and blur of its soft mask.

    The warped 512x512 square is non-zero within one pixel of its corners' images; the soft
    mask's erosion and blur reach at most 3 * w_edge + 2 rows further (w_edge bounded from the
    square's area).
    """
    ys = _CORNERS @ inverse[1]
    area = (FACE_SIZE + 2) ** 2 * abs(np.linalg.det(inverse[:, :2]))
    reach = 3 * (int(math.sqrt(area)) // 20 + 1) + 4
    top = min(max(0, math.floor(ys.min()) - reach), height - 1)
    bottom = max(min(height, math.ceil(ys.max()) + 1 + reach), top + 1)
    return Band(top, bottom)


def _in_band(inverse: np.ndarray, band: Band) -> np.ndarray:
    """The inverse affine with the band's first row as row 0."""
    shifted = inverse.copy()
    shifted[1, 2] -= band.top
    return shifted


def _warp_back(src: np.ndarray, inverse: np.ndarray, band: Band, width: int) -> np.ndarray:
    return cv2.warpAffine(
        src, _in_band(inverse, band), (width, band.bottom - band.top), flags=cv2.INTER_LINEAR
    )


@dataclass(frozen=True)
class FaceMasks:
    """The masks of one pasted face on its band: ``coverage`` is the warped square eroded 2x2
    (it scales the face), ``soft`` the official ``inv_soft_mask``, ``parse`` the warped parse
    mask (float64) and ``blend`` their minimum."""

    band: Band
    coverage: np.ndarray
    soft: np.ndarray
    w_edge: int
    parse: np.ndarray
    blend: np.ndarray


def soft_square_mask(coverage: np.ndarray) -> tuple[np.ndarray, int]:
    """The official soft square mask of a face's eroded coverage, and its ``w_edge``."""
    w_edge = int(float(np.sum(coverage)) ** 0.5) // 20
    # an empty kernel (w_edge 0) is what the official passes; OpenCV erodes with 3x3 then
    kernel = np.ones((2 * w_edge, 2 * w_edge) if w_edge else (3, 3), np.uint8)
    center = cv2.erode(coverage, kernel)
    return cv2.GaussianBlur(center, (2 * w_edge + 1, 2 * w_edge + 1), 0), w_edge


def face_parse_mask(parse_argmax: np.ndarray) -> np.ndarray:
    """The 512x512 float64 parse mask in [0, 1] of a parsing argmax (512, 512)."""
    if parse_argmax.shape != (FACE_SIZE, FACE_SIZE):
        raise ValueError(
            f"parse_argmax: expected shape {(FACE_SIZE, FACE_SIZE)}, got {parse_argmax.shape}"
        )
    mask = np.where(np.isin(parse_argmax, PARSE_FACE_CLASSES), 255.0, 0.0)
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, *_PARSE_BLUR)
    mask[:_PARSE_FRAME] = 0
    mask[-_PARSE_FRAME:] = 0
    mask[:, :_PARSE_FRAME] = 0
    mask[:, -_PARSE_FRAME:] = 0
    return mask / 255.0


def face_masks(
    inverse: np.ndarray, photo_size: tuple[int, int], parse_mask: np.ndarray
) -> FaceMasks:
    """Every mask of one face pasted with ``inverse`` onto a photo of ``photo_size`` (H, W);
    ``parse_mask``: the face's 512x512 mask from :func:`face_parse_mask`."""
    height, width = photo_size
    band = face_band(inverse, height)
    ones = np.ones((FACE_SIZE, FACE_SIZE), np.float32)
    coverage = cv2.erode(_warp_back(ones, inverse, band, width), np.ones((2, 2), np.uint8))
    soft, w_edge = soft_square_mask(coverage)
    parse = _warp_back(parse_mask, inverse, band, width)
    return FaceMasks(band, coverage, soft, w_edge, parse, np.minimum(parse, soft))


def resize_background(background: np.ndarray, photo_size: tuple[int, int]) -> np.ndarray:
    """The restored background at the photo's size (Lanczos-4; unchanged when equal)."""
    height, width = photo_size
    if background.shape[:2] == (height, width):
        return background
    return cv2.resize(background, (width, height), interpolation=cv2.INTER_LANCZOS4)


class FacePaster:
    """Pastes the restored faces of one plan onto its restored background, in detection order.

    ``background``: the whole photo restored (any size; resized to the plan's photo size).
    ``parse``: the parsing network as a :data:`Parser`, unless every :meth:`paste` call gives
    the parse argmax itself. Call :meth:`paste` with consecutive batches of restored faces, then
    :meth:`result`. Between batches only the float64 photo is kept.
    """

    def __init__(self, plan: FacePlan, background: np.ndarray, parse: Parser | None = None) -> None:
        check_photo(background, "restored background")
        self.plan = plan
        self.pasted = 0
        self._parse = parse
        self._canvas = resize_background(background, plan.size).astype(np.float64)

    def paste(self, faces: np.ndarray, parse_argmax: np.ndarray | None = None) -> None:
        """Blend in the next ``len(faces)`` restored faces, (B, 512, 512, 3) RGB uint8; their
        parse argmax (B, 512, 512) is computed by ``parse`` when not given."""
        count = len(faces)
        if faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or faces.dtype != np.uint8:
            raise ValueError(
                f"restored faces: expected a (B, {FACE_SIZE}, {FACE_SIZE}, 3) uint8 array, got "
                f"{faces.dtype} {faces.shape}"
            )
        if self.pasted + count > len(self.plan.faces):
            raise ValueError(
                f"restored faces: the plan has {len(self.plan.faces)} faces, "
                f"{self.pasted} pasted, got {count} more"
            )
        if parse_argmax is None:
            if self._parse is None:
                raise ValueError("parse_argmax: required when the paster has no parser")
            parse_argmax = self._parse(self.plan.quirks.parser_faces(faces))
        if len(parse_argmax) != count:
            raise ValueError(f"parse_argmax: expected {count} maps, got {len(parse_argmax)}")
        height, width = self.plan.size
        for face, argmax in zip(faces, parse_argmax, strict=True):
            inverse = self.plan.faces[self.pasted].inverse
            masks = face_masks(inverse, (height, width), face_parse_mask(np.asarray(argmax)))
            rows = masks.band.rows
            face_part = masks.coverage[:, :, None] * _warp_back(face, inverse, masks.band, width)
            m = masks.blend[:, :, None]
            self._canvas[rows] = m * face_part + (1 - m) * self._canvas[rows]
            self.pasted += 1

    def result(self) -> np.ndarray:
        """The photo with every face pasted, truncated to uint8 as the official does."""
        if self.pasted != len(self.plan.faces):
            raise RuntimeError(f"{self.pasted} of {len(self.plan.faces)} faces pasted")
        return self._canvas.astype(np.uint8)
