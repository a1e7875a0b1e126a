"""From a network to the clean-estimate denoiser every sampler calls, in wrappers:

``model_fn(x, t_tensor, cond)`` --:class:`GuidedModel`--> classifier-free guidance in one
batched forward --:class:`ModelDenoiser`--> ``denoise(x, level)`` (x0) --
:func:`~diffbir.diffusion.guidance.with_guidance`--> guided x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from diffbir.diffusion.grids import Grid
from diffbir.diffusion.schedule import Parameterization, check_parameterization

ConditionalModel = Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor]
Denoiser = Callable[[Tensor, Any], Tensor]


def rescaled_cfg_scale(scale: float, t: float) -> float:
    """The official rescaled CFG scale at model timestep ``t`` (for ``scale > 1``):
    ``1 + scale * (1 - cos(pi * ((1000 - t) / 1000) ** 5)) / 2``; else ``scale``."""
    if scale <= 1:
        return scale
    return 1 + scale * (1 - math.cos(math.pi * ((1000 - t) / 1000) ** 5.0)) / 2


class GuidedModel:
    """Classifier-free guidance over ``model_fn(x, t, cond)``: ``out_u + s (out_c - out_u)``.

    :meth:`outputs` runs ONE forward on the batch ``cat([cond, uncond])`` (x and t duplicated);
    with ``scale == 1`` (or no ``uncond``) only the conditional branch runs. ``t`` is a Python
    float, given to the model as a float32 tensor; with ``rescale`` the scale at ``t`` is
    :func:`rescaled_cfg_scale`. Calling the object gives the guided output.
    """

    def __init__(
        self,
        model_fn: ConditionalModel,
        cond: Mapping[str, Tensor],
        uncond: Mapping[str, Tensor] | None = None,
        scale: float = 1.0,
        *,
        rescale: bool = False,
    ) -> None:
        self.model_fn = model_fn
        self.scale = scale
        self.rescale = rescale
        self.cond = dict(cond)
        self.both: dict[str, Tensor] | None = None
        if scale != 1 and uncond is not None:
            if set(cond) != set(uncond):
                raise ValueError(
                    f"cond/uncond: expected the same keys, got {sorted(cond)} and {sorted(uncond)}"
                )
            self.both = {key: torch.cat([cond[key], uncond[key]]) for key in cond}

    def scale_at(self, t: float) -> float:
        return rescaled_cfg_scale(self.scale, t) if self.rescale else self.scale

    def outputs(self, x: Tensor, t: float) -> tuple[Tensor, Tensor | None]:
        """(conditional, unconditional) outputs at ``t``; the second is None without CFG."""
        if self.both is None:
            t_in = x.new_full((x.shape[0],), t, dtype=torch.float32)
            return self.model_fn(x, t_in, self.cond), None
        t_in = x.new_full((2 * x.shape[0],), t, dtype=torch.float32)
        out_cond, out_uncond = self.model_fn(torch.cat([x, x]), t_in, self.both).chunk(2)
        return out_cond, out_uncond

    @staticmethod
    def combine(cond: Tensor, uncond: Tensor | None, scale: float) -> Tensor:
        return cond if uncond is None else uncond + scale * (cond - uncond)

    def __call__(self, x: Tensor, t: float) -> Tensor:
        return self.combine(*self.outputs(x, t), self.scale_at(t))


class ModelDenoiser:
    """``denoise(x, level) -> x0`` from a :class:`GuidedModel` of eps- or v-prediction.

    ``grid.level(level)`` gives the model timestep and the scales: the model sees
    ``c_in * x`` (``c_in`` = 1 on DDPM grids, ``1 / sqrt(sigma^2 + 1)`` on EDM grids) and
    ``x0 = c_skip * x + c_out * output`` with, writing ``a = sqrt(abar)``, ``s = sqrt(1 -
    abar)``: eps ``(c_in / a, -s / a)``, v ``(a * c_in, -s)``. On EDM grids these are the
    Karras coefficients (eps: 1, -sigma; v: 1 / (sigma^2 + 1), -sigma / sqrt(sigma^2 + 1)).

    CFG is affine, so guiding the outputs or the clean estimates agree up to rounding; each
    family does it where the official code does (``grid.cfg_on_denoised``: EDM guides the
    clean estimates), because the first EDM step (sigma_0 = 1e4) amplifies that rounding.
    """

    def __init__(self, model: GuidedModel, grid: Grid, parameterization: Parameterization) -> None:
        check_parameterization(parameterization)
        self.model = model
        self.grid = grid
        self.parameterization = parameterization

    def __call__(self, x: Tensor, level: Any) -> Tensor:
        lv = self.grid.level(level)
        if self.parameterization == "eps":
            if lv.alpha == 0:
                raise ValueError(
                    f"an eps-prediction model cannot denoise at t={lv.t:g} where abar = 0 "
                    "(zero terminal SNR needs a v-prediction model)"
                )
            c_skip, c_out = lv.c_in / lv.alpha, -lv.sigma / lv.alpha
        else:
            c_skip, c_out = lv.alpha * lv.c_in, -lv.sigma
        out_cond, out_uncond = self.model.outputs(x if lv.c_in == 1 else x * lv.c_in, lv.t)
        scale = self.model.scale_at(lv.t)
        if out_uncond is not None and self.grid.cfg_on_denoised:
            return GuidedModel.combine(
                x * c_skip + out_cond * c_out, x * c_skip + out_uncond * c_out, scale
            )
        return x * c_skip + GuidedModel.combine(out_cond, out_uncond, scale) * c_out
