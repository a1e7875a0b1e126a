"""Training of the generation module (GM, stage 2): IRControlNet on a frozen Stable Diffusion.

Loss of paper Eq. 4: ``||eps - eps_theta(z_t, c, t, c_RM)||^2`` with ``z_0`` a sample of the VAE
posterior of the HQ image, ``c_RM`` the posterior mode of the frozen restoration module's output
for the LQ image, ``t`` uniform in ``[0, 1000)`` (with ``parameterization: v`` the target is the
velocity instead, see :meth:`NoiseSchedule.training_target`). Only IRControlNet is trained and
saved.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffbir.checkpoint import (
    CheckpointError,
    load_weights,
    read_state_dict,
    save_state_dict,
    sub_state_dict,
)
from diffbir.config import build_model, load_config
from diffbir.diffusion.denoiser import GuidedModel, ModelDenoiser
from diffbir.diffusion.noise import OfficialNoise
from diffbir.diffusion.samplers import SAMPLERS
from diffbir.diffusion.schedule import NoiseSchedule, check_parameterization
from diffbir.training.common import TrainingTask, freeze, pad_to_multiple, psnr
from diffbir.training.data import derive_seed

TRAINED_PREFIX = "cldm.controlnet."


def load_stage1(config: str, weights: str) -> nn.Module:
    """A frozen stage-1 restoration model from its model config and weight file."""
    model = build_model(load_config(config))
    load_weights(model, read_state_dict(weights), str(weights))
    return freeze(model)


class GenerationModuleTask(TrainingTask):
    """GM training around :class:`~diffbir.models.control_ldm.ControlLDM`.

    ``cfg["model"]`` keys: ``config`` (ControlLDM model config), ``sd_weights`` (official SD 2.1
    checkpoint), ``controlnet_init`` (IRControlNet weights, or null to copy the UNet),
    ``stage1`` (null, or ``{config, weights}`` of the frozen RM), ``noise_aug_timestep``
    (0: off; else the condition latent is diffused to a random step below it),
    ``parameterization`` (eps or v) and ``zero_terminal_snr`` (the schedule the SD base was
    trained with), ``gradient_checkpointing``.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__(cfg)
        model_cfg = cfg["model"]
        self.cldm = build_model(load_config(model_cfg["config"]))
        self.cldm.load_sd_weights(read_state_dict(model_cfg["sd_weights"]), model_cfg["sd_weights"])
        if model_cfg.get("controlnet_init"):
            path = model_cfg["controlnet_init"]
            self.cldm.load_controlnet_weights(read_state_dict(path), path)
        else:
            self.cldm.init_controlnet_from_unet()
        self.cldm.freeze_sd()
        for part in (self.cldm.unet, self.cldm.vae, self.cldm.text_encoder):
            freeze(part)
        self.cldm.controlnet.requires_grad_(True)
        if model_cfg.get("gradient_checkpointing"):
            self.cldm.set_gradient_checkpointing(True)
        stage1 = model_cfg.get("stage1")
        self.stage1 = load_stage1(stage1["config"], stage1["weights"]) if stage1 else None
        self.noise_aug_timestep = int(model_cfg.get("noise_aug_timestep") or 0)
        self.parameterization = model_cfg.get("parameterization") or "eps"
        check_parameterization(self.parameterization)
        self.schedule = NoiseSchedule.linear(
            zero_terminal_snr=bool(model_cfg.get("zero_terminal_snr"))
        )
        # only IRControlNet goes into Lightning checkpoints; the rest comes from its own files
        self.strict_loading = False

    # ----- frozen parts stay frozen -----
    def frozen_modules(self) -> list[nn.Module]:
        """Modules that are never trained (kept in eval mode, left out of checkpoints)."""
        parts = [self.cldm.unet, self.cldm.vae, self.cldm.text_encoder]
        return parts + ([self.stage1] if self.stage1 is not None else [])

    def train(self, mode: bool = True) -> GenerationModuleTask:
        super().train(mode)
        for part in self.frozen_modules():
            part.eval()
        return self

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.cldm.controlnet.parameters()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(TRAINED_PREFIX)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        expected = {TRAINED_PREFIX + k for k in self.cldm.controlnet.state_dict()}
        found = set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise CheckpointError(
                "training checkpoint does not hold exactly the IRControlNet weights: "
                f"{len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )

    # ----- the objective -----
    @torch.no_grad()
    def condition(self, lq: Tensor, prompts: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The condition image (stage-1 output, or LQ) and ``{"text", "latent"}`` for it."""
        image = lq
        if self.stage1 is not None:
            h, w = lq.shape[-2:]
            multiple = getattr(self.stage1, "size_multiple", 1)  # SwinIR: 64
            image = self.stage1(pad_to_multiple(lq, multiple))[..., :h, :w]
            image = image.clamp(0, 1)
        return image, self.cldm.prepare_condition(image, list(prompts))

    def diffusion_loss(
        self, hq: Tensor, cond: dict[str, Tensor], generator: torch.Generator
    ) -> Tensor:
        """Eq. 4 for one batch (eps or v target), all randomness drawn from ``generator``."""
        with torch.no_grad():
            z0 = self.cldm.vae_encode(hq * 2 - 1, sample=True, generator=generator)
        batch = z0.shape[0]
        steps = self.schedule.num_timesteps
        t = torch.randint(0, steps, (batch,), generator=generator, device=z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        if self.noise_aug_timestep > 0:
            t_aug = torch.randint(
                0, self.noise_aug_timestep, (batch,), generator=generator, device=z0.device
            )
            aug_noise = torch.randn(z0.shape, generator=generator, device=z0.device)
            cond = {**cond, "latent": self.schedule.q_sample(cond["latent"], t_aug, aug_noise)}
        prediction = self.cldm(self.schedule.q_sample(z0, t, noise), t, cond)
        target = self.schedule.training_target(z0, noise, t, self.parameterization)
        return F.mse_loss(prediction.float(), target.float())

    def _generator(self, *stream: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, *stream))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        _, cond = self.condition(batch["lq"], batch["prompt"])
        generator = self._generator(0, self.batches_seen, self.global_rank)
        loss = self.diffusion_loss(batch["hq"], cond, generator)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["hq"].shape[0])
        return loss

    # ----- validation -----
    @torch.no_grad()
    def restore(self, cond: dict[str, Tensor], steps: int, generator: torch.Generator) -> Tensor:
        """Spaced-DDPM sampling with ``steps`` steps; the decoded image in [0, 1]."""
        spec = SAMPLERS["spaced"]
        grid = spec.make_grid(self.schedule, steps)
        denoise = ModelDenoiser(GuidedModel(self.cldm, cond), grid, self.parameterization)
        noise = OfficialNoise(generator)
        z0 = spec.sample(denoise, noise(cond["latent"]), grid, noise=noise)
        return (self.cldm.vae_decode(z0) + 1) / 2

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        val = self.cfg["data"]["val"]
        hq, lq = batch["hq"], batch["lq"]
        size = hq.shape[0]
        cond_image, cond = self.condition(lq, batch["prompt"])
        loss = self.diffusion_loss(hq, cond, self._generator(1, batch_idx))
        self.log("val/loss", loss, batch_size=size)
        if batch_idx < int(val["sample_batches"]):
            restored = self.restore(cond, int(val["sample_steps"]), self._generator(2, batch_idx))
            self.log("val/psnr", psnr(restored, hq).mean(), batch_size=size)
            self.log("val/psnr_condition", psnr(cond_image, hq).mean(), batch_size=size)
            if batch_idx == 0:
                self.log_image_grid("val/lq_condition_restored_hq", [lq, cond_image, restored, hq])

    # ----- export -----
    def load_trained_weights(self, sd: Mapping[str, Tensor], source: str) -> None:
        """Load IRControlNet from a training checkpoint state dict (keys ``cldm.controlnet.*``)."""
        load_weights(self.cldm.controlnet, sub_state_dict(sd, TRAINED_PREFIX), source)

    def export_weights(self, path: str | os.PathLike) -> Path:
        """Write IRControlNet as a flat state dict, official v2.pth format (.pth/.safetensors)."""
        path = Path(path)
        save_state_dict(self.cldm.controlnet.state_dict(), path)
        return path
