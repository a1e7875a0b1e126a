"""Scoring result folders: datasets, columns (methods) and the table of their metrics."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffbir.evaluation.metrics import EvaluationError, SetMetric, load_metrics, metric_info
from diffbir.evaluation.tables import (
    Table,
    match_by_stem,
    mean_scores,
    metric_row,
    render_markdown,
    score_images,
    write_per_image_csv,
)


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


def check_requirements(datasets: Sequence[Dataset], metric_names: Sequence[str]) -> None:
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
    check_requirements(datasets, metric_names)
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


def write_tables(tables: Sequence[Table], out_dir: Path) -> str:
    text = "\n".join(render_markdown(table) for table in tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(text)
    return text


