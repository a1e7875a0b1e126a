"""The two quirks of the official face helper, as named options (SPEC "Unaligned faces").

The official helper (DiffBIR's variant of facexlib's ``FaceRestoreHelper``) assumes BGR arrays
but is handed RGB ones, and its eye-distance filter reads the wrong landmark coordinates.
:data:`OFFICIAL` reproduces both; :data:`CORRECTED` feeds each network the channel order it was
trained on and measures the real eye distance. Every place a quirk acts reads it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The crop's fill colour as the official code writes it: meant as B, G, R.
BORDER_BGR = (135, 133, 132)


@dataclass(frozen=True)
class FaceQuirks:
    """Which official quirks to reproduce.

    ``rgb_as_bgr``: the RGB photo goes where BGR is expected: the crop border (135, 133, 132)
    lands as R=135, G=133, B=132, the detector (trained on BGR, BGR means subtracted) sees RGB,
    and the parser's BGR->RGB swap turns the RGB face into BGR for a network trained on RGB.
    ``eye_distance_slip``: the filter measures ``norm([le_y - re_y, re_x - nose_x])`` (about
    half the eye distance of a frontal face, and near 0 for some turned heads) instead of
    ``norm([le_x - re_x, le_y - re_y])``.
    """

    rgb_as_bgr: bool
    eye_distance_slip: bool

    @property
    def border_rgb(self) -> tuple[int, int, int]:
        """The crop's fill colour in the photo's (RGB) channel order."""
        return BORDER_BGR if self.rgb_as_bgr else BORDER_BGR[::-1]

    def detector_image(self, rgb: np.ndarray) -> np.ndarray:
        """What the detector receives as its BGR input, given the RGB photo."""
        return rgb if self.rgb_as_bgr else np.ascontiguousarray(rgb[..., ::-1])

    def parser_faces(self, rgb: np.ndarray) -> np.ndarray:
        """What the parser receives as its RGB input, given RGB faces (..., 3)."""
        return np.ascontiguousarray(rgb[..., ::-1]) if self.rgb_as_bgr else rgb

    def eye_distance(self, rows: np.ndarray) -> np.ndarray:
        """The "eye distance" of detection rows (N, 15) the filter compares with its threshold.

        Row layout: box x1, y1, x2, y2, score, then x, y of the left eye, right eye, nose, left
        and right mouth corners (indices 5-14).
        """
        rows = np.asarray(rows)
        if self.eye_distance_slip:
            dx, dy = rows[:, 6] - rows[:, 8], rows[:, 7] - rows[:, 9]
        else:
            dx, dy = rows[:, 5] - rows[:, 7], rows[:, 6] - rows[:, 8]
        return np.hypot(dx, dy)


OFFICIAL = FaceQuirks(rgb_as_bgr=True, eye_distance_slip=True)
CORRECTED = FaceQuirks(rgb_as_bgr=False, eye_distance_slip=False)
FACE_QUIRKS = {"official": OFFICIAL, "corrected": CORRECTED}
# The default, measured with scripts/face_quirks.py on real47 at x1, x2, x4 (MTCNN standing in
# for RetinaFace, whose weights were not at hand): the two eye-distance measures disagree on 2
# of 56 detections, both false (a shirt pattern, a castle ornament, eye distance 8.5 and
# 8.8 px), which only the official measure drops; no real face changes. The channel order cannot
# be measured without the real weights. So the official behaviour stays the default.
DEFAULT_QUIRKS = OFFICIAL
