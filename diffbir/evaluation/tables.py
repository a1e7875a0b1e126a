"""Score result folders, write per-image CSVs and render the paper's Markdown tables.

Layouts follow the paper: ``metrics_as_rows`` (Tables 2, 3, 4, 6, 10, 11: one row per metric,
grouped by dataset when there are several, one column per method), ``methods_as_rows`` (Tables 1,
5, 8, 9) and ``datasets_as_columns`` (Table 7: one row per method, one column per dataset and
metric).
In every group of comparable numbers (same dataset and metric) the best value is **bold** and the
second best <u>underlined</u>, ranked on the printed (rounded) value, so ties share a mark.
Unavailable numbers print as ``n/a [k]`` with footnote k giving the reason.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffbir.evaluation.metrics import (
    EvaluationError,
    ImageMetric,
    list_images,
    metric_info,
    read_image,
)

LAYOUTS = ("metrics_as_rows", "methods_as_rows", "datasets_as_columns")


@dataclass(frozen=True)
class RowSpec:
    """One quantity of a table: key, printed label, ranking direction (None: unranked)."""

    key: str
    label: str
    higher_is_better: bool | None = True
    decimals: int = 4

    @property
    def header(self) -> str:
        arrow = {True: "↑", False: "↓", None: ""}[self.higher_is_better]
        return f"{self.label}{arrow}"


def metric_row(name: str, label: str | None = None) -> RowSpec:
    """RowSpec of a registered metric (optionally relabelled, e.g. "FID (ref. FFHQ)")."""
    info = metric_info(name)
    return RowSpec(name, label or info.label, info.higher_is_better)


@dataclass
class Table:
    """Numbers keyed by (dataset, method, row key); missing cells need a reason in ``na``.

    ``omitted`` holds (dataset, row key) pairs not measured on that dataset by design (e.g. PSNR
    without ground truth in Table 6): their rows are left out of the dataset's group.
    """

    title: str
    datasets: list[str]
    methods: list[str]
    rows: list[RowSpec]
    values: dict[tuple[str, str, str], float] = field(default_factory=dict)
    na: dict[tuple[str, str, str], str] = field(default_factory=dict)
    omitted: set[tuple[str, str]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    layout: str = "metrics_as_rows"
    mark_best: bool = True


# ---------------------------------------------------------------- scoring folders


def match_by_stem(
    result_dir: Path, gt_dir: Path | None, name: str
) -> tuple[dict[str, tuple[Path, Path | None]], list[str]]:
    """Pairs ``stem -> (result, gt)``; without GT every result image. Also returns notes."""
    results = list_images(result_dir, f"result folder of {name!r}")
    if gt_dir is None:
        return {stem: (path, None) for stem, path in results.items()}, []
    gts = list_images(gt_dir, "ground-truth folder")
    common = sorted(set(results) & set(gts))
    if not common:
        raise EvaluationError(
            f"no image of result {name!r} ({result_dir}) has a ground truth with the same file "
            f"stem in {gt_dir}; e.g. result {sorted(results)[:3]} vs ground truth "
            f"{sorted(gts)[:3]}"
        )
    notes = []
    if len(common) < len(gts):
        notes.append(f"{name}: {len(common)} of {len(gts)} ground-truth images have a result")
    if len(common) < len(results):
        notes.append(f"{name}: {len(results) - len(common)} result images without ground truth "
                     "were ignored")
    return {stem: (results[stem], gts[stem]) for stem in common}, notes


def score_images(
    pairs: Mapping[str, tuple[Path, Path | None]], metrics: Mapping[str, ImageMetric]
) -> dict[str, dict[str, float]]:
    """``stem -> metric -> value`` for every pair and per-image metric."""
    scores: dict[str, dict[str, float]] = {}
    for stem, (result_path, gt_path) in pairs.items():
        result = read_image(result_path)
        gt = read_image(gt_path) if gt_path is not None else None
        row = {}
        for name, metric in metrics.items():
            try:
                row[name] = metric(result, gt)
            except EvaluationError as err:
                raise EvaluationError(f"{name} on {result_path}: {err}") from err
        scores[stem] = row
    return scores


def mean_scores(per_image: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Metric means over images (``inf`` stays ``inf``, e.g. PSNR of identical images)."""
    sums: dict[str, list[float]] = {}
    for row in per_image.values():
        for name, value in row.items():
            sums.setdefault(name, []).append(value)
    return {name: math.fsum(vals) / len(vals) for name, vals in sums.items()}


def write_per_image_csv(
    path: Path,
    rows: Sequence[tuple[str, str, str, Mapping[str, float]]],
    metric_names: Sequence[str],
) -> None:
    """CSV with columns dataset, method, image, then one column per metric (blank = n/a)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "method", "image", *metric_names])
        for dataset, method, stem, values in rows:
            cells = [repr(float(values[m])) if m in values else "" for m in metric_names]
            writer.writerow([dataset, method, stem, *cells])


# ---------------------------------------------------------------- Markdown


def _formatted(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}" if math.isfinite(value) else str(value)


def _marks(values: dict[str, float], row: RowSpec) -> dict[str, str]:
    """method -> "best" / "second" for one group of comparable numbers."""
    if row.higher_is_better is None or len(values) < 2:
        return {}
    printed = {m: float(_formatted(v, row.decimals)) for m, v in values.items()}
    ranked = sorted(set(printed.values()), reverse=row.higher_is_better)
    marks = {}
    for method, value in printed.items():
        if value == ranked[0]:
            marks[method] = "best"
        elif len(ranked) > 1 and value == ranked[1]:
            marks[method] = "second"
    return marks


def _cells(table: Table, footnotes: dict[str, int]) -> dict[tuple[str, str, str], str]:
    """Printed text of every cell, with marks and n/a footnote numbers."""
    cells = {}
    for dataset in table.datasets:
        for row in table.rows:
            if (dataset, row.key) in table.omitted:
                for method in table.methods:
                    cells[(dataset, method, row.key)] = "–"
                continue
            present = {m: table.values[(dataset, m, row.key)] for m in table.methods
                       if (dataset, m, row.key) in table.values}
            marks = _marks(present, row) if table.mark_best else {}
            for method in table.methods:
                key = (dataset, method, row.key)
                if method in present:
                    text = _formatted(present[method], row.decimals)
                    mark = marks.get(method)
                    text = f"**{text}**" if mark == "best" else text
                    cells[key] = f"<u>{text}</u>" if mark == "second" else text
                else:
                    reason = table.na.get(key, "no result")
                    number = footnotes.setdefault(reason, len(footnotes) + 1)
                    cells[key] = f"n/a [{number}]"
    return cells


def _markdown_rows(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def render_markdown(table: Table) -> str:
    """The table in the paper's orientation, then footnotes (n/a reasons) and notes."""
    if table.layout not in LAYOUTS:
        raise EvaluationError(f"layout must be one of {LAYOUTS}, got {table.layout!r}")
    footnotes: dict[str, int] = {}
    cells = _cells(table, footnotes)
    grouped = len(table.datasets) > 1
    body: list[list[str]] = []
    if table.layout == "metrics_as_rows":
        header = (["Datasets"] if grouped else []) + ["Metrics", *table.methods]
        for dataset in table.datasets:
            rows = [r for r in table.rows if (dataset, r.key) not in table.omitted]
            for i, row in enumerate(rows):
                lead = ([dataset if i == 0 else ""] if grouped else []) + [row.header]
                body.append(lead + [cells[(dataset, m, row.key)] for m in table.methods])
    elif table.layout == "datasets_as_columns":
        pairs = [(d, r) for d in table.datasets for r in table.rows
                 if (d, r.key) not in table.omitted]
        header = ["Methods"] + [f"{d} {r.header}" if len(table.rows) > 1 else d
                                for d, r in pairs]
        for method in table.methods:
            body.append([method] + [cells[(d, method, r.key)] for d, r in pairs])
    else:
        header = (["Datasets"] if grouped else []) + ["Methods"] + [r.header for r in table.rows]
        for dataset in table.datasets:
            for i, method in enumerate(table.methods):
                lead = ([dataset if i == 0 else ""] if grouped else []) + [method]
                body.append(lead + [cells[(dataset, method, r.key)] for r in table.rows])
    lines = [f"### {table.title}", "", *_markdown_rows(header, body), ""]
    if table.mark_best:
        lines.append("Best in **bold**, second best <u>underlined</u> (↑ higher is better, "
                     "↓ lower is better).")
    if footnotes:
        lines.append("")
        lines += [f"[{n}] n/a: {reason}  " for reason, n in footnotes.items()]
    if table.notes:
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"
