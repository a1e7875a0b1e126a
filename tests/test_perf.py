"""Loading holds one copy of the weights; half-precision norms need no casts; benchmark parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffbir.benchmark.timing import CopyCounter
from diffbir.checkpoint import (
    CheckpointError,
    check_materialized,
    empty_parameters,
    load_weights,
    read_state_dict,
)
from diffbir.models import norm as norm_module
from diffbir.models.norm import GroupNorm32, LayerNorm32
from diffbir.pipeline.loading import WeightPaths, build_restorer

REPO_ROOT = Path(__file__).resolve().parent.parent


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where ``path`` is memory-mapped in this process (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]) == path.resolve():
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_weights_are_views_of_the_mapped_files(parity_dir: Path) -> None:
    """fp32 on the CPU: every parameter is the file's own memory, except the conv weights,
    converted once to channels-last (the layout the convolutions run in)."""
    sd_file, controlnet_file = parity_dir / "sd.ckpt", parity_dir / "controlnet.pth"
    restorer = build_restorer(
        "custom",
        WeightPaths(sd_file, controlnet_file, None),
        cldm_config="control_ldm_tiny",
        device="cpu",
    )
    mapped = _mapped_ranges(sd_file) + _mapped_ranges(controlnet_file)
    assert mapped, "the weight files are not memory-mapped"
    copied = 0
    for name, param in restorer.cldm.named_parameters():
        in_file = any(start <= param.data_ptr() < end for start, end in mapped)
        if param.ndim == 4 and param.shape[-1] > 1:
            assert not in_file and param.is_contiguous(memory_format=torch.channels_last), name
            copied += 1
        else:
            assert in_file, f"{name} was copied"
    assert copied > 0
    # Mapped privately: the model may change its weights, the file stays as it was.
    param = restorer.cldm.unet.time_embed[0].weight
    param.data.add_(1)
    assert not torch.equal(read_state_dict(sd_file)[
        "model.diffusion_model.time_embed.0.weight"], param)


_PEAK = """
import gc, sys, torch
from torch import nn
from diffbir.checkpoint import empty_parameters, load_weights, read_state_dict

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def peak_while(load):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    before = status("VmRSS:")
    model = load()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return (status("VmHWM:") - before) / size

def build():
    return nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(24)))  # 101 MB

def load_empty():
    with empty_parameters():
        model = build()
    load_weights(model, read_state_dict(sys.argv[1]), "file", assign=True)
    return model

def load_copy():  # the usual way: random weights, the file read, then copied in
    model = build()
    load_weights(model, read_state_dict(sys.argv[1], mmap=False), "file")
    return model

read_state_dict(sys.argv[1])  # the loader's imports
print(peak_while(load_empty))
gc.collect()
print(peak_while(load_copy))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_adds_no_second_copy_of_the_weights(tmp_path: Path) -> None:
    """Peak resident memory of loading a 101 MB model, as a multiple of the model: a model
    built empty and given the mapped file's tensors adds (nearly) nothing until it is used; a
    model built with random weights and copied into from a read file holds two copies."""
    file = tmp_path / "model.pth"
    gen = torch.Generator().manual_seed(0)
    layers = {f"{i}.{kind}": shape for i in range(24) for kind, shape in
              (("weight", (1024, 1024)), ("bias", (1024,)))}
    torch.save({k: torch.randn(shape, generator=gen) for k, shape in layers.items()}, file)
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, str(file)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    empty, copy = (float(line) for line in proc.stdout.split())
    assert empty < 0.1
    assert copy > 1.8


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_half_precision_loading_releases_the_files_float32_pages(tmp_path: Path) -> None:
    """Converting the mapped file's float32 tensors to bf16 drops their pages from the process
    (the file's copy is not held beside the converted one), and the data stays: the file's
    tensors still read their values. Tensors in ordinary memory are left as they are."""
    file = tmp_path / "model.pth"
    gen = torch.Generator().manual_seed(0)
    weights = {f"{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(16)}
    torch.save(weights, file)
    sd = read_state_dict(file)
    assert sum(float(t.sum()) for t in sd.values())  # every page resident
    resident = _status_bytes("RssFile:")
    with empty_parameters():
        model = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(16)))
    load_weights(model.to(torch.bfloat16), sd, str(file), assign=True)
    released = resident - _status_bytes("RssFile:")
    assert released > 0.9 * 16 * 2**22
    for key, tensor in sd.items():
        assert torch.equal(tensor, weights[key])
        assert torch.equal(model.state_dict()[key], weights[key].to(torch.bfloat16))
    in_memory = {k: v.clone() for k, v in weights.items()}
    with empty_parameters():
        other = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(16)))
    load_weights(other.to(torch.bfloat16), in_memory, "in memory", assign=True)
    assert all(torch.equal(in_memory[k], weights[k]) for k in weights)


def test_a_parameter_missing_from_the_file_is_named() -> None:
    with empty_parameters():
        model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert model[0].weight.is_meta and not model[1].running_mean.is_meta  # buffers are built
    sd = {k: v for k, v in nn.Sequential(nn.Linear(2, 2)).state_dict().items()}
    with pytest.raises(CheckpointError, match="1.weight"):
        load_weights(model, sd, "file.pth", assign=True)
    model[1].weight = nn.Parameter(torch.ones(2))
    load_weights(model[0], {k[2:]: v for k, v in sd.items()}, "file.pth", assign=True)
    with pytest.raises(CheckpointError, match=r"(?s)file\.pth.*1\.bias"):
        check_materialized(model, "file.pth")


def test_assigned_weights_take_the_model_dtype_and_layout() -> None:
    with empty_parameters():
        conv = nn.Conv2d(3, 4, 3).to(torch.bfloat16, memory_format=torch.channels_last)
    source = nn.Conv2d(3, 4, 3)
    load_weights(conv, source.state_dict(), "conv.pth", assign=True)
    assert conv.weight.dtype == torch.bfloat16
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv.weight.float(), source.weight, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_norms_make_no_casts_and_equal_the_float32_computation(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU the norm kernels compute half input in float32 themselves: the norms call
    them directly (no dtype copies of the activations) and give what float32-then-round gives
    (up to one rounding step of the half type)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 8, 8, generator=gen) * 3 + 1).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    tokens = (torch.randn(2, 77, 64, generator=gen) * 3).to(dtype)
    step = torch.finfo(dtype).eps
    for norm, inp in [(GroupNorm32(32, 64), x), (LayerNorm32(64), tokens)]:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
            norm.bias.normal_(generator=gen)
        norm.to(dtype)
        counter, upcast = CopyCounter(), CopyCounter()
        with counter, torch.no_grad():
            out = norm(inp)
        assert sum(counter.calls.values()) == 0, counter.calls
        assert out.dtype == dtype and out.stride() == inp.stride()
        monkeypatch.setattr(norm_module, "computes_in_float32", lambda x, weight: False)
        with upcast, torch.no_grad():  # the float32 round trip that the kernels make needless
            ref = norm(inp)
        monkeypatch.undo()
        assert upcast.bytes["_to_copy"] >= 3 * inp.numel() * inp.element_size()
        torch.testing.assert_close(out, ref, atol=step, rtol=step)
