"""Tiny random models written as the official weight files, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from diffbir.config import build_model, load_config
from diffbir.diffusion import NoiseSchedule


def write_tiny_weights(root: Path) -> Path:
    """Tiny random models (``control_ldm_tiny``, ``bsrnet_tiny``) saved like the official files
    in ``root`` (wrapped SD ckpt, flat .pth files); IRControlNet's zero convolutions get small
    random values so that the control has an effect. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cldm = build_model(load_config("control_ldm_tiny"))
    schedule = NoiseSchedule.linear()
    sd = {
        **cldm.sd_state_dict(),
        "betas": schedule.betas,
        "alphas_cumprod": schedule.alphas_cumprod,
    }
    torch.save({"state_dict": sd, "global_step": 0}, root / "v2-1_512-ema-pruned.ckpt")
    control = {
        k: torch.randn_like(v) * 0.05 if ("zero_convs" in k or "middle_block_out" in k) else v
        for k, v in cldm.controlnet.state_dict().items()
    }
    torch.save(control, root / "v2.pth")
    torch.save(build_model(load_config("bsrnet_tiny")).state_dict(), root / "BSRNet.pth")
    return root
