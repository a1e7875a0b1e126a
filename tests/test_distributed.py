"""Many processes through Lightning (DDP, gloo on CPU, 2 processes): ``diffbir-infer`` shares the
work list between ranks, writes each image once with the bytes of a 1-process run, survives a
killed run; GM training resumes a 2-process run exactly. The multi-process runs are scripts
started as users start them (Lightning launches the second rank by re-running the command)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from diffbir.pipeline import cli
from diffbir.pipeline.device import cpu_has_fast_half
from diffbir.pipeline.work import bucket_batches, shard
from diffbir.tiny_weights import write_tiny_weights
from diffbir.training.cli import train

IMAGES = 12
TIMEOUT = 600  # seconds; generous for a shared 2-core machine, never reached when all is well


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _script(name: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "scripts" / name)]


def test_work_list_buckets_by_size_and_shards_cover_it_once():
    class FakeJob:
        def __init__(self, key: str, size: tuple[int, int] | None) -> None:
            self.key, self.size = key, size

    sizes = [(24, 24), (28, 20), (24, 24), None, (24, 24), (28, 20), None, (24, 24)]
    jobs = [FakeJob(str(i), size) for i, size in enumerate(sizes)]
    batches = bucket_batches(jobs, 3, size_of=lambda job: job.size)
    assert [[j.key for j in b] for b in batches] == [
        ["0", "2", "4"], ["7"], ["1", "5"], ["3"], ["6"],
    ]  # fmt: skip
    for world in (1, 2, 3, 7):
        shards = [list(shard(len(batches), rank, world)) for rank in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(len(batches)))  # the shards union to the list, no repeats


@pytest.fixture(scope="module")
def infer_setup(tmp_path_factory, real47_dir: Path):
    """Tiny weights, 12 small real47 images of two sizes and a broken file, and a 1-process
    reference run."""
    root = tmp_path_factory.mktemp("dist_infer")
    weights = write_tiny_weights(root / "weights")
    inputs = root / "inputs"
    inputs.mkdir()
    sources = sorted(p for p in real47_dir.iterdir() if p.suffix in (".jpg", ".png"))[:IMAGES]
    for i, source in enumerate(sources):
        size = (20, 28) if i % 3 == 0 else (24, 24)
        Image.open(source).convert("RGB").resize(size, Image.BICUBIC).save(inputs / f"{i:02d}.png")
    args = [
        "--input", str(inputs), "--weights-dir", str(weights), "--cldm-config",
        "control_ldm_tiny", "--stage1-config", "bsrnet_tiny", "--version", "v2", "--upscale", "2",
        "--steps", "8",
        "--min-side", "64", "--cfg-scale", "2", "--seed", "7", "--device", "cpu",
        "--no-progress", "--batch-size", "2",
    ]  # fmt: skip
    (inputs / "broken.png").write_bytes(b"not an image")  # a failure record, not a crash
    reference = root / "reference"
    assert cli.main([*args, "--output", str(reference)]) == 1
    return args, reference


def _outputs(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.glob("*.png") if not p.name.startswith(".")}


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (FileNotFoundError, IndexError):
        return True


def test_two_processes_killed_then_rerun_restore_each_image_once(infer_setup, tmp_path):
    args, reference = infer_setup
    out = tmp_path / "out"
    command = [*_script("inference.py"), *args, "--output", str(out), "--devices", "2"]
    with open(tmp_path / "first.log", "w") as log:
        run = subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while len(_outputs(out)) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        children = _children(run.pid) if run.poll() is None else []
        run.send_signal(signal.SIGKILL)  # the main process, rank 0
        run.wait()
    assert children, (
        "the run ended before it could be killed:\n" + (tmp_path / "first.log").read_text()
    )
    deadline = time.monotonic() + 60
    while not all(_gone(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(c) for c in children), "rank 1 outlived the killed main process"

    done = _outputs(out)
    assert 2 <= len(done) < IMAGES
    for name, path in done.items():  # nothing partial: every written file is the final image
        assert path.read_bytes() == (reference / name).read_bytes(), name
    written = {name: path.stat().st_ino for name, path in done.items()}

    rerun = subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr  # broken.png failed
    left = IMAGES - len(done)
    assert rerun.stdout.count("summary:") == 1
    assert f"summary: {left} restored, {len(done)} skipped" in rerun.stdout
    assert "1 failed" in rerun.stdout and rerun.stderr.count("broken.png") == 1
    per_rank = [int(n) for n in re.findall(r"rank \d: (\d+) restored", rerun.stdout)]
    assert len(per_rank) == 2 and sum(per_rank) == left
    final = _outputs(out)
    assert sorted(final) == sorted(_outputs(reference))
    for name, path in final.items():  # byte-identical to the 1-process run
        assert path.read_bytes() == (reference / name).read_bytes(), name
    assert {name: final[name].stat().st_ino for name in written} == written  # nothing redone


def _gm_overrides(tmp_path: Path, parity_dir: Path, real47_dir: Path) -> list[str]:
    images = sorted(real47_dir.glob("*.jpg"))[:8]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    return [
        f"model.sd_weights={parity_dir / 'sd.ckpt'}", "model.stage1=null",
        f"data.train.dataset.source={listing}", "data.val=null", "data.train.batch_size=2",
        "trainer.checkpoint_every_n_steps=2", "trainer.keep_checkpoints=2",
        "trainer.max_steps=4", "optim.lr_milestones=[3]",
    ]  # fmt: skip


def test_two_process_gm_training_resumes_like_an_uninterrupted_run(
    tmp_path, parity_dir, real47_dir
):
    overrides = _gm_overrides(tmp_path, parity_dir, real47_dir)
    ddp = ["trainer.devices=2", "trainer.strategy=ddp"]

    def launch(output: Path, *extra: str) -> str:
        command = [*_script("train_gm.py"), "--config", "gm_tiny", *extra, *overrides, *ddp]
        done = subprocess.run(
            [*command, f"output_dir={output}"],
            env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    straight_log = launch(tmp_path / "straight")
    midpoint = tmp_path / "straight" / "checkpoints" / "step00000002.ckpt"
    launch(tmp_path / "resumed", "--resume", str(midpoint))

    assert "unused" not in straight_log  # DDP found no unused parameter
    assert straight_log.count("`Trainer.fit` stopped") == 1  # rank 0 logs, once
    ckpt = torch.load(midpoint, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["diffbir_world_size"] == 2 and ckpt["diffbir_stream_position"] == 2 * 2 * 2
    ours = torch.load(tmp_path / "resumed/export/controlnet.pth", weights_only=True)
    ref = torch.load(tmp_path / "straight/export/controlnet.pth", weights_only=True)
    mid = {k[len("cldm.controlnet.") :]: v for k, v in ckpt["state_dict"].items()}
    assert any(not torch.equal(ref[k], mid[k]) for k in ref)  # the second half trained
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key

    # the same checkpoint resumed by 1 process in 16-mixed (bf16 on CPU): it says what it does
    one = [*overrides, f"output_dir={tmp_path / 'one'}", "trainer.max_steps=3"]
    with pytest.warns(UserWarning) as caught:
        task = train("gm", "gm_tiny", [*one, "trainer.precision=16-mixed"], resume=str(midpoint))
    messages = "\n".join(str(w.message) for w in caught)
    assert "resuming a 2-process run with 1 process(es)" in messages
    assert "continue at sample 8 of the shared stream" in messages
    if not cpu_has_fast_half(torch.bfloat16):
        assert "no native bf16 support" in messages
    assert task.trainer.global_step == 3 and task.stream_position == 8 + 2
