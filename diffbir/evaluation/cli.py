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
(``infer.weights.cldm_config``, ``infer.weights.controlnet`` = the training exports under
``runs/``).
A preset dataset may list its own ``metrics`` (Table 6: no-reference ones on RealSRSet,
full-reference ones on ImageNet); the rows of the others are left out of its group. Results go
to ``DIR/results/<dataset>/<column>`` and are reused on the next run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from diffbir.evaluation.metrics import METRICS, EvaluationError, metric_info
from diffbir.evaluation.presets import run_preset
from diffbir.evaluation.scoring import Column, Dataset, evaluate, write_tables
from diffbir.evaluation.tables import LAYOUTS, Table
from diffbir.files import OutputFolderError, check_output_folder


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


def _preset(args: argparse.Namespace) -> list[Table]:
    if args.gt or args.fid_ref:
        raise EvaluationError("with --preset, set folders with --data NAME=DIR, not --gt/--fid-ref")
    return run_preset(
        args.preset, Path(args.out), overrides=args.overrides,
        data=_parse_pairs(args.data, "--data"), results=_parse_pairs(args.result, "--result"),
        metrics=_parse_metrics(args.metrics), weights_dir=args.weights_dir, device=args.device,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diffbir-eval``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        check_output_folder(args.out, "--out")  # before any scoring or inference
        tables = _preset(args) if args.preset else [_adhoc(args)]
        text = write_tables(tables, Path(args.out))
    except (EvaluationError, OutputFolderError, FileNotFoundError) as err:
        print(f"diffbir-eval: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffbir-eval: interrupted (restored result folders are kept)", file=sys.stderr)
        return 130
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
