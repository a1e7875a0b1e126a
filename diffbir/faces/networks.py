"""The face detection and parsing networks of the official task, from ``facexlib``.

facexlib's ``RetinaFace`` (ResNet-50) and ``ParseNet(512, 512, 19)`` are built as plain modules
and loaded from the weights folder with our checkpoint reader (``weights_only=True``); facexlib's
own ``init_detection_model`` / ``init_parsing_model`` are never called, since they download into
facexlib's folder and unpickle with ``torch.load`` defaults. Building downloads nothing (facexlib
builds the ResNet-50 without pretrained weights; ``tests/test_faces.py`` checks it with the
network blocked).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffbir.checkpoint import (
    check_materialized,
    empty_parameters,
    load_weights,
    read_state_dict,
)
from diffbir.faces.align import FACE_SIZE
from diffbir.versions import FACE_HELPER_FILES
from diffbir.weights import check_weights, weight_path

# facexlib's detect_faces defaults, as the official helper calls it
DETECTION_SCORE = 0.8
DETECTION_NMS = 0.4


def build_detector(device: str | torch.device = "cpu") -> nn.Module:
    """facexlib's RetinaFace-ResNet50 with random weights, in eval mode, on ``device``."""
    from facexlib.detection.retinaface import RetinaFace

    with warnings.catch_warnings():
        # facexlib builds its backbone with torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        net = RetinaFace(network_name="resnet50", half=False, device=torch.device(device))
    return net.eval()


def _parsenet() -> nn.Module:
    from facexlib.parsing.parsenet import ParseNet

    return ParseNet(in_size=FACE_SIZE, out_size=FACE_SIZE, parsing_ch=19)


def build_parser(device: str | torch.device = "cpu") -> nn.Module:
    """facexlib's ParseNet(in_size=512, out_size=512, parsing_ch=19) with random weights."""
    return _parsenet().to(device).eval()


class RetinaFaceDetector:
    """A :data:`~diffbir.faces.plan.Detector`: facexlib's ``detect_faces`` on the network
    (score > 0.8, NMS 0.4, the input's own size), returning (N, 15) float32 rows."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            rows = self.net.detect_faces(
                image_bgr, conf_threshold=DETECTION_SCORE, nms_threshold=DETECTION_NMS
            )
        return np.asarray(rows, dtype=np.float32).reshape(-1, 15)


class ParseNetParser:
    """A :data:`~diffbir.faces.paste.Parser`: RGB uint8 faces (B, H, W, 3), 512 px in the
    task -> (B, H, W) uint8 argmax of ParseNet's 19 class logits; the input is scaled to
    [0, 1], then ``(x - 0.5) / 0.5``, in float32, as the official helper does."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, faces_rgb: np.ndarray) -> np.ndarray:
        if faces_rgb.ndim != 4 or faces_rgb.shape[3] != 3 or faces_rgb.dtype != np.uint8:
            raise ValueError(
                f"faces: expected (B, H, W, 3) uint8, got {faces_rgb.dtype} {faces_rgb.shape}"
            )
        device = next(self.net.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(faces_rgb)).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            logits = self.net((x - 0.5) / 0.5)[0]
        return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


def load_detector(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> RetinaFaceDetector:
    """The detector with the weights of ``path`` (``detection_Resnet50_Final.pth``; a
    ``module.`` prefix on every key is stripped)."""
    net = build_detector(device)
    load_weights(net, read_state_dict(path), str(path))
    return RetinaFaceDetector(net)


def load_parser(path: str | os.PathLike, device: str | torch.device = "cpu") -> ParseNetParser:
    """The parser with the weights of ``path`` (``parsing_parsenet.pth``), built without a
    random initialisation (:func:`~diffbir.checkpoint.empty_parameters`)."""
    with empty_parameters():
        net = _parsenet()
    load_weights(net, read_state_dict(path), str(path), assign=True)
    check_materialized(net, str(path))
    return ParseNetParser(net.to(device).eval())


def face_network_paths(weights_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{role: path}`` of the detector and parser files in the weights folder (roles as in
    :data:`~diffbir.versions.FACE_HELPER_FILES`); the files need not exist."""
    return {role: weight_path(name, weights_dir) for role, name in FACE_HELPER_FILES.items()}


def load_face_networks(
    weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[RetinaFaceDetector, ParseNetParser]:
    """The detector and parser from the weights folder; one
    :class:`~diffbir.weights.MissingWeightsError` lists every missing file with its address."""
    paths = check_weights(face_network_paths(weights_dir))
    return load_detector(paths["face_detector"], device), load_parser(paths["face_parser"], device)
