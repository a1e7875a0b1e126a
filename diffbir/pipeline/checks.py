"""Checks made before the work they protect: output paths, and the memory of one image.

Output paths are checked before any model loads, the memory estimate before an image enters
stage 1, so that a run never restores images it cannot write and never dies in the allocator
halfway through a batch. (The output folder itself: :func:`diffbir.files.check_output_folder`.)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffbir.pipeline.cleaner import target_size
from diffbir.pipeline.options import LATENT_FACTOR, RestoreOptions
from diffbir.pipeline.resize import short_side_size


def _work_size(height: int, width: int, min_side: int) -> tuple[int, int]:
    """The stage-2 size of an output of ``height`` x ``width`` (short side at least min_side)."""
    if min(height, width) >= min_side:
        return height, width
    return short_side_size(height, width, min_side)

GIB = 1024**3
# Lower bounds of the bytes per pixel (per image, per byte of the working dtype) that must be
# live at once: an untiled VAE decoder holds ~3 full-resolution maps of its 128 channels; a
# tiled run still holds ~12 full-size 3-channel float images (condition, padded copy, decoded,
# colour-fixed, resized, stage-1 output); an untiled stage-1 model ~2 maps of 64 channels.
UNTILED_STAGE2_PER_PIXEL = 3 * 128
TILED_STAGE2_PER_PIXEL = 12 * 3
UNTILED_STAGE1_PER_PIXEL = 2 * 64


def blocking_file(path: Path, root: Path) -> Path | None:
    """The file (not folder) that stands where a parent folder of ``path`` under ``root`` must
    be created, if any."""
    for parent in reversed(path.relative_to(root).parents):
        candidate = root / parent
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def memory_limit(device: torch.device) -> int:
    """Bytes the device can hold at most: the GPU's memory, else the RAM (and cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = Path("/sys/fs/cgroup/memory.max")
    try:
        text = cgroup.read_text().strip()
        if text.isdigit():
            limit = min(limit, int(text))
    except OSError:
        pass
    return limit


def estimate_memory(
    height: int, width: int, options: RestoreOptions, count: int, element_size: int
) -> int:
    """A lower bound of the bytes restoring ``count`` images of ``height`` x ``width`` needs at
    once (batch size x samples), beyond the model weights."""
    out_h, out_w = target_size(height, width, options.upscale)
    work_h, work_w = _work_size(out_h, out_w, options.min_side)
    tiled = options.tiles.diffusion is not None
    multiple = LATENT_FACTOR if tiled else 64
    pixels = (work_h + (-work_h) % multiple) * (work_w + (-work_w) % multiple)
    per_pixel = TILED_STAGE2_PER_PIXEL if options.tiles.vae_decoder else UNTILED_STAGE2_PER_PIXEL
    stage2 = count * pixels * per_pixel * element_size
    stage1 = 0 if options.tiles.stage1 else count * out_h * out_w * UNTILED_STAGE1_PER_PIXEL * 4
    return max(stage1, stage2)


def memory_problem(
    height: int,
    width: int,
    options: RestoreOptions,
    count: int,
    element_size: int,
    limit: int,
) -> str | None:
    """Why an input of ``height`` x ``width`` cannot be restored in ``limit`` bytes, or None."""
    need = estimate_memory(height, width, options, count, element_size)
    if need <= limit:
        return None
    out_h, out_w = target_size(height, width, options.upscale)
    work_h, work_w = _work_size(out_h, out_w, options.min_side)
    untiled = options.tiles.diffusion is None or options.tiles.vae_decoder is None
    fix = "add --tiled or use a" if untiled else "use a"
    return (
        f"too large to restore: output {out_w}x{out_h} (stage 2 works at {work_w}x{work_h}) "
        f"needs at least {need / GIB:.1f} GiB, more than the {limit / GIB:.1f} GiB here; "
        f"{fix} smaller --upscale, --min-side, --batch-size or --num-samples"
    )
