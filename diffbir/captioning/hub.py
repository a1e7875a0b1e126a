"""Captioner model folders: a local folder, or a Hugging Face Hub repository in the Hub's usual
cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, by default ``~/.cache/huggingface/hub``).

Loading never goes to the network: a repository is looked up in the cache only, and every file
a model needs is checked before it loads, so a missing file is one clear error naming it, where
it was looked for, and the command that fetches it (``diffbir-download --captioner NAME``, which
calls :func:`fetch_model`). Weights are read from safetensors files only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from diffbir.captioning.base import CaptionerError, MissingCaptionerFilesError, require_packages
from diffbir.weights import DownloadError

SAFETENSORS_INDEX = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class HubModel:
    """The files of one captioner's model: its Hub repository, what is fetched from it, and
    which files must be present (``one_of``: at least one file of each group)."""

    captioner: str
    repo_id: str
    use: str
    allow_patterns: tuple[str, ...]
    required: tuple[str, ...]
    one_of: tuple[tuple[str, ...], ...] = ()

    @property
    def fetch_command(self) -> str:
        return f"diffbir-download --captioner {self.captioner}"


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def missing_files(folder: Path, spec: HubModel) -> list[str]:
    """The files of ``spec`` absent from ``folder`` (weight shards listed by a safetensors
    index included); empty when the folder is complete."""
    missing = [name for name in spec.required if not (folder / name).is_file()]
    for group in spec.one_of:
        if not any((folder / name).is_file() for name in group):
            missing.append(" or ".join(group))
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CaptionerError(f"{index}: not a safetensors index ({err})") from err
        missing += [name for name in shards if not (folder / name).is_file()]
    return missing


def _missing_error(spec: HubModel, where: str, missing: list[str]) -> MissingCaptionerFilesError:
    lines = [f"captioner {spec.captioner}: {len(missing)} model file(s) missing from {where}:"]
    lines += [f"  - {name}" for name in missing]
    lines.append(
        f"Fetch {spec.repo_id} ({spec.use}) with `{spec.fetch_command}` (into the Hugging Face "
        "cache), or give the path of a folder that holds it."
    )
    return MissingCaptionerFilesError("\n".join(lines))


def resolve_model_folder(
    model: str | os.PathLike, spec: HubModel, *, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder holding the files of ``model``: an existing folder as given, else the Hub
    repository ``model`` (``owner/name``) in the cache. Raises
    :class:`MissingCaptionerFilesError` when a needed file is absent, without any download."""
    path = Path(model)
    if path.is_dir():
        missing = missing_files(path, spec)
        if missing:
            raise _missing_error(spec, f"the folder {path.resolve()}", missing)
        return path
    name = os.fspath(model)
    if not _REPO_ID.match(name):
        raise CaptionerError(
            f"captioner {spec.captioner} model: expected a folder or a Hub repository id "
            f"(owner/name, e.g. {spec.repo_id}), got {name!r} (no such folder)"
        )
    require_packages("huggingface_hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _cache_dir(cache_dir)
    where = f"the Hugging Face cache {cache} (repository {name})"
    try:
        folder = Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise _missing_error(spec, where, ["every file (the repository is not cached)"]) from None
    missing = missing_files(folder, spec)
    if missing:
        raise _missing_error(spec, f"{where}, snapshot {folder}", missing)
    return folder


def fetch_model(
    spec: HubModel, *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Download the files of ``spec`` into the Hub cache (files present are kept) and return
    the snapshot folder; raises :class:`DownloadError` on failure."""
    require_packages("huggingface_hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if not progress:
        disable_progress_bars()
    try:
        folder = Path(
            snapshot_download(
                spec.repo_id,
                cache_dir=_cache_dir(cache_dir),
                allow_patterns=list(spec.allow_patterns),
            )
        )
    except Exception as err:  # network, authentication and disk errors all surface here
        raise DownloadError(
            f"{spec.repo_id}: download failed ({err}); run again to resume"
        ) from err
    finally:
        if not progress:
            enable_progress_bars()
    missing = missing_files(folder, spec)
    if missing:
        raise DownloadError(f"{spec.repo_id}: downloaded, but {missing} missing from {folder}")
    return folder
