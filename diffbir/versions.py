"""The official DiffBIR model versions: which files, schedule, stage 1 and defaults each uses.

One table (:data:`VERSIONS`) holds every per-version fact (SPEC, "Model families and samplers");
weight loading, ``diffbir-download``, the inference presets and the wrong-version check read it.
The architectures are the same for every version; only files, schedule and stage 1 differ.
``custom`` is our own training: its files and schedule come from a training config
(:func:`custom_version`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from diffbir.diffusion.schedule import Parameterization

UNALIGNED_FACE = "unaligned_face"
TASKS = ("sr", "denoise", "face", UNALIGNED_FACE, "custom")
# output size / input size when --upscale is not given (unaligned_face: the official README's)
DEFAULT_UPSCALE: Mapping[str, float] = MappingProxyType(
    {"sr": 4.0, "denoise": 1.0, "face": 1.0, UNALIGNED_FACE: 2.0, "custom": 1.0}
)

V2_POS_PROMPT = ""
V2_NEG_PROMPT = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"
V21_POS_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed "
    "photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous "
    "detailing, skin pore detailing, hyper sharpness, perfect without deformations."
)
V21_NEG_PROMPT = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, CG Style, "
    "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, "
    "watermark, signature, jpeg artifacts, deformed, lowres, over-smooth."
)


@dataclass(frozen=True)
class Stage1Spec:
    """A stage-1 model: its config (``configs/model``), its official file and the size rule.

    ``resize_first``: the LQ image is resized to the output size before the model (same-size
    cleaners: SwinIR, SCUNet); otherwise the model's output is resized (BSRNet, x4).
    ``enlarge_first``: a short side below 512 is enlarged before the model (SwinIR) rather than
    after it (see :class:`~diffbir.pipeline.restorer.Stage1`).
    """

    config: str
    file: str
    resize_first: bool
    enlarge_first: bool = False


# The face detection and parsing networks of the unaligned-face task (facexlib's files), by role.
FACE_HELPER_FILES: Mapping[str, str] = MappingProxyType(
    {"face_detector": "detection_Resnet50_Final.pth", "face_parser": "parsing_parsenet.pth"}
)

SWINIR_FACE = Stage1Spec("swinir", "face_swinir_v1.ckpt", resize_first=True, enlarge_first=True)


def whole_image_task(task: str) -> str:
    """The task whose models restore the whole input of ``task``: the unaligned-face task
    restores the whole photo as the version's sr task (and each face as its face task)."""
    return "sr" if task == UNALIGNED_FACE else task


@dataclass(frozen=True)
class ModelVersion:
    """One DiffBIR release: files per role and task, schedule, and sampling defaults.

    ``controlnet``/``stage1`` map a task to its file (``custom`` task: no stage 1).
    ``sampler``, ``steps``, ``cfg_scale`` and the prompts are the defaults of this version.
    ``face_helper``: the detection and parsing files of the unaligned-face task, by role; empty
    for a version without that task (v1, as in the official code). That task restores each face
    as the face task and the whole photo as the sr task, with one IRControlNet (the sr one).
    """

    name: str
    sd_file: str
    controlnet: Mapping[str, str]
    stage1: Mapping[str, Stage1Spec]
    parameterization: Parameterization
    zero_terminal_snr: bool
    sampler: str
    steps: int
    cfg_scale: float
    pos_prompt: str
    neg_prompt: str
    face_helper: Mapping[str, str]

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this version runs (every task but the unaligned-face one without its face
        helper files)."""
        return tuple(t for t in TASKS if t != UNALIGNED_FACE or self.face_helper)

    def files(self, task: str) -> dict[str, str]:
        """``{role: official file name}`` of ``task`` (roles ``sd``, ``controlnet``, ``stage1``;
        the unaligned-face task: the sr task's, ``face_stage1`` and the face helper's)."""
        if task == UNALIGNED_FACE:
            faces = self.files("face")
            return {**self.files("sr"), "face_stage1": faces["stage1"], **self.face_helper}
        files = {"sd": self.sd_file, "controlnet": self.controlnet[task]}
        if task in self.stage1:
            files["stage1"] = self.stage1[task].file
        return files

    def all_files(self) -> list[str]:
        """Every official file of this version (all tasks), each once, in table order."""
        names = [
            name for task in TASKS if task in self.controlnet for name in self.files(task).values()
        ]
        return list(dict.fromkeys([*names, *self.face_helper.values()]))


def _per_task(general: object, face: object) -> Mapping:
    return MappingProxyType({"sr": general, "denoise": general, "face": face})


def _with_custom(controlnet: Mapping[str, str], custom: str) -> Mapping[str, str]:
    return MappingProxyType({**controlnet, "custom": custom})


# v1 and v2 share SD 2.1-base (eps prediction, the linear schedule) and their sampling defaults
# (v1's are not in SPEC: v2's are used).
EPS_SD21_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "sd_file": "v2-1_512-ema-pruned.ckpt",
        "parameterization": "eps",
        "zero_terminal_snr": False,
        "sampler": "spaced",
        "steps": 50,
        "cfg_scale": 4.0,
        "pos_prompt": V2_POS_PROMPT,
        "neg_prompt": V2_NEG_PROMPT,
    }
)

VERSIONS: Mapping[str, ModelVersion] = MappingProxyType(
    {
        v.name: v
        for v in (
            ModelVersion(
                name="v1",
                controlnet=_with_custom(
                    _per_task("v1_general.pth", "v1_face.pth"), "v1_general.pth"
                ),
                stage1=_per_task(
                    Stage1Spec("swinir", "general_swinir_v1.ckpt", True, enlarge_first=True),
                    SWINIR_FACE,
                ),
                face_helper=MappingProxyType({}),  # no unaligned-face task, as the official
                **EPS_SD21_DEFAULTS,
            ),
            ModelVersion(
                name="v2",
                controlnet=_with_custom(_per_task("v2.pth", "v2.pth"), "v2.pth"),
                stage1=MappingProxyType(
                    {
                        "sr": Stage1Spec("bsrnet", "BSRNet.pth", resize_first=False),
                        "denoise": Stage1Spec(
                            "scunet", "scunet_color_real_psnr.pth", resize_first=True
                        ),
                        "face": SWINIR_FACE,
                    }
                ),
                face_helper=FACE_HELPER_FILES,
                **EPS_SD21_DEFAULTS,
            ),
            ModelVersion(
                name="v2.1",
                sd_file="sd2.1-base-zsnr-laionaes5.ckpt",
                controlnet=_with_custom(
                    _per_task("DiffBIR_v2.1.pt", "DiffBIR_v2.1.pt"), "DiffBIR_v2.1.pt"
                ),
                stage1=_per_task(
                    Stage1Spec(
                        "swinir", "realesrgan_s4_swinir_100k.pth", True, enlarge_first=True
                    ),
                    SWINIR_FACE,
                ),
                parameterization="v",
                zero_terminal_snr=True,
                sampler="edm_dpm++_3m_sde",
                steps=10,
                cfg_scale=6.0,
                pos_prompt=V21_POS_PROMPT,
                neg_prompt=V21_NEG_PROMPT,
                face_helper=FACE_HELPER_FILES,
            ),
        )
    }
)
DEFAULT_VERSION = "v2.1"  # as the official code; v2 is the paper's
CUSTOM = "custom"  # our own training: files and schedule from a training config
VERSION_NAMES = (*VERSIONS, CUSTOM)


def get_version(name: str) -> ModelVersion:
    """The official version ``name``; a ValueError lists the known ones."""
    if name not in VERSIONS:
        raise ValueError(f"--version: expected one of {list(VERSION_NAMES)}, got {name!r}")
    return VERSIONS[name]


def versions_of_file(name: str) -> list[str]:
    """The official versions that use the weight file ``name`` (empty: not an official name)."""
    return [v.name for v in VERSIONS.values() if name in v.all_files()]


def role_of_file(name: str) -> str | None:
    """The role (``sd``, ``controlnet``, ``stage1``, ``face_detector``, ``face_parser``) of
    official file ``name``, else ``None``."""
    for role, file in FACE_HELPER_FILES.items():
        if file == name:
            return role
    for version in VERSIONS.values():
        for task in TASKS:
            if task in version.controlnet:
                for role, file in version.files(task).items():
                    if file == name:
                        return role
    return None


def schedule_conflict(
    name: str, parameterization: Parameterization, zero_terminal_snr: bool
) -> str | None:
    """Why official file ``name`` does not fit a model trained with this schedule, or ``None``
    (not an official file, or a version that uses it has this schedule)."""
    owners = [VERSIONS[v] for v in versions_of_file(name)]
    if not owners or any(
        (v.parameterization, v.zero_terminal_snr) == (parameterization, zero_terminal_snr)
        for v in owners
    ):
        return None
    owner = owners[0]
    return (
        f"{name} is a DiffBIR {'/'.join(v.name for v in owners)} file "
        f"({owner.parameterization}-prediction, zero terminal SNR {owner.zero_terminal_snr}), "
        f"but the training config says {parameterization}-prediction, zero terminal SNR "
        f"{zero_terminal_snr} (model.parameterization, model.zero_terminal_snr)"
    )


def custom_version(parameterization: Parameterization, zero_terminal_snr: bool) -> ModelVersion:
    """The ``custom`` version: no official files, the given schedule, the v2 sampling defaults
    (the paper's training recipe: captions off, so the v2 prompts)."""
    if parameterization not in ("eps", "v"):
        raise ValueError(f"model.parameterization: expected 'eps' or 'v', got {parameterization!r}")
    return dataclasses.replace(
        VERSIONS["v2"],
        name=CUSTOM,
        sd_file="",
        controlnet=MappingProxyType({}),
        stage1=MappingProxyType({}),
        parameterization=parameterization,
        zero_terminal_snr=zero_terminal_snr,
    )
