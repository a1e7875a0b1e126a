"""Faces in whole photos (the official ``--task unaligned_face``): find, align, paste back.

The machinery the runner calls for one photo, with no knowledge of files or flags::

    detector, parser = load_face_networks(weights_dir, device)
    plan = plan_faces(lq, upscale, detector, DEFAULT_QUIRKS)   # faces, crops' affines
    paster = FacePaster(plan, restored_background, parser)     # background: the sr restoration
    for batch in plan.crop_batches(8):                         # crops made when asked for
        paster.paste(restore_faces(batch.crops))               # in detection order
    photo = paster.result()                                    # plan.size, uint8 RGB

``plan.faces`` empty: the result is the background at the plan's size ("0 faces").
"""

from diffbir.faces.align import FACE_SIZE, FACE_TEMPLATE
from diffbir.faces.networks import (
    ParseNetParser,
    RetinaFaceDetector,
    build_detector,
    build_parser,
    face_network_paths,
    load_detector,
    load_face_networks,
    load_parser,
)
from diffbir.faces.paste import FaceMasks, FacePaster, Parser, face_masks
from diffbir.faces.plan import Detector, FaceBatch, FacePlan, PlannedFace, plan_faces
from diffbir.faces.quirks import CORRECTED, DEFAULT_QUIRKS, FACE_QUIRKS, OFFICIAL, FaceQuirks

__all__ = [
    "CORRECTED",
    "DEFAULT_QUIRKS",
    "FACE_QUIRKS",
    "FACE_SIZE",
    "FACE_TEMPLATE",
    "OFFICIAL",
    "Detector",
    "FaceBatch",
    "FaceMasks",
    "FacePaster",
    "FacePlan",
    "FaceQuirks",
    "ParseNetParser",
    "Parser",
    "PlannedFace",
    "RetinaFaceDetector",
    "build_detector",
    "build_parser",
    "face_masks",
    "face_network_paths",
    "load_detector",
    "load_face_networks",
    "load_parser",
    "plan_faces",
]
