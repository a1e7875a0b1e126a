"""Region-adaptive restoration guidance (paper §3.4, §6.3, Algorithm 1), as a wrapper of the
clean-estimate denoiser, so that it works with every sampler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffbir.diffusion.denoiser import Denoiser
from diffbir.diffusion.grids import Grid

# guidance(pred_x0, t_model, coef1) -> guided pred_x0
Guidance = Callable[[Tensor, float, float], Tensor]

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))
PATCH_SIZE = 2
# The update is z0 <- z0 - (GRADIENT_SCALE * s) * grad / coef1, so that the official
# ``--g_scale`` values (0, 0.5, 1) keep their meaning.
GRADIENT_SCALE = 3000.0

Space = Literal["rgb", "latent"]
LossKind = Literal["w_mse", "mse"]


def _check_image(img: Tensor, name: str) -> None:
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"{name}: expected an RGB batch (B, 3, H, W), got {tuple(img.shape)}")


def region_weight_map(img01: Tensor) -> Tensor:
    """Weight map W = 1 - G(I) of an RGB image batch in [0, 1]; returns (B, 1, H, W).

    G is tanh of the Sobel gradient magnitude (of the gray image, replicate-padded) summed over
    non-overlapping 2x2 patches and broadcast back to the pixels. For an odd height or width
    the magnitude map is replicate-padded by one row/column, so border patches see as many
    values as interior ones.
    """
    _check_image(img01, "region_weight_map input")
    gray_weights = img01.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    gray = (img01 * gray_weights).sum(dim=1, keepdim=True)
    sobel = img01.new_tensor((SOBEL_X, SOBEL_Y)).unsqueeze(1)
    grad_xy = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), sobel)
    magnitude = grad_xy.pow(2).sum(dim=1, keepdim=True).sqrt()

    height, width = magnitude.shape[-2:]
    pad_h, pad_w = height % PATCH_SIZE, width % PATCH_SIZE
    if pad_h or pad_w:
        magnitude = F.pad(magnitude, (0, pad_w, 0, pad_h), mode="replicate")
    batch, _, padded_h, padded_w = magnitude.shape
    patches = magnitude.view(
        batch, 1, padded_h // PATCH_SIZE, PATCH_SIZE, padded_w // PATCH_SIZE, PATCH_SIZE
    )
    patch_strength = patches.sum(dim=(3, 5)).tanh()
    strength = patch_strength.repeat_interleave(PATCH_SIZE, dim=2).repeat_interleave(
        PATCH_SIZE, dim=3
    )
    return 1.0 - strength[..., :height, :width]


class RestorationGuidance:
    """Pulls the clean-latent estimate towards the stage-1 image by gradient descent.

    ``target`` is the stage-1 image in [0, 1], (B, 3, H, W). In ``"rgb"`` space the loss is taken
    on ``decode(z0)`` (pixels in [-1, 1]) against ``2 * target - 1``; in ``"latent"`` space on z0
    against ``encode(2 * target - 1)``, with the weight map area-resized to the latent size.
    Loss: mean over (C, H, W) of ``W * (prediction - target) ** 2``, summed over the batch
    (``"mse"``: W = 1). The update ``z0 <- z0 - (3000 * scale) * grad / coef1`` is applied
    ``repeat`` times when ``t_stop < t_model + 1 < t_start``. Target and weight map are computed
    once here. Works inside ``torch.no_grad()``/``torch.inference_mode()`` and returns a detached
    tensor.
    """

    def __init__(
        self,
        target: Tensor,
        scale: float,
        *,
        space: Space = "rgb",
        loss: LossKind = "w_mse",
        t_start: int = 1001,
        t_stop: int = -1,
        repeat: int = 1,
        decode: Callable[[Tensor], Tensor] | None = None,
        encode: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        _check_image(target, "guidance target")
        if space not in ("rgb", "latent"):
            raise ValueError(f"guidance space: expected 'rgb' or 'latent', got {space!r}")
        if loss not in ("w_mse", "mse"):
            raise ValueError(f"guidance loss: expected 'w_mse' or 'mse', got {loss!r}")
        if space == "rgb" and decode is None:
            raise ValueError("guidance space 'rgb' needs a decode function (latent -> [-1, 1])")
        if space == "latent" and encode is None:
            raise ValueError("guidance space 'latent' needs an encode function ([-1, 1] -> latent)")
        if scale < 0:
            raise ValueError(f"guidance scale: expected >= 0, got {scale}")
        if repeat < 1:
            raise ValueError(f"guidance repeat: expected >= 1, got {repeat}")
        self.scale = scale
        self.space = space
        self.t_start = t_start
        self.t_stop = t_stop
        self.repeat = repeat
        self.decode = decode

        with torch.no_grad():
            target = target.detach()
            weight = region_weight_map(target) if loss == "w_mse" else None
            goal = 2.0 * target - 1.0
            if space == "latent":
                goal = encode(goal)
                if weight is not None:
                    weight = F.interpolate(weight, size=goal.shape[-2:], mode="area")
        # Plain tensors even if built under inference_mode, so autograd may use them later.
        with torch.inference_mode(False):
            self.target = goal.clone()
            self.weight = None if weight is None else weight.clone()

    def is_active(self, t_model: float) -> bool:
        """Whether guidance applies at original timestep ``t_model``."""
        return self.scale > 0 and self.t_stop < t_model + 1 < self.t_start

    def loss(self, prediction: Tensor) -> Tensor:
        """The (weighted) MSE of a decoded image or latent against the target; a scalar.

        Target and weight move to the prediction's device once (on first use) and keep their
        dtype, so a half-precision decoder still gets a float32 loss.
        """
        if self.target.device != prediction.device:
            self.target = self.target.to(prediction.device)
            if self.weight is not None:
                self.weight = self.weight.to(prediction.device)
        squared_error = (prediction - self.target) ** 2
        if self.weight is not None:
            squared_error = squared_error * self.weight
        return squared_error.mean(dim=(1, 2, 3)).sum()

    def __call__(self, pred_x0: Tensor, t_model: float, coef1: float) -> Tensor:
        """The guided clean-latent estimate (``pred_x0`` itself when inactive)."""
        if not self.is_active(t_model):
            return pred_x0
        step_size = GRADIENT_SCALE * self.scale / coef1
        with torch.inference_mode(False), torch.enable_grad():
            z0 = pred_x0.detach().clone()
            for _ in range(self.repeat):
                z0.requires_grad_(True)
                prediction = self.decode(z0) if self.space == "rgb" else z0
                (grad,) = torch.autograd.grad(self.loss(prediction), z0)
                z0 = (z0 - step_size * grad).detach()
        return z0


def with_guidance(denoise: Denoiser, guidance: Guidance, grid: Grid) -> Denoiser:
    """``denoise`` whose clean estimate is guided at every call, for any sampler.

    At a level of ``grid`` the guidance gets the model timestep and ``c1 = level.x0_coef``,
    the posterior-mean coefficient of x0 from that level to the next grid level, so the update
    ``z0 <- z0 - 3000 s grad / c1`` is the official one on the spaced-DDPM grid. On an EDM grid,
    at sigma with next grid sigma sigma' (0 at the end), abar = 1 / (1 + sigma^2) and
    ``c1 = (1 - abar / abar') sqrt(abar') / (1 - abar)`` (1 for the last step).
    """

    def guided(x: Tensor, level: Any) -> Tensor:
        lv = grid.level(level)
        return guidance(denoise(x, level), lv.t, lv.x0_coef)

    return guided
