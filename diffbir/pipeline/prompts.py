"""Per-image prompts: ``--prompts FILE.csv`` (image stem, positive prompt) and the
``prompts.csv`` written beside the outputs.

``prompts.csv`` is the record of each input's positive prompt, with the columns ``stem``,
``prompt``, ``caption``: ``prompt`` is the whole positive prompt the input is restored with (for
a captioned input ``caption, pos_prompt``, as the official run joins them; for one listed in
``--prompts``, that file's prompt; else ``pos_prompt``), ``caption`` the captioner's text it was
made from (empty when not captioned). The file can be given back as ``--prompts`` (its
``caption`` column is then ignored), so a user can caption once, edit the prompts and restore.

A part of an input with a prompt of its own (a face of ``--task unaligned_face``) has a row
keyed by :func:`part_key`: the input's stem, ``//`` and the part's name (``sub/a//face0``). No
stem holds ``//``: a stem is a relative path made by pathlib, which never keeps an empty folder
name, so a part's key never clashes with an input's (``sub/a_face0.png`` is the stem
``sub/a_face0``), and the stem it belongs to is what comes before the first ``//``
(:func:`whole_of`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PROMPTS_FILE = "prompts.csv"
HEADER = ("stem", "prompt")
RECORD_HEADER = ("stem", "prompt", "caption")
PART_SEPARATOR = "//"


def part_key(stem: str, part: str) -> str:
    """The key of part ``part`` of the input ``stem`` (its row in ``prompts.csv``)."""
    return f"{stem}{PART_SEPARATOR}{part}"


def whole_of(key: str) -> str:
    """The stem of the input a key belongs to: the key itself for an input's own row."""
    return key.split(PART_SEPARATOR, 1)[0]


@dataclass(frozen=True)
class PromptRow:
    """One row of ``prompts.csv``: the positive prompt, and the caption it was made from."""

    prompt: str
    caption: str = ""


def read_prompt_rows(path: str | os.PathLike, name: str = "--prompts") -> dict[str, PromptRow]:
    """``{stem: PromptRow}`` from a two-column CSV (image stem, prompt; an optional first row
    ``stem,prompt``) or a ``prompts.csv`` record (first row ``stem,prompt,caption``).

    The stem is the input's path relative to ``--input`` without its extension (for a flat
    folder, the file stem). Errors name ``name`` (the flag or file), the file and the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{name} {path}: cannot be read ({err})") from err
    rows: dict[str, PromptRow] = {}
    reader = csv.reader(io.StringIO(text), strict=True)
    lines = iter(reader)
    columns = HEADER
    while True:
        start = reader.line_num + 1  # where the next row begins
        try:
            row = next(lines)
        except StopIteration:
            break
        except csv.Error as err:  # e.g. an unterminated quote: the rest would be one prompt
            raise ValueError(
                f"{name} {path}, line {start}: not valid CSV ({err}); quote a "
                'prompt that holds commas as "..." and double a quote inside it'
            ) from err
        line = start
        if line == 1 and tuple(row) in (HEADER, RECORD_HEADER):
            columns = tuple(row)
            continue
        if not row:
            continue
        if len(row) != len(columns) or not row[0].strip():
            raise ValueError(
                f"{name} {path}, line {line}: expected {_count(columns)} columns "
                f"({', '.join(_WORDS[c] for c in columns)}), got {row}"
            )
        stem = row[0].strip()
        if stem in rows:
            raise ValueError(f"{name} {path}, line {line}: stem {stem!r} given twice")
        rows[stem] = PromptRow(*row[1:])
    return rows


_WORDS = {"stem": "image stem", "prompt": "prompt", "caption": "caption"}


def _count(columns: tuple[str, ...]) -> str:
    return {2: "two", 3: "three"}[len(columns)]


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """``{stem: positive prompt}`` of a ``--prompts`` file (see :func:`read_prompt_rows`)."""
    return {stem: row.prompt for stem, row in read_prompt_rows(path).items()}


def prompts_csv(rows: Mapping[str, PromptRow]) -> str:
    """The text of a ``prompts.csv`` record of ``{stem: PromptRow}``, with its header row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RECORD_HEADER)
    writer.writerows((stem, row.prompt, row.caption) for stem, row in rows.items())
    return out.getvalue()
