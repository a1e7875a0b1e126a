"""Output files and folders: atomic writes, stale temporary files, writable folders.

Atomic writes go to a temporary file beside the target, renamed over it when complete.

A reader never sees a half-written file; a write that fails or is interrupted removes its
temporary file. Only a killed process leaves one behind: it is named
``.<name>.<random>.diffbir.tmp`` so that :func:`remove_stale_temp_files` (run by the next run
before it writes) can find it. Finished files get the permissions of any new file (``0o666``
minus the umask), not the ``0o600`` of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_SUFFIX = ".diffbir.tmp"


def _file_mode() -> int:
    """``0o666`` minus the process's current umask."""
    try:  # Linux shows the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # elsewhere reading it means setting it: restore it at once
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; it replaces ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temp_files(folder: str | os.PathLike, older_than: float | None = None) -> int:
    """Delete the temporary files of killed writes under ``folder``; returns how many.

    Only files last modified before ``older_than`` (a ``time.time()``, default: now) are removed,
    so a process that starts while another one writes into the same folder leaves its fresh
    temporary files alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    limit = time.time() if older_than is None else older_than
    removed = 0
    for tmp in folder.rglob(f".*{TEMP_SUFFIX}"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < limit:
                tmp.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to delete: leave it
            continue
    return removed


class OutputFolderError(ValueError):
    """An output folder that cannot be created or written."""


def check_output_folder(folder: str | os.PathLike, flag: str = "--output") -> Path:
    """Create ``folder`` if needed and prove it writable by writing and removing a file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(f"{flag}: expected a folder, got a file: {folder}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(
            f"{flag}: cannot create the folder {folder} ({err.strerror or err})"
        ) from err
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".diffbir-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputFolderError(
            f"{flag}: cannot write into the folder {folder} ({err.strerror or err})"
        ) from err
    return folder
