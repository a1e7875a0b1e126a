"""Per-image prompts: ``--prompts FILE.csv`` (image stem, positive prompt) and the
``prompts.csv`` written beside the outputs (same format, so it can be given back)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path

PROMPTS_FILE = "prompts.csv"
HEADER = ("stem", "prompt")


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """``{stem: positive prompt}`` from a two-column CSV; an optional first row ``stem,prompt``.

    The stem is the input's path relative to ``--input`` without its extension (for a flat
    folder, the file stem). Errors name the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompts {path}: cannot be read ({err})") from err
    prompts: dict[str, str] = {}
    reader = csv.reader(io.StringIO(text), strict=True)
    rows = iter(reader)
    while True:
        start = reader.line_num + 1  # where the next row begins
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as err:  # e.g. an unterminated quote: the rest would be one prompt
            raise ValueError(
                f"--prompts {path}, line {start}: not valid CSV ({err}); quote a "
                'prompt that holds commas as "..." and double a quote inside it'
            ) from err
        line = start
        if not row or (line == 1 and tuple(row) == HEADER):
            continue
        if len(row) != 2 or not row[0].strip():
            raise ValueError(
                f"--prompts {path}, line {line}: expected two columns (image stem, prompt), "
                f"got {row}"
            )
        stem = row[0].strip()
        if stem in prompts:
            raise ValueError(f"--prompts {path}, line {line}: stem {stem!r} given twice")
        prompts[stem] = row[1]
    return prompts


def prompts_csv(prompts: Mapping[str, str]) -> str:
    """The CSV text of ``{stem: prompt}``, with the header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(prompts.items())
    return out.getvalue()
