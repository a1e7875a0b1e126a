"""Normalisation layers that compute in float32 whatever the activation dtype (fp16/bf16 safe),
and GroupNorm statistics shared across the tiles of one image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Devices whose GroupNorm/LayerNorm kernels compute fp16/bf16 input in float32 internally (the
# statistics and the affine step), rounding only the output: the same result as casting the
# input to float32 and back, without the two extra copies of every activation.
_FLOAT32_KERNELS = ("cpu", "cuda")


def computes_in_float32(x: Tensor, weight: Tensor | None) -> bool:
    """Whether the plain norm kernel on ``x`` (with ``weight``) already computes in float32."""
    if x.dtype == torch.float32:
        return True
    same_dtype = weight is None or weight.dtype == x.dtype
    return same_dtype and x.dtype in (torch.float16, torch.bfloat16) and (
        x.device.type in _FLOAT32_KERNELS
    )


def group_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float):
    """``F.group_norm``, accurate for channels-last input on the CPU too.

    PyTorch's CPU kernel for channels-last tensors sums values and squares in float32, so a
    group whose mean is large next to its spread loses its variance (mean 30, std 0.1: error
    ~1 in the output; contiguous input: 3e-5). GroupNorm does not change when a constant is
    subtracted from a group, so such input is first shifted by its per-group mean (one cheap
    reduction and one subtraction; the layout, and the convolutions' channels-last speed, stay).
    Half-precision input is left as it is: its own rounding is far coarser than this loss.
    """
    on_cpu_float32 = x.device.type == "cpu" and x.dtype == torch.float32
    if on_cpu_float32 and x.ndim == 4 and not x.is_contiguous():
        if x.is_contiguous(memory_format=torch.channels_last):
            batch, channels = x.shape[:2]
            mean = x.mean(dim=(2, 3)).view(batch, groups, -1).mean(-1, keepdim=True)
            x = x - mean.expand(batch, groups, channels // groups).reshape(batch, channels, 1, 1)
    return F.group_norm(x, groups, weight, bias, eps)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, result in the input dtype (see :func:`computes_in_float32`).

    Inside a :class:`SharedGroupNormStats` context it normalises with that context's statistics.
    """

    shared_stats: SharedGroupNormStats | None = None

    def forward(self, x: Tensor) -> Tensor:
        stats = self.shared_stats
        if stats is not None:
            if not stats.recording:
                return stats.normalize(self, x)
            stats.record(self, x)
        if computes_in_float32(x, self.weight):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, result in the input dtype (:func:`computes_in_float32`)."""

    def forward(self, x: Tensor) -> Tensor:
        if computes_in_float32(x, self.weight):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class SharedGroupNormStats:
    """Normalise the tiles of one input with statistics of the whole input (tiled VAE).

    Within ``with SharedGroupNormStats(module) as stats:`` every :class:`GroupNorm32` of
    ``module`` first *records*: it normalises each call as usual, with that call's own
    statistics, and adds the call's per-sample, per-group sums over :attr:`region` (the part of
    the tile no other tile counts). After :meth:`freeze` it *applies*: every call is normalised with
    the mean and variance of all recorded calls. Recording all tiles, then running them again,
    gives every tile the same normalisation: exactly the whole-input statistics for the first
    GroupNorm, close to them for later ones (their inputs came from per-tile normalisation).
    Memory: two (B, G) sums per layer.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, GroupNorm32)]
        self.sums: dict[GroupNorm32, tuple[Tensor, Tensor, int]] = {}
        self.recording = True
        # While recording: the part of each call's (H, W) extent to count, as fractions
        # (y0, y1, x0, x1); overlapping tiles set their own parts so that no pixel counts twice.
        self.region: tuple[float, float, float, float] | None = None

    def __enter__(self) -> SharedGroupNormStats:
        for layer in self.layers:
            layer.shared_stats = self
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers:
            layer.shared_stats = None

    def freeze(self) -> None:
        """Stop recording; from now on normalise with the recorded statistics."""
        if not self.sums:
            raise RuntimeError("no GroupNorm statistics recorded before freeze()")
        self.recording = False

    def record(self, layer: GroupNorm32, x: Tensor) -> None:
        """Add the per-sample, per-group sums of ``x`` over :attr:`region` for ``layer``."""
        if self.region is not None:
            height, width = x.shape[-2:]
            top, bottom, left, right = self.region
            rows = slice(round(top * height), round(bottom * height))
            x = x[..., rows, round(left * width) : round(right * width)]
        wide = x.double().reshape(x.shape[0], layer.num_groups, -1)
        total, squares, count = wide.sum(-1), wide.square().sum(-1), wide.shape[-1]
        if layer in self.sums:
            before = self.sums[layer]
            total, squares, count = total + before[0], squares + before[1], count + before[2]
        self.sums[layer] = (total, squares, count)

    def normalize(self, layer: GroupNorm32, x: Tensor) -> Tensor:
        """``layer`` applied to ``x`` with the recorded statistics."""
        total, squares, count = self.sums[layer]
        mean = total / count
        var = (squares / count - mean.square()).clamp_min(0)
        grouped = x.float().reshape(x.shape[0], layer.num_groups, -1)
        scale = torch.rsqrt(var.float()[..., None] + layer.eps)
        y = ((grouped - mean.float()[..., None]) * scale).reshape(x.shape)
        if layer.affine:
            shape = (-1,) + (1,) * (x.ndim - 2)
            y = y * layer.weight.float().view(shape) + layer.bias.float().view(shape)
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y.to(x.dtype)


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms (SwinIR/SCUNet init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
