"""The paper's tables (``configs/eval/*.yaml``): datasets, columns restored first where their
results are missing (through the one restoration runner), timing (Table 11) and parameter
counts, and the paper's own numbers beside ours."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import torch
from omegaconf import DictConfig, OmegaConf

from diffbir.evaluation.metrics import EvaluationError, list_images, metric_info
from diffbir.evaluation.scoring import Column, Dataset, evaluate
from diffbir.evaluation.tables import RowSpec, Table
from diffbir.pipeline.options import InferenceConfig, RunOptions
from diffbir.pipeline.presets import resolve_config
from diffbir.pipeline.runner import Runner

TIME_ROW = RowSpec("time_ms", "Inference Time (ms)", higher_is_better=False, decimals=2)
PARAMS_ROW = RowSpec("params_m", "Model Size (M)", higher_is_better=False, decimals=2)


def load_preset(name_or_path: str, overrides: Sequence[str] = (),
                data: Sequence[tuple[str, str]] = ()) -> DictConfig:
    """Preset YAML with ``--data NAME=DIR`` and ``key=value`` overrides applied."""
    from diffbir.config import load_config

    try:
        cfg = load_config(name_or_path, group="eval")
        # inference settings are diffbir-infer config keys, checked by column_config
        for node in [cfg.get("inference"), *(c.get("infer") for c in cfg.columns.values())]:
            if node is not None:
                OmegaConf.set_struct(node, False)
        cfg = load_config(cfg, overrides)
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    for name, folder in data:
        if name in cfg.datasets:
            cfg.datasets[name].root = folder
        elif name in (cfg.get("references") or {}):
            cfg.references[name] = folder
        else:
            known = list(cfg.datasets) + list(cfg.get("references") or {})
            raise EvaluationError(f"--data {name}=...: preset has no dataset or reference "
                                  f"named {name!r}; known: {known}")
    for name in cfg.metrics:
        metric_info(name)
    for key, ds in cfg.datasets.items():
        extra = sorted(set(ds.get("metrics") or []) - set(cfg.metrics))
        if extra:
            raise EvaluationError(f"datasets.{key}.metrics: {extra} are not in the preset's "
                                  f"metrics {list(cfg.metrics)}")
    return cfg


def _folder(root: str | None, value: str | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_absolute():
        return path
    if root is None:
        raise EvaluationError(f"{what}: no folder given; pass --data {what.split('.')[1]}=DIR "
                              f"(root holding {value!r}) or {what}=/abs/path")
    return Path(root) / path


def _preset_datasets(cfg: DictConfig) -> list[Dataset]:
    references = cfg.get("references") or {}
    datasets = []
    for key, ds in cfg.datasets.items():
        fid_ref = ds.get("fid_ref")
        if fid_ref in references:
            if references[fid_ref] is None:
                raise EvaluationError(f"dataset {key} uses reference set {fid_ref!r} for FID: "
                                      f"pass --data {fid_ref}=DIR")
            fid_ref = references[fid_ref]
        datasets.append(Dataset(
            key, ds.get("label") or key,
            gt=_folder(ds.get("root"), ds.get("gt"), f"datasets.{key}.gt"),
            fid_ref=Path(fid_ref) if fid_ref else None,
            lq=_folder(ds.get("root"), ds.get("lq"), f"datasets.{key}.lq"),
            metrics=list(ds.metrics) if ds.get("metrics") is not None else None,
        ))
    return datasets


def restore_folder(cfg: InferenceConfig, lq: Path, out: Path) -> int:
    """Restore the images of ``lq`` into ``out`` with the one runner; returns its status."""
    run = RunOptions(input=str(lq), output=str(out), progress=False)
    return Runner(cfg, run).run().status


def run_inference(cfg: InferenceConfig, lq: Path, out: Path, what: str) -> float:
    """Restore ``lq`` into ``out`` (atomically: the folder appears only when complete);
    returns the seconds taken."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    print(f"{what}: restoring {lq} into {out}", file=sys.stderr)
    start = time.perf_counter()
    code = restore_folder(cfg, lq, partial)
    seconds = time.perf_counter() - start
    if code != 0:
        raise EvaluationError(f"{what}: inference failed with exit code {code}")
    if not partial.is_dir():
        raise EvaluationError(f"{what}: inference wrote no output folder {partial}")
    partial.rename(out)
    return seconds


def _flat(node: dict, prefix: str = "") -> dict[str, object]:
    items: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            items.update(_flat(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def column_config(cfg: DictConfig, key: str, weights_dir: str | None) -> InferenceConfig:
    """The inference config of column ``key``: the preset's ``inference`` keys, then the
    column's ``infer`` keys (both in the keys of ``diffbir-infer --config``), then
    ``--weights-dir``; checked as a run of ``diffbir-infer`` checks it."""
    settings: dict[str, object] = {}
    for part in (cfg.get("inference"), cfg.columns[key].get("infer")):
        if part is not None:
            settings.update(_flat(OmegaConf.to_container(part, resolve=True)))
    if weights_dir is not None:
        settings["weights.dir"] = weights_dir
    try:
        checked, _ = resolve_config(None, [], settings)
    except ValueError as err:
        raise EvaluationError(f"column {key}: {err}") from err
    return checked


def _check_weight_files(cfg: InferenceConfig, column: str) -> None:
    """Fail before any inference when a column names a weight file that does not exist."""
    for name in ("sd", "controlnet", "stage1"):
        path = getattr(cfg.weights, name)
        if path is not None and not Path(path).is_file():
            raise EvaluationError(
                f"column {column}: weights.{name} file {path} not found (train it first, or pass "
                f"columns.{column}.infer.weights.{name}=PATH)"
            )


def _preset_columns(
    cfg: DictConfig, datasets: Sequence[Dataset], extra: Sequence[tuple[str, str]], out_dir: Path,
    weights_dir: str | None,
) -> list[Column]:
    """The preset's columns (restored first where their result folders are missing), then the
    ``--result`` columns. Every column's config is checked before any inference."""
    configs = {}
    for key, col in cfg.columns.items():
        pending = [ds for ds in datasets if not (out_dir / "results" / ds.key / key).is_dir()]
        if col.get("infer") is not None and pending:
            configs[key] = column_config(cfg, key, weights_dir)
            _check_weight_files(configs[key], key)
    columns = []
    for key, col in cfg.columns.items():
        column = Column(col.get("label") or key)
        for ds in datasets:
            folder = out_dir / "results" / ds.key / key
            if not folder.is_dir() and key in configs:
                if ds.lq is None:
                    raise EvaluationError(f"column {key} on {ds.key}: no LQ folder to restore; "
                                          f"pass --data {ds.key}=DIR")
                run_inference(configs[key], ds.lq, folder, f"{column.name} on {ds.label}")
            column.folders[ds.key] = folder if folder.is_dir() else None
        columns.append(column)
    for name, root in extra:
        root = Path(root)
        column = Column(name)
        for ds in datasets:
            sub = root / ds.key
            single = len(datasets) == 1 and not sub.is_dir()
            column.folders[ds.key] = root if single else (sub if sub.is_dir() else None)
        columns.append(column)
    return columns


def _reported_table(cfg: DictConfig, main: Table, datasets: Sequence[Dataset]) -> Table:
    """The paper's own numbers for the preset's columns, in the layout of the main table."""
    labels = {ds.key: ds.label for ds in datasets}
    table = Table(f"{cfg.title}: as reported in the paper", list(main.datasets), [],
                  list(main.rows), layout=main.layout, mark_best=False)
    table.omitted = set(main.omitted)
    for key, per_dataset in cfg.reported.items():
        method = (cfg.columns[key].get("label") or key) if key in cfg.columns else key
        table.methods.append(method)
        for ds_key, values in per_dataset.items():
            for metric, value in values.items():
                table.values[(labels[ds_key], method, metric)] = float(value)
    for dataset in table.datasets:
        for method in table.methods:
            for row in table.rows:
                table.na.setdefault((dataset, method, row.key), "not reported in the paper")
    return table


def run_preset(
    preset: str, out_dir: Path, *, overrides: Sequence[str] = (),
    data: Sequence[tuple[str, str]] = (), results: Sequence[tuple[str, str]] = (),
    metrics: Sequence[str] | None = None, weights_dir: str | None = None, device: str = "cpu",
) -> list[Table]:
    """The tables of ``preset`` (``data``: ``(name, folder)`` of its datasets; ``results``:
    extra ``(name, folder)`` columns such as baselines)."""
    cfg = load_preset(preset, overrides, data)
    metric_names = list(metrics or cfg.metrics)
    datasets = _preset_datasets(cfg)
    scored = datasets if cfg.get("score", True) else []
    columns = _preset_columns(cfg, scored, results, out_dir, weights_dir)
    layout = cfg.get("layout", "metrics_as_rows")
    if scored:
        labels = OmegaConf.to_container(cfg.get("labels") or OmegaConf.create({}))
        table = evaluate(scored, columns, metric_names, out_dir, title=cfg.title,
                         layout=layout, labels=labels, device=device)
    else:
        table = Table(cfg.title, [datasets[0].label], [c.name for c in columns], [],
                      layout=layout)
    if cfg.get("timing") is not None:
        _add_timing(table, cfg, datasets, out_dir, weights_dir)
    if cfg.get("params") is not None:
        _add_params(table, cfg)
    tables = [table]
    if cfg.get("reported"):
        tables.append(_reported_table(cfg, table, datasets))
    return tables


def prepare_timing_inputs(src: Path, dst: Path, size: int, count: int) -> list[Path]:
    """``count`` images of ``src`` resized (short side ``size``) and centre-cropped to size²."""
    dst.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, path in list(list_images(src, "timing input folder").items())[:count]:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise EvaluationError(f"cannot read image {path}")
        h, w = img.shape[:2]
        scale = size / min(h, w)
        img = cv2.resize(img, (max(size, round(w * scale)), max(size, round(h * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        paths.append(dst / f"{stem}.png")
        cv2.imwrite(str(paths[-1]), img[top:top + size, left:left + size])
    return paths


def _add_timing(table: Table, cfg: DictConfig, datasets, out_dir: Path, weights_dir) -> None:
    """Time per image of inference = (T(k images) − T(1 image)) / (k − 1): loading excluded."""
    timing = cfg.timing
    source = {ds.key: ds for ds in datasets}[timing.dataset].lq
    if source is None:
        raise EvaluationError(f"timing: pass --data {timing.dataset}=DIR (images to crop)")
    work = out_dir / "timing"
    shutil.rmtree(work, ignore_errors=True)
    inputs = prepare_timing_inputs(source, work / "inputs", timing.input_size, timing.num_images)
    one = work / "inputs_1"
    one.mkdir()
    shutil.copy(inputs[0], one / inputs[0].name)
    infer = column_config(cfg, timing.column, weights_dir)
    label = cfg.columns[timing.column].get("label") or timing.column
    t_one = run_inference(infer, one, work / "out_1", "timing (1 image)")
    if len(inputs) > 1:
        t_all = run_inference(infer, work / "inputs", work / "out_all", "timing")
        per_image = (t_all - t_one) / (len(inputs) - 1)
        how = f"(T({len(inputs)} images) − T(1 image)) / {len(inputs) - 1}, model loading excluded"
    else:
        per_image, how = t_one, "one image, model loading included"
    table.values[(table.datasets[0], label, TIME_ROW.key)] = per_image * 1000.0
    table.notes.append(f"Inference time: {timing.input_size}×{timing.input_size} inputs, "
                       f"{how}; DiffBIR {infer.version}, {infer.restore.steps} steps of "
                       f"{infer.restore.sampler.name}")
    table.rows.append(TIME_ROW)


def count_parameters(model_configs: Sequence[str]) -> float:
    """Millions of parameters of the models built on the meta device (no memory, no weights)."""
    from diffbir.config import build_model

    total = 0
    for name in model_configs:
        with torch.device("meta"):
            model = build_model(name)
        total += sum(p.numel() for p in model.parameters())
    return total / 1e6


def _add_params(table: Table, cfg: DictConfig) -> None:
    for key, model_configs in cfg.params.items():
        label = (cfg.columns[key].get("label") or key) if key in cfg.columns else key
        cell = (table.datasets[0], label, PARAMS_ROW.key)
        try:
            table.values[cell] = count_parameters(list(model_configs))
        except Exception as err:  # a missing/broken model config must not hide the other rows
            table.na[cell] = f"parameter count of {list(model_configs)} failed: {err}"
        table.notes.append(f"Model size of {label}: parameters of {', '.join(model_configs)}")
    table.rows.append(PARAMS_ROW)


