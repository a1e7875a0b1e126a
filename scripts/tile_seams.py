"""Seams of tiled diffusion: tiled against untiled restorations of real47 photos, per blending
weight (``--tile-weights``), with the tiny parity models (random weights, official formats).

For each photo (short side resized to ``--side``, long side cropped to a multiple of 64, so that
tiled and untiled runs sample the same latent size from the same noise) the same restoration is
run untiled and tiled; reported per weight kind, averaged over the photos, in grey levels (0-255):
``error``: mean |tiled - untiled| of the final image; ``seam``: the mean absolute step between
neighbouring pixels across the lines where a tile starts or ends, minus the same for the
untiled image (0: no seam); ``seam_latent``: the same on the final latent (latent units).

    python scripts/tile_seams.py --photos 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffbir.pipeline.loading import WeightPaths, build_restorer
from diffbir.pipeline.options import LATENT_FACTOR, RestoreOptions, TileOptions
from diffbir.pipeline.tiling import TILE_WEIGHTS, tile_boxes

SHARED = Path(__file__).resolve().parents[2] / "shared"


def edge_step(img: torch.Tensor, rows: set[int], cols: set[int]) -> float:
    """Mean |difference| between pixels on both sides of the given row/column lines."""
    steps = [(img[..., r, :] - img[..., r - 1, :]).abs().mean() for r in rows]
    steps += [(img[..., :, c] - img[..., :, c - 1]).abs().mean() for c in cols]
    return float(torch.stack(steps).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parity", type=Path, default=SHARED / "parity")
    p.add_argument("--photos-dir", type=Path, default=SHARED / "data" / "real47")
    p.add_argument("--photos", type=int, default=8)
    p.add_argument("--side", type=int, default=192, help="short side of the condition")
    p.add_argument("--tile", type=int, default=128, help="diffusion tile (pixels)")
    p.add_argument("--stride", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    restorer = build_restorer(
        "custom",
        WeightPaths(args.parity / "sd.ckpt", args.parity / "controlnet.pth", None),
        version="v2",
        cldm_config="control_ldm_tiny",
        device="cpu",
    )
    paths = sorted(args.photos_dir.iterdir())[: args.photos]
    totals = {kind: np.zeros(3) for kind in TILE_WEIGHTS}
    used = 0
    for path in paths:
        img = Image.open(path).convert("RGB")
        scale = args.side / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        img = img.crop((0, 0, img.width // 64 * 64, img.height // 64 * 64))
        lq = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
        base = {"upscale": 1.0, "steps": args.steps, "min_side": 0, "color_fix": "none"}
        cond = restorer.condition(lq, RestoreOptions(**base))
        ref_z = restorer.sample(cond, [0], RestoreOptions(**base))
        ref = restorer.finish(ref_z, cond, RestoreOptions(**base)) * 255
        lat_h, lat_w = ref_z.shape[-2:]
        boxes = tile_boxes(lat_h, lat_w, args.tile // LATENT_FACTOR, args.stride // LATENT_FACTOR)
        rows = {r for y0, y1, _, _ in boxes for r in (y0, y1) if 0 < r < lat_h}
        cols = {c for _, _, x0, x1 in boxes for c in (x0, x1) if 0 < c < lat_w}
        if not rows and not cols:
            print(f"{path.name}: one tile, skipped", flush=True)
            continue
        used += 1
        for kind in TILE_WEIGHTS:
            tiles = TileOptions(diffusion=args.tile, diffusion_stride=args.stride, weights=kind)
            opts = RestoreOptions(**base, tiles=tiles)
            z = restorer.sample(cond, [0], opts)
            out = restorer.finish(z, cond, opts) * 255
            f = LATENT_FACTOR
            px_rows, px_cols = {f * r for r in rows}, {f * c for c in cols}
            totals[kind] += (
                float((out - ref).abs().mean()),
                edge_step(out, px_rows, px_cols) - edge_step(ref, px_rows, px_cols),
                edge_step(z, rows, cols) - edge_step(ref_z, rows, cols),
            )
        print(f"{path.name}: done", flush=True)
    print(f"{used} photos\n| weights | error | seam | seam_latent |\n| --- | --- | --- | --- |")
    for kind, total in totals.items():
        error, seam, seam_latent = total / used
        print(f"| {kind} | {error:.2f} | {seam:+.2f} | {seam_latent:+.3f} |")


if __name__ == "__main__":
    main()
