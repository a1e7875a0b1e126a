"""``diffbir-eval``: score result folders and rebuild the paper's tables.

Ad hoc::

    diffbir-eval --gt DIR --result NAME=DIR [--result NAME=DIR ...] \\
        --metrics psnr,ssim,lpips,musiq,maniqa,clipiqa --out DIR

writes ``DIR/per_image.csv`` and ``DIR/table.md``. Images are matched by file stem. Without
``--gt`` only no-reference metrics may be asked for: a full-reference one (psnr, psnr_y, ssim,
ssim_rgb, lpips) is an error before any work starts. ``fid`` compares each result folder with
``--fid-ref`` (default: the ``--gt`` folder).

Paper tables::

    diffbir-eval --preset table2 --data div2k_val=DIR --out DIR [--weights-dir W] [key=value ...]

loads ``configs/eval/<preset>.yaml``; ``--data NAME=DIR`` sets the root folder of dataset NAME
(or the folder of reference set NAME, e.g. ``ffhq``); ``key=value`` overrides any preset key.
Columns whose result folder does not exist yet are produced first by the restoration runner
(the preset's ``inference`` and each column's ``infer`` hold ``diffbir-infer`` config keys).
Extra ``--result NAME=DIR`` columns (e.g. baselines) read ``DIR/<dataset key>`` (or ``DIR`` when
the preset has one dataset). Metrics that cannot run here are printed as n/a with the reason.

Presets: table2, 3, 4, 5, 10 (comparisons), table11 (time per image and parameter count) and
the ablations table1, 6, 7, 8, 9, whose columns restore with the ablation models
(``infer.cldm_config``, ``infer.controlnet_weights`` = the training exports under ``runs/``).
A preset dataset may list its own ``metrics`` (Table 6: no-reference ones on RealSRSet,
full-reference ones on ImageNet); the rows of the others are left out of its group. Results go
to ``DIR/results/<dataset>/<column>`` and are reused on the next run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import torch
from omegaconf import DictConfig, OmegaConf

from diffbir.evaluation.metrics import (
    METRICS,
    EvaluationError,
    SetMetric,
    list_images,
    load_metrics,
    metric_info,
)
from diffbir.evaluation.tables import (
    LAYOUTS,
    RowSpec,
    Table,
    match_by_stem,
    mean_scores,
    metric_row,
    render_markdown,
    score_images,
    write_per_image_csv,
)
from diffbir.files import OutputFolderError, check_output_folder
from diffbir.pipeline.options import InferenceConfig, RunOptions
from diffbir.pipeline.presets import resolve_config
from diffbir.pipeline.runner import Runner

TIME_ROW = RowSpec("time_ms", "Inference Time (ms)", higher_is_better=False, decimals=2)
PARAMS_ROW = RowSpec("params_m", "Model Size (M)", higher_is_better=False, decimals=2)


@dataclass
class Dataset:
    """A test set: label, ground truth (or None), FID reference (or None), LQ inputs, and the
    metrics measured on it (None: all of the run's metrics)."""

    key: str
    label: str
    gt: Path | None = None
    fid_ref: Path | None = None
    lq: Path | None = None
    metrics: list[str] | None = None

    def metric_names(self, run_metrics: Sequence[str]) -> list[str]:
        """The run's metrics restricted to this dataset's list (when it has one)."""
        return [m for m in run_metrics if self.metrics is None or m in self.metrics]


@dataclass
class Column:
    """A method: printed name and its result folder per dataset key (None: no result)."""

    name: str
    folders: dict[str, Path | None] = field(default_factory=dict)


# ---------------------------------------------------------------- scoring


def _check_requirements(datasets: Sequence[Dataset], metric_names: Sequence[str]) -> None:
    for ds in datasets:
        names = ds.metric_names(metric_names)
        need_gt = [m for m in names if metric_info(m).needs_gt]
        if need_gt and ds.gt is None:
            raise EvaluationError(
                f"full-reference metrics {', '.join(need_gt)} need ground truth, but dataset "
                f"{ds.label!r} has none: pass --gt DIR (preset: set its gt folder) or drop them"
            )
        if "fid" in names and ds.fid_ref is None and ds.gt is None:
            raise EvaluationError(
                f"fid needs a reference folder for dataset {ds.label!r}: pass --fid-ref DIR"
            )


def evaluate(
    datasets: Sequence[Dataset],
    columns: Sequence[Column],
    metric_names: Sequence[str],
    out_dir: Path,
    *,
    title: str,
    layout: str = "metrics_as_rows",
    labels: dict[str, str] | None = None,
    device: str = "cpu",
) -> Table:
    """Score every (dataset, column); write per_image.csv and return the table (not rendered)."""
    _check_requirements(datasets, metric_names)
    loaded, unavailable = load_metrics(metric_names, device)
    for name, reason in unavailable.items():
        print(f"warning: {name} unavailable: {reason}", file=sys.stderr)
    image_metrics = {n: m for n, m in loaded.items() if metric_info(n).per_image}
    set_metrics: dict[str, SetMetric] = {
        n: m for n, m in loaded.items() if not metric_info(n).per_image
    }
    table = Table(
        title=title, datasets=[d.label for d in datasets], methods=[c.name for c in columns],
        rows=[metric_row(n, (labels or {}).get(n)) for n in metric_names], layout=layout,
    )
    csv_rows = []
    for ds in datasets:
        measured = ds.metric_names(metric_names)
        table.omitted |= {(ds.label, m) for m in metric_names if m not in measured}
        for col in columns:
            folder = col.folders.get(ds.key)
            if folder is None:
                for name in measured:
                    table.na[(ds.label, col.name, name)] = f"no result folder for {ds.label}"
                continue
            pairs, notes = match_by_stem(folder, ds.gt, col.name)
            table.notes += [f"{ds.label}: {note}" for note in notes]
            print(f"scoring {col.name} on {ds.label}: {len(pairs)} images", file=sys.stderr)
            per_image = score_images(pairs, {n: image_metrics[n] for n in measured
                                             if n in image_metrics})
            csv_rows += [(ds.key, col.name, stem, row) for stem, row in per_image.items()]
            for name, value in mean_scores(per_image).items():
                table.values[(ds.label, col.name, name)] = value
            for name in measured:
                if name in set_metrics:
                    ref = ds.fid_ref or ds.gt
                    table.values[(ds.label, col.name, name)] = set_metrics[name](folder, ref)
                elif name in unavailable:
                    reason = unavailable[name]
                    table.na[(ds.label, col.name, name)] = f"{metric_info(name).label}: {reason}"
    write_per_image_csv(out_dir / "per_image.csv", csv_rows, list(image_metrics))
    return table


def _write_tables(tables: Sequence[Table], out_dir: Path) -> str:
    text = "\n".join(render_markdown(table) for table in tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(text)
    return text


# ---------------------------------------------------------------- arguments


def _parse_pairs(items: Sequence[str], flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise EvaluationError(f"{flag} expects NAME=DIR, got {item!r}")
        pairs.append((name, value))
    return pairs


def _parse_metrics(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        metric_info(name)
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffbir-eval", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--gt", help="ground-truth folder (enables full-reference metrics)")
    parser.add_argument("--result", action="append", default=[], metavar="NAME=DIR",
                        help="a result folder shown as column NAME (repeatable)")
    parser.add_argument("--metrics", help=f"comma-separated, from: {', '.join(METRICS)}")
    parser.add_argument("--out", required=True, help="output folder for per_image.csv, table.md")
    parser.add_argument("--fid-ref", help="reference folder for fid (default: --gt)")
    parser.add_argument("--title", default="Evaluation", help="table title (ad hoc mode)")
    parser.add_argument("--layout", choices=LAYOUTS,
                        default="metrics_as_rows")
    parser.add_argument("--device", default="cpu", help="device of the learned metrics")
    parser.add_argument("--preset", help="configs/eval/<preset>.yaml (or a YAML path)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=DIR",
                        help="preset: root folder of dataset NAME or reference set NAME")
    parser.add_argument("--weights-dir", help="preset: weights folder passed to inference")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="preset: overrides of preset keys, e.g. inference.restore.steps=20")
    return parser


def _adhoc(args: argparse.Namespace) -> Table:
    if not args.result:
        raise EvaluationError("give at least one --result NAME=DIR")
    if args.overrides or args.data or args.weights_dir:
        raise EvaluationError("key=value overrides, --data and --weights-dir need --preset")
    metric_names = _parse_metrics(args.metrics)
    if not metric_names:
        raise EvaluationError("--metrics is required without --preset (e.g. psnr,ssim,lpips)")
    gt = Path(args.gt) if args.gt else None
    fid_ref = Path(args.fid_ref) if args.fid_ref else None
    dataset = Dataset("data", gt.name if gt else "data", gt=gt, fid_ref=fid_ref)
    names = [name for name, _ in _parse_pairs(args.result, "--result")]
    if len(set(names)) != len(names):
        raise EvaluationError(f"--result names must be unique, got {names}")
    columns = [Column(name, {"data": Path(folder)})
               for name, folder in _parse_pairs(args.result, "--result")]
    return evaluate([dataset], columns, metric_names, Path(args.out), title=args.title,
                    layout=args.layout, device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffbir-eval``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        check_output_folder(args.out, "--out")  # before any scoring or inference
        tables = _preset(args) if args.preset else [_adhoc(args)]
        text = _write_tables(tables, Path(args.out))
    except (EvaluationError, OutputFolderError, FileNotFoundError) as err:
        print(f"diffbir-eval: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffbir-eval: interrupted (restored result folders are kept)", file=sys.stderr)
        return 130
    print(text)
    return 0


# ---------------------------------------------------------------- presets


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


def _preset(args: argparse.Namespace) -> list[Table]:
    if args.gt or args.fid_ref:
        raise EvaluationError("with --preset, set folders with --data NAME=DIR, not --gt/--fid-ref")
    cfg = load_preset(args.preset, args.overrides, _parse_pairs(args.data, "--data"))
    out_dir = Path(args.out)
    metric_names = _parse_metrics(args.metrics) or list(cfg.metrics)
    datasets = _preset_datasets(cfg)
    scored = datasets if cfg.get("score", True) else []
    weights_dir = args.weights_dir
    columns = _preset_columns(cfg, scored, _parse_pairs(args.result, "--result"), out_dir,
                              weights_dir)
    layout = cfg.get("layout", "metrics_as_rows")
    if scored:
        labels = OmegaConf.to_container(cfg.get("labels") or OmegaConf.create({}))
        table = evaluate(scored, columns, metric_names, out_dir, title=cfg.title,
                         layout=layout, labels=labels, device=args.device)
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


# ---------------------------------------------------------------- Table 11


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


if __name__ == "__main__":
    sys.exit(main())
