"""Reading, checking and writing weight files (``.ckpt``/``.pth``/``.pt`` and ``.safetensors``).

Every pickle-based file is read with ``torch.load(weights_only=True)``: a file that would need to
run code to unpickle is refused with a :class:`CheckpointError`.

Fast loading without a second copy of the weights: :func:`read_state_dict` memory-maps the file
(tensors are views of the mapped file, read from disk when first touched), models are built with
their parameters on the ``meta`` device (:func:`empty_parameters`: no memory, no random
initialisation) and :func:`load_weights` with ``assign=True`` makes the file's tensors the
model's parameters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from diffbir.files import atomic_path

_WRAPPER_KEYS = ("state_dict", "params_ema", "params", "model")
_SHOWN = 5


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the model it is loaded into."""


class WeightsNotFoundError(FileNotFoundError):
    """A weight file that is not where it was looked for."""


def _strip_module_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _unwrap(obj: object, source: str) -> dict[str, Tensor]:
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
        )
        if inner is None:
            raise CheckpointError(
                f"{source}: expected a state dict of tensors (optionally under one of "
                f"{list(_WRAPPER_KEYS)}), found keys {sorted(obj)[:_SHOWN]}"
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, found {type(obj).__name__}")
    return _strip_module_prefix(obj)


def _is_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def read_state_dict(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, Tensor]:
    """Read a weight file into a flat ``{key: tensor}`` dict on the CPU.

    Unwraps ``{"state_dict": ...}`` style containers and strips a ``module.`` prefix that every
    key carries (DataParallel/DDP files). With ``mmap`` (default) the tensors of a torch zip
    file (every ``torch.save`` since PyTorch 1.6) are private copy-on-write views of the mapped
    file: nothing is read until used, and writing to them never changes the file. Safetensors
    files are always memory-mapped by their reader.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weight file not found: {path.resolve()}")
    source = str(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return _strip_module_prefix(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{source}: not a readable safetensors file ({err})") from err
    try:
        obj = torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)
        )
    except Exception as err:
        raise CheckpointError(
            f"{source}: cannot be loaded safely with torch.load(weights_only=True): {err}"
        ) from err
    return _unwrap(obj, source)


def sub_state_dict(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Entries whose key starts with ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"\n  {len(items)} {title}: {shown}{more}"


def load_weights(
    module: nn.Module,
    sd: Mapping[str, Tensor],
    source: str,
    *,
    ignore_prefixes: Iterable[str] = (),
    assign: bool = False,
) -> None:
    """Load ``sd`` into ``module`` strictly, with an error that says exactly what does not fit.

    Missing keys that name buffers of ``module`` are allowed: such buffers are derived at
    construction (e.g. attention masks and index tables); official files may or may not hold them.
    ``assign``: the tensors of ``sd`` become the parameters (no copy; needed for a module built
    under :func:`empty_parameters`), in the model's dtype and memory layout: a tensor that
    differs in either is converted once, here.
    """
    ignore = tuple(ignore_prefixes)
    sd = {k: v for k, v in sd.items() if not (ignore and k.startswith(ignore))}
    own = module.state_dict()
    buffers = {name for name, _ in module.named_buffers()}
    missing = [k for k in own if k not in sd and k not in buffers]
    unexpected = [k for k in sd if k not in own]
    misshaped = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    # a float parameter read from an integer/bool tensor would be cast silently by copy_
    mistyped = [
        f"{k} (file {sd[k].dtype}, model {own[k].dtype})"
        for k in own
        if k in sd and own[k].is_floating_point() and not sd[k].is_floating_point()
    ]
    if missing or unexpected or misshaped or mistyped:
        msg = f"{source}: weights do not fit {type(module).__name__}"
        if missing:
            msg += _listing("missing keys", missing)
        if unexpected:
            msg += _listing("unexpected keys", unexpected)
        if misshaped:
            msg += _listing("keys with a different shape", misshaped)
        if mistyped:
            msg += _listing("keys expected floating point, found another dtype", mistyped)
        raise CheckpointError(msg)
    if assign:
        mapped = file_mappings()
        sd = {k: _like(v, own[k], mapped) for k, v in sd.items()}
    module.load_state_dict(sd, strict=False, assign=assign)


def _like(tensor: Tensor, target: Tensor, mapped: list[tuple[int, int]]) -> Tensor:
    """``tensor`` in the dtype and (channels-last or not) layout of ``target``. When that is a
    new tensor and ``tensor`` lies in one of the ``mapped`` file ranges, its pages are released
    (:func:`release_pages`): loading does not hold the file's copy of a converted tensor beside
    the conversion (in half precision every tensor; in float32 the channels-last conv weights)."""
    channels_last = target.ndim == 4 and target.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    converted = tensor.to(target.dtype).contiguous(memory_format=layout)
    if converted.data_ptr() != tensor.data_ptr() and tensor.is_contiguous():
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if any(low <= start and end <= high for low, high in mapped):
            release_pages(start, end)
    return converted


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process that map files (``/proc/self/maps``; empty elsewhere),
    such as the weight files :func:`read_state_dict` memory-maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)  # range, perms, offset, device, inode, path
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        if fields[1].endswith("p") and fields[4] != "0":  # private, backed by a file
            low, high = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((low, high))
    return ranges


_MADV_DONTNEED = 4


def release_pages(start: int, end: int) -> bool:
    """Drop the whole pages between addresses ``start`` and ``end`` of a private file mapping
    from this process (``madvise(MADV_DONTNEED)``); returns whether the kernel accepted.

    The data stays: a page of a private file mapping that was never written is read again from
    the file (usually still in the page cache) if touched. Only for the file's own tensors, as
    :func:`read_state_dict` maps them; a page written since would lose that write.
    """
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if not sys.platform.startswith("linux") or last <= first:
        return False
    return _madvise()(first, last - first, _MADV_DONTNEED) == 0


@functools.cache
def _madvise() -> Callable[[int, int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules with their parameters on the ``meta`` device (no memory, no random
    initialisation); buffers are built as usual, since some are computed, not loaded.

    Load such a module with :func:`load_weights` ``(..., assign=True)``; a parameter that the
    file does not hold stays on ``meta`` and is reported by :func:`check_materialized`.
    """
    register = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def check_materialized(module: nn.Module, source: str) -> None:
    """Raise a :class:`CheckpointError` naming the tensors of ``module`` still on ``meta``."""
    empty = [name for name, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if empty:
        raise CheckpointError(
            f"{source}: no values for these tensors of {type(module).__name__}"
            + _listing("tensors", empty)
        )


def save_state_dict(sd: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write a flat state dict atomically as ``.safetensors`` or a torch file (``.pth``)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)
