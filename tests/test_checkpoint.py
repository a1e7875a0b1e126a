"""The weight-file loader: wrappers, prefixes, safetensors, clear errors, and no code execution."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from diffbir.checkpoint import (
    CheckpointError,
    WeightsNotFoundError,
    load_weights,
    read_state_dict,
    save_state_dict,
    sub_state_dict,
)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(4, 2)
        self.register_buffer("derived_index", torch.arange(5))


def _flat(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "global_step": 3},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"params_ema": sd},
    ],
)
def test_wrapped_and_prefixed_files_load(tmp_path, wrap):
    src = _Net()
    path = tmp_path / "w.ckpt"
    torch.save(wrap(_flat(src)), path)
    dst = _Net()
    load_weights(dst, read_state_dict(path), str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_safetensors_roundtrip(tmp_path):
    src = _Net()
    path = tmp_path / "w.safetensors"
    save_state_dict(src.state_dict(), path)
    dst = _Net()
    load_weights(dst, read_state_dict(path), str(path))
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert not list(tmp_path.glob("*.tmp"))


def test_derived_buffers_may_be_absent(tmp_path):
    sd = {k: v for k, v in _flat(_Net()).items() if k != "derived_index"}
    load_weights(_Net(), sd, "file.pth")


def test_mismatch_error_names_file_and_keys():
    sd = _flat(_Net())
    del sd["lin.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["conv.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(CheckpointError) as info:
        load_weights(_Net(), sd, "some/file.pth")
    msg = str(info.value)
    assert "some/file.pth" in msg
    assert "1 missing keys: lin.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "conv.weight (file (4, 3, 5, 5), model (4, 3, 3, 3))" in msg


def test_long_listings_are_cut_with_a_count():
    sd = {f"junk.{i}": torch.zeros(1) for i in range(12)} | _flat(_Net())
    with pytest.raises(CheckpointError, match=r"12 unexpected keys: .*\(7 more\)"):
        load_weights(_Net(), sd, "f.pth")


def test_ignore_prefixes_drop_extra_keys():
    sd = _flat(_Net()) | {"betas": torch.zeros(3), "model_ema.decay": torch.zeros(())}
    load_weights(_Net(), sd, "sd.ckpt", ignore_prefixes=("betas", "model_ema."))


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)
    assert "pwned" not in capsys.readouterr().out


def test_sub_state_dict():
    sd = {"a.x": torch.zeros(1), "a.y": torch.ones(1), "b.x": torch.zeros(2)}
    assert sorted(sub_state_dict(sd, "a.")) == ["x", "y"]
