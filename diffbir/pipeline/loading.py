"""Building a :class:`Restorer` for a model version and task from configs and weight files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from diffbir.checkpoint import (
    CheckpointError,
    check_materialized,
    empty_parameters,
    load_weights,
    read_state_dict,
    sub_state_dict,
)
from diffbir.config import build_model, load_config
from diffbir.diffusion import NoiseSchedule
from diffbir.faces import Detector
from diffbir.faces.networks import load_detector, load_parser
from diffbir.pipeline.cleaner import Cleaner
from diffbir.pipeline.device import PRECISIONS, resolve_device, warn_if_slow_precision
from diffbir.pipeline.faces import FaceModelPlan, FaceRestorer, plan_face_models
from diffbir.pipeline.options import InferenceConfig
from diffbir.pipeline.precision import place_models, place_stage1
from diffbir.pipeline.restorer import Restorer
from diffbir.versions import (
    CUSTOM,
    DEFAULT_VERSION,
    TASKS,
    UNALIGNED_FACE,
    ModelVersion,
    Stage1Spec,
    custom_version,
    get_version,
    role_of_file,
    schedule_conflict,
    versions_of_file,
    whole_image_task,
)
from diffbir.weights import check_weights, weight_path


@dataclass(frozen=True)
class WeightPaths:
    """The weight files of one run (``stage1`` is ``None`` when there is no stage-1 model)."""

    sd: Path
    controlnet: Path
    stage1: Path | None


def resolve_weight_paths(
    task: str,
    weights_dir: str | os.PathLike | None = None,
    *,
    version: str = DEFAULT_VERSION,
    sd: str | os.PathLike | None = None,
    controlnet: str | os.PathLike | None = None,
    stage1: str | os.PathLike | None = None,
) -> WeightPaths:
    """Explicit paths win; else the official files of ``version`` and ``task`` in the weights
    folder (see :mod:`diffbir.versions`)."""
    if task not in TASKS:
        raise ValueError(f"--task: expected one of {list(TASKS)}, got {task!r}")
    files = get_version(version).files(task)
    stage1_path = Path(stage1) if stage1 else None
    if stage1_path is None and "stage1" in files:
        stage1_path = weight_path(files["stage1"], weights_dir)
    return WeightPaths(
        sd=Path(sd) if sd else weight_path(files["sd"], weights_dir),
        controlnet=Path(controlnet)
        if controlnet
        else weight_path(files["controlnet"], weights_dir),
        stage1=stage1_path,
    )


_ROLE_FLAGS = {
    "sd": "--sd-weights",
    "controlnet": "--controlnet-weights",
    "stage1": "--stage1-weights",
}
_ROLE_NAMES = {
    "sd": "Stable Diffusion",
    "controlnet": "IRControlNet",
    "stage1": "stage-1 model",
    "face_detector": "face detector",
    "face_parser": "face parser",
}


class WrongVersionError(CheckpointError):
    """An official weight file given for a model version (or role) it does not belong to."""


def check_version(paths: WeightPaths, version: ModelVersion, task: str) -> None:
    """Refuse an official file of another version or another role than the selected ones.

    Official files are recognised by name. For ``custom``, an official file is accepted when
    its versions share the configured parameterization and zero-terminal-SNR setting.
    """
    for role, path in (
        ("sd", paths.sd),
        ("controlnet", paths.controlnet),
        ("stage1", paths.stage1),
    ):
        if path is None:
            continue
        owners = versions_of_file(path.name)
        if not owners:
            continue  # not an official name: nothing to check
        flag = _ROLE_FLAGS[role]
        official_role = role_of_file(path.name)
        if official_role != role:
            raise WrongVersionError(
                f"{flag} {path}: {path.name} is the official {_ROLE_NAMES[official_role]} file "
                f"of DiffBIR {'/'.join(owners)}, not a {_ROLE_NAMES[role]}; give a "
                f"{_ROLE_NAMES[role]} file with {flag}"
            )
        if version.name == CUSTOM:
            conflict = schedule_conflict(
                path.name, version.parameterization, version.zero_terminal_snr
            )
            if conflict:
                raise WrongVersionError(
                    f"{flag} {path}: {conflict} of --version custom; fix the config, or use "
                    f"--version {owners[-1]}"
                )
        elif version.name not in owners:
            expected = version.files(task).get(role)
            hint = f" (its {_ROLE_NAMES[role]}: {expected})" if expected else ""
            raise WrongVersionError(
                f"{flag} {path}: {path.name} belongs to DiffBIR {'/'.join(owners)}, but version "
                f"{version.name} is selected{hint}; run with --version {owners[-1]} to use it, or "
                f"give a {version.name} file"
            )


@dataclass(frozen=True)
class ModelPlan:
    """What a run will load, checked but not read: the task, the version, the weight files and
    the model configs (:func:`plan_models`); ``faces``: the unaligned-face task's own models."""

    task: str
    version: ModelVersion
    paths: WeightPaths
    cldm_config: str
    stage1_config: str | None
    faces: FaceModelPlan | None = None

    def files(self) -> dict[str, Path]:
        """Every weight file the plan loads, by what it is (the flag that sets it, if any)."""
        files = {
            "Stable Diffusion 2.1 (--sd-weights)": self.paths.sd,
            "IRControlNet (--controlnet-weights)": self.paths.controlnet,
        }
        faces, stage1 = self.faces, self.paths.stage1
        if stage1 is not None:
            photo = faces is not None and faces.stage1 != stage1
            role = "of the whole photo" if photo else "(--stage1-weights)"
            files[f"stage-1 model {role}"] = stage1
        if faces is not None:
            if faces.stage1 is not None and faces.stage1 != stage1:
                files["stage-1 model of the faces"] = faces.stage1
            files["face detector"] = faces.detector
            files["face parser"] = faces.parser
        return files


def check_paths(plan: ModelPlan) -> None:
    """Raise one :class:`~diffbir.weights.MissingWeightsError` listing every missing file of
    ``plan``."""
    check_weights(plan.files())


def plan_models(
    task: str,
    paths: WeightPaths | None = None,
    *,
    version: str | ModelVersion = DEFAULT_VERSION,
    weights_dir: str | os.PathLike | None = None,
    cldm_config: str = "control_ldm",
    stage1_config: str | None = None,
) -> ModelPlan:
    """The checks of the models of a run that need no file: the task, the stage-1 config and
    each file's version (:class:`WrongVersionError`); :func:`check_paths` checks that the files
    are there. The unaligned-face task's own models: :func:`~.faces.plan_face_models`."""
    if task not in TASKS:
        raise ValueError(f"--task: expected one of {list(TASKS)}, got {task!r}")
    if isinstance(version, str):
        version = get_version(version)
    if task not in version.tasks:
        raise ValueError(
            f"--task {task}: DiffBIR {version.name} has no such task (as in the official code); "
            "use --version v2 or v2.1"
        )
    spec = version.stage1.get(whole_image_task(task))
    if paths is None:
        paths = resolve_weight_paths(task, weights_dir, version=version.name)
    stage1_config = stage1_config or (spec.config if spec else None)
    if paths.stage1 is not None and stage1_config is None:
        raise ValueError(f"--task {task} with --stage1-weights needs --stage1-config")
    if stage1_config is not None and paths.stage1 is None:
        raise ValueError(f"stage-1 config {stage1_config!r} given without --stage1-weights")
    check_version(paths, version, task)
    faces = None
    if task == UNALIGNED_FACE:
        faces = plan_face_models(version, paths.stage1, stage1_config, weights_dir)
    return ModelPlan(task, version, paths, str(cldm_config), stage1_config, faces)


def plan_from_config(cfg: InferenceConfig) -> ModelPlan:
    """The :class:`ModelPlan` of a config: the official files of its version and task, or
    ``custom`` (the models of a GM training config)."""
    w = cfg.weights
    if cfg.version == CUSTOM:
        custom = custom_model(
            w.train_config, w.controlnet, sd=w.sd, stage1=w.stage1, stage1_config=w.stage1_config
        )
        return plan_models(
            cfg.task,
            custom.paths,
            version=custom.version,
            weights_dir=w.dir,
            cldm_config=w.cldm_config or custom.cldm_config,
            stage1_config=custom.stage1_config,
        )
    if cfg.task == UNALIGNED_FACE and (w.stage1 or w.stage1_config):
        raise ValueError(
            f"--stage1-weights/--stage1-config: --task {UNALIGNED_FACE} uses two stage-1 models, "
            f"the whole photo's (sr) and the faces' (face) of --version {cfg.version}, from "
            "--weights-dir; drop them (or restore with --task sr or --task face)"
        )
    paths = resolve_weight_paths(
        cfg.task, w.dir, version=cfg.version, sd=w.sd, controlnet=w.controlnet, stage1=w.stage1
    )
    return plan_models(
        cfg.task,
        paths,
        version=cfg.version,
        weights_dir=w.dir,
        cldm_config=w.cldm_config or "control_ldm",
        stage1_config=w.stage1_config,
    )


def load_restorer(
    plan: ModelPlan,
    *,
    device: torch.device | str = "auto",
    precision: str | torch.dtype = "fp32",
    compile: bool = False,
) -> Restorer | FaceRestorer:
    """Build the models of ``plan`` from their configs, load the weight files and place them on
    ``device`` (``auto``, ``cpu``, ``cuda``, ...) in ``precision`` (fp32, fp16, bf16 or a dtype;
    :mod:`~diffbir.pipeline.precision` says which part runs in it); ``compile``:
    ``torch.compile`` UNet + IRControlNet. The unaligned-face task gives a
    :class:`~diffbir.pipeline.faces.FaceRestorer`: one ControlLDM, two stage-1 models (one
    when they are the same file), and the face detector and parser (float32)."""
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
        precision = PRECISIONS[precision]
    device = resolve_device(device) if isinstance(device, str) else device
    warn_if_slow_precision(device, precision)
    check_paths(plan)
    paths, version = plan.paths, plan.version
    # Parameters built empty in their final dtypes, then the memory-mapped file tensors become
    # them: one copy of the weights at any time; then everything moves to the device.
    with empty_parameters():
        cldm = build_model(load_config(plan.cldm_config), source=plan.cldm_config)
    place_models(cldm, None, None, precision)
    cldm.load_sd_weights(read_state_dict(paths.sd), str(paths.sd), assign=True)
    cldm.load_controlnet_weights(
        _controlnet_state_dict(paths.controlnet), str(paths.controlnet), assign=True
    )
    check_materialized(cldm, f"{paths.sd} + {paths.controlnet}")
    place_models(cldm, None, device, precision)
    model = _load_stage1(paths.stage1, plan.stage1_config, device, precision)
    schedule = NoiseSchedule.linear(zero_terminal_snr=version.zero_terminal_snr)
    restorer = Restorer(
        cldm,
        _cleaner(model, version, whole_image_task(plan.task)),
        schedule=schedule,
        parameterization=version.parameterization,
        compile=compile,
    )
    faces = plan.faces
    if faces is None:
        return restorer
    if (faces.stage1, faces.stage1_config) == (paths.stage1, plan.stage1_config):
        face_model = model  # one file restores both (version custom): loaded once
    else:
        face_model = _load_stage1(faces.stage1, faces.stage1_config, device, precision)
    return FaceRestorer(
        restorer,
        restorer.with_cleaner(_cleaner(face_model, version, "face")),
        load_face_detector(plan, device),
        load_parser(faces.parser, device),
    )


def load_face_detector(plan: ModelPlan, device: torch.device) -> Detector:
    """The face detector of an unaligned-face plan alone (the caption stage finds the faces
    with it before the other models load)."""
    if plan.faces is None:
        raise ValueError(f"task {plan.task}: no face detector")
    return load_detector(plan.faces.detector, device)


def _load_stage1(
    path: Path | None, config: str | None, device: torch.device, precision: torch.dtype
) -> nn.Module | None:
    """The stage-1 model of ``config`` with the weights of ``path`` (``None``: no model), built
    empty in ``precision`` and loaded in place, then moved to ``device``."""
    if path is None:
        return None
    with empty_parameters():
        model = build_model(load_config(config), source=config)
    place_stage1(model, None, precision)
    load_weights(model, read_state_dict(path), str(path), assign=True)
    check_materialized(model, str(path))
    place_stage1(model, device, precision)
    return model


def _cleaner(model: nn.Module | None, version: ModelVersion, task: str) -> Cleaner:
    """Stage 1 of ``task`` around ``model``, with the version's size rule for it."""
    if model is None:
        return Cleaner(model=None)
    spec: Stage1Spec | None = version.stage1.get(task)
    # our RM (version custom) is a same-size SwinIR, trained on LQ at the HQ size
    same_size = version.name == CUSTOM
    return Cleaner(
        model=model,
        resize_first=spec.resize_first if spec else same_size,
        enlarge_first=spec.enlarge_first if spec else same_size,
    )


def build_restorer(
    task: str,
    paths: WeightPaths | None = None,
    *,
    version: str | ModelVersion = DEFAULT_VERSION,
    weights_dir: str | os.PathLike | None = None,
    cldm_config: str = "control_ldm",
    stage1_config: str | None = None,
    device: torch.device | str = "auto",
    precision: str | torch.dtype = "fp32",
    compile: bool = False,
) -> Restorer | FaceRestorer:
    """Check (:func:`plan_models`) and load (:func:`load_restorer`) the models of ``task``.

    ``version`` (:mod:`diffbir.versions`) decides the official files, the stage 1 of each task
    and the noise schedule; ``paths`` default to its files in ``weights_dir``. ``stage1_config``
    overrides the task's stage-1 config (required for task ``custom`` when a stage-1 weight file
    is given; with ``custom`` and no weights there is no stage-1 model).
    """
    plan = plan_models(
        task,
        paths,
        version=version,
        weights_dir=weights_dir,
        cldm_config=cldm_config,
        stage1_config=stage1_config,
    )
    return load_restorer(plan, device=device, precision=precision, compile=compile)


def build_from_config(
    cfg: InferenceConfig, device: torch.device | str | None = None, *, compile: bool = False
) -> Restorer | FaceRestorer:
    """The Restorer of a config (``device`` default: the config's)."""
    return load_restorer(
        plan_from_config(cfg),
        device=device if device is not None else cfg.device,
        precision=cfg.precision,
        compile=compile,
    )


def _controlnet_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """IRControlNet weights from an official/exported file or a GM training checkpoint."""
    sd = read_state_dict(path)
    prefix = "cldm.controlnet."  # GM training checkpoints (diffbir.training.gm.TRAINED_PREFIX)
    if sd and all(k.startswith(prefix) for k in sd):
        return sub_state_dict(sd, prefix)
    return sd


@dataclass(frozen=True)
class CustomModel:
    """``--version custom``: what a GM training config says about the model it trained."""

    version: ModelVersion
    paths: WeightPaths
    cldm_config: str
    stage1_config: str | None


def custom_model(
    train_config: str | os.PathLike | None,
    controlnet: str | os.PathLike | None,
    *,
    sd: str | os.PathLike | None = None,
    stage1: str | os.PathLike | None = None,
    stage1_config: str | None = None,
) -> CustomModel:
    """Read a GM training config (``configs/train/gm*.yaml``): base SD file, ControlLDM config,
    frozen stage 1 and schedule (``model.parameterization``, default eps;
    ``model.zero_terminal_snr``, default false). ``controlnet`` is a training checkpoint or an
    exported IRControlNet; explicit ``sd``/``stage1`` paths win over the config's."""
    if not train_config:
        raise ValueError(
            "--version custom needs --train-config (the configs/train/gm*.yaml of the training)"
        )
    if not controlnet:
        raise ValueError(
            "--version custom needs --controlnet-weights (a GM training checkpoint, or its "
            "export/controlnet.pth)"
        )
    cfg = load_config(train_config, group="train")
    model = OmegaConf.select(cfg, "model")
    if model is None or OmegaConf.select(model, "config") is None:
        raise ValueError(f"{train_config}: not a GM training config (no model.config)")
    version = custom_version(
        OmegaConf.select(model, "parameterization", default="eps"),
        bool(OmegaConf.select(model, "zero_terminal_snr", default=False)),
    )
    trained_stage1 = OmegaConf.select(model, "stage1")
    stage1 = stage1 or (trained_stage1.weights if trained_stage1 else None)
    stage1_config = stage1_config or (trained_stage1.config if trained_stage1 else None)
    paths = WeightPaths(
        sd=Path(sd or model.sd_weights),
        controlnet=Path(controlnet),
        stage1=Path(stage1) if stage1 else None,
    )
    return CustomModel(version, paths, str(model.config), stage1_config)
