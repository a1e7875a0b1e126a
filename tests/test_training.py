"""Training of both stages on tiny models (CPU): learning, frozen parts, resume, export, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from diffbir.checkpoint import load_weights, read_state_dict, sub_state_dict
from diffbir.config import build_model, load_config
from diffbir.training.cli import load_training_config, main_gm, main_rm, train
from diffbir.training.common import psnr
from diffbir.training.data import InfiniteSeededSampler, build_paired_dataset, train_loader
from diffbir.training.gm import GenerationModuleTask
from diffbir.training.rm import RestorationModuleTask

RM_STEPS = 60
GM_STEPS = 30
RESUME_STEPS = 6
TRAIN_IMAGES = 16



def _write_list(path: Path, images: list[Path]) -> Path:
    path.write_text("".join(f"{p}\n" for p in images))
    return path


@pytest.fixture(scope="module")
def image_lists(tmp_path_factory, real47_dir: Path) -> dict[str, Path]:
    """Train/val lists of real photos (read in place); the train list holds one broken file."""
    root = tmp_path_factory.mktemp("lists")
    images = sorted(real47_dir.glob("*.jpg"))
    broken = root / "broken.png"
    broken.write_bytes(b"not an image")
    (root / "no_images").mkdir()
    return {
        "train": _write_list(root / "train.txt", [*images[:TRAIN_IMAGES], broken]),
        "val": _write_list(root / "val.txt", images[-2:]),
        "empty": _write_list(root / "empty.txt", []),
        "empty_folder": root / "no_images",
    }


def _rm_overrides(lists: dict[str, Path], out: Path, steps: int) -> list[str]:
    return [
        f"output_dir={out}",
        f"data.train.dataset.source={lists['train']}",
        f"data.val.dataset.source={lists['val']}",
        f"trainer.max_steps={steps}",
    ]


def _gm_overrides(lists, out, steps, sd_path, stage1_weights) -> list[str]:
    return _rm_overrides(lists, out, steps) + [
        f"model.sd_weights={sd_path}",
        f"model.stage1.weights={stage1_weights}",
    ]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory, image_lists):
    """One tiny RM training run; returns (task before training, task after, output dir)."""
    out = tmp_path_factory.mktemp("rm")
    overrides = _rm_overrides(image_lists, out, RM_STEPS)
    cfg = load_training_config("rm_tiny", overrides)
    pl.seed_everything(cfg["seed"])
    initial = RestorationModuleTask(cfg)
    trained = train("rm", "rm_tiny", overrides)
    return initial, trained, out


@pytest.fixture(scope="module")
def sd_path(parity_dir: Path) -> Path:
    """A tiny SD 2.1 checkpoint in the official format (the parity fixture)."""
    return parity_dir / "sd.ckpt"


@pytest.fixture(scope="module")
def gm_run(tmp_path_factory, image_lists, rm_run, sd_path):
    """One tiny GM training run conditioned on the trained tiny RM."""
    out = tmp_path_factory.mktemp("gm")
    stage1 = rm_run[2] / "export" / "swinir.pth"
    overrides = _gm_overrides(image_lists, out, GM_STEPS, sd_path, stage1)
    cfg = load_training_config("gm_tiny", overrides)
    pl.seed_everything(cfg["seed"])
    initial = GenerationModuleTask(cfg)
    trained = train("gm", "gm_tiny", overrides)
    return initial, trained, out


def _first_val_batch(task) -> dict:
    return next(iter(task.val_dataloader()))


def test_sampler_resumes_and_shards():
    full = InfiniteSeededSampler(5, seed=3)
    stream = [item for item, _ in zip(full, range(23), strict=False)]
    resumed = InfiniteSeededSampler(5, seed=3, start=9)
    assert [x for x, _ in zip(resumed, range(14), strict=False)] == stream[9:]
    ranks = [InfiniteSeededSampler(5, seed=3, rank=r, world_size=2) for r in (0, 1)]
    rank_items = [[x for x, _ in zip(s, range(5), strict=False)] for s in ranks]
    assert [p for p, _ in rank_items[0]] == [0, 2, 4, 6, 8]
    assert rank_items[1] == [stream[i] for i in (1, 3, 5, 7, 9)]
    # each pass over the data is a permutation
    assert sorted(i for _, i in stream[:5]) == list(range(5))


def test_training_stream_repeats_with_workers_and_resume(image_lists):
    """Crops and degradations depend on the seed and stream position only, not on workers."""
    cfg = load_training_config("rm_tiny", [f"data.train.dataset.source={image_lists['train']}"])
    dataset = build_paired_dataset(cfg["data"]["train"]["dataset"], "data.train.dataset", 5)

    def batches(workers: int, start: int, count: int) -> list[dict]:
        loader = train_loader(
            dataset, batch_size=2, num_workers=workers, seed=5, rank=0, world_size=1, start=start
        )
        return [batch for batch, _ in zip(loader, range(count), strict=False)]

    single = batches(0, 0, 3)
    for other in (batches(2, 0, 3), [*single[:1], *batches(0, 2, 2)]):
        for ours, ref in zip(other, single, strict=True):
            assert torch.equal(ours["hq"], ref["hq"]) and torch.equal(ours["lq"], ref["lq"])
    assert not torch.equal(single[0]["lq"], single[1]["lq"])


def test_rm_learns_and_beats_lq(rm_run):
    initial, trained, out = rm_run
    assert trained.trainer.global_step == RM_STEPS
    metrics = trained.trainer.callback_metrics
    assert metrics["val/psnr"] > metrics["val/psnr_lq"] + 1.0
    assert metrics["val/ssim"] > metrics["val/ssim_lq"]
    # the broken file in the list was replaced by other samples and counted
    assert trained.skipped_files > 0
    batch = _first_val_batch(trained)
    with torch.no_grad():
        loss_before = torch.mean((initial.eval()(batch["lq"]) - batch["hq"]) ** 2)
        loss_after = torch.mean((trained.eval()(batch["lq"]) - batch["hq"]) ** 2)
        assert loss_after < 0.5 * loss_before
        lq_psnr = psnr(batch["lq"], batch["hq"]).mean()
        assert psnr(trained(batch["lq"]), batch["hq"]).mean() > lq_psnr + 1.0
    # the export is a flat SwinIR state dict that loads strictly into a fresh model
    for ext in (".pth", ".safetensors"):
        model = build_model(load_config(trained.cfg["model"]["config"]))
        load_weights(model, read_state_dict(out / "export" / f"swinir{ext}"), "export")
        for key, value in trained.model.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def _fixed_loss(task: GenerationModuleTask, batch: dict, draws: int = 8) -> float:
    """Eq. 4 on one batch, averaged over fixed (t, noise) draws."""
    task.eval()
    with torch.no_grad():
        _, cond = task.condition(batch["lq"], batch["prompt"])
        losses = [
            task.diffusion_loss(batch["hq"], cond, task._generator(99, i)) for i in range(draws)
        ]
    return torch.stack(losses).mean().item()


def test_gm_learns_only_controlnet(gm_run, rm_run, sd_path):
    initial, trained, out = gm_run
    assert trained.trainer.global_step == GM_STEPS
    batch = next(iter(trained.train_dataloader()))
    assert _fixed_loss(trained, batch) < 0.95 * _fixed_loss(initial, batch)
    # frozen parts: bitwise those of the SD file and of the RM export, no gradients, eval mode
    sd_file = read_state_dict(sd_path)
    for key, value in trained.cldm.sd_state_dict().items():
        assert torch.equal(value, sd_file[key]), key
    rm_file = read_state_dict(rm_run[2] / "export" / "swinir.pth")
    assert all(torch.equal(v, rm_file[k]) for k, v in trained.stage1.state_dict().items())
    for part in trained.frozen_modules():
        assert not part.training
        assert not any(p.requires_grad for p in part.parameters())
    changed = [
        k for k, v in initial.cldm.controlnet.state_dict().items()
        if not torch.equal(v, trained.cldm.controlnet.state_dict()[k])
    ]  # fmt: skip
    assert changed
    # the optimizer holds exactly the IRControlNet parameters
    optimizer = trained.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trained.cldm.controlnet.parameters()}
    # LR schedule of the config: milestone 25, gamma 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(trained.cfg["optim"]["lr"] * 0.1)
    # Lightning checkpoints hold only IRControlNet (plus optimizer and loop state)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]
    assert all(k.startswith("cldm.controlnet.") for k in ckpt["state_dict"])
    # the export is the official flat IRControlNet format (keys of the parity v2.pth-format file)
    official_keys = set(read_state_dict(sd_path.parent / "controlnet.pth"))
    for ext in (".pth", ".safetensors"):
        exported = read_state_dict(out / "export" / f"controlnet{ext}")
        reference = trained.cldm.controlnet.state_dict()
        assert set(exported) == official_keys == set(reference)
        assert all(torch.equal(exported[k], reference[k]) for k in reference)


def test_gm_resume_matches_uninterrupted_run(tmp_path, image_lists, rm_run, sd_path):
    stage1 = rm_run[2] / "export" / "swinir.pth"
    half = RESUME_STEPS // 2
    extra = [
        f"trainer.checkpoint_every_n_steps={half}",
        f"trainer.val_every_n_steps={half}",
        f"optim.lr_milestones=[{half + 1}]",  # the LR drop falls in the resumed half
    ]

    def run(out: Path, steps: int, resume: str | None = None) -> GenerationModuleTask:
        overrides = _gm_overrides(image_lists, out, steps, sd_path, stage1) + extra
        return train("gm", "gm_tiny", overrides, resume=resume)

    straight = run(tmp_path / "a", RESUME_STEPS)
    first = run(tmp_path / "b", half)
    assert first.trainer.global_step == half
    resumed = run(tmp_path / "b", RESUME_STEPS, resume="last")
    assert resumed.trainer.global_step == RESUME_STEPS
    assert resumed.batches_seen == straight.batches_seen == RESUME_STEPS
    ours, ref = resumed.cldm.controlnet.state_dict(), straight.cldm.controlnet.state_dict()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    lrs = [t.trainer.optimizers[0].param_groups[0]["lr"] for t in (resumed, straight)]
    assert lrs[0] == lrs[1] < straight.cfg["optim"]["lr"]


def test_cli_trains_resumes_and_exports(tmp_path, image_lists, rm_run):
    out = tmp_path / "cli"
    base = ["--config", "rm_tiny", *_rm_overrides(image_lists, out, 2)]
    main_rm([*base, "trainer.val_every_n_steps=2", "trainer.checkpoint_every_n_steps=2"])
    main_rm([*base, "trainer.max_steps=4", "trainer.val_every_n_steps=2", "--resume", "last"])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    exported = read_state_dict(out / "export" / "swinir.safetensors")
    assert all(
        torch.equal(exported[k], v) for k, v in sub_state_dict(ckpt["state_dict"], "model.").items()
    )
    # --export-from writes the weights of any training checkpoint without training
    run_out = rm_run[2]
    again = tmp_path / "again"
    main_rm(["--config", "rm_tiny", "--export-from", str(run_out / "checkpoints" / "last.ckpt"),
             f"output_dir={again}"])  # fmt: skip
    for ext in (".pth", ".safetensors"):
        ours = read_state_dict(again / "export" / f"swinir{ext}")
        ref = read_state_dict(run_out / "export" / f"swinir{ext}")
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def _run_cli(main, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_file_list_is_reported(tmp_path, capsys):
    err = _run_cli(
        main_rm, ["--config", "rm_tiny", f"data.train.dataset.source={tmp_path}/nope.txt"], capsys
    )
    assert "nope.txt" in err and "data.train.dataset.source" in err


def test_empty_dataset_is_reported(tmp_path, image_lists, capsys):
    for source in (image_lists["empty"], image_lists["empty_folder"]):
        overrides = _rm_overrides(image_lists, tmp_path, 1) + [
            f"data.train.dataset.source={source}"
        ]
        err = _run_cli(main_rm, ["--config", "rm_tiny", *overrides], capsys)
        assert "empty" in err and "data.train.dataset" in err and str(source) in err


def test_missing_sd_file_is_reported(tmp_path, image_lists, capsys):
    overrides = _gm_overrides(image_lists, tmp_path, 1, tmp_path / "no_sd.ckpt", tmp_path / "x")
    err = _run_cli(main_gm, ["--config", "gm_tiny", *overrides], capsys)
    assert "model.sd_weights" in err and "no_sd.ckpt" in err


def test_missing_rm_file_is_reported(tmp_path, image_lists, sd_path, capsys):
    overrides = _gm_overrides(image_lists, tmp_path, 1, sd_path, tmp_path / "no_rm.pth")
    err = _run_cli(main_gm, ["--config", "gm_tiny", *overrides], capsys)
    assert "model.stage1.weights" in err and "no_rm.pth" in err


def test_unknown_config_key_is_reported(capsys):
    err = _run_cli(main_rm, ["--config", "rm_tiny", "trainer.max_step=3"], capsys)
    assert "trainer.max_step" in err
    err = _run_cli(main_gm, ["--config", "gm_tiny", "model.sd_weight=x"], capsys)
    assert "model.sd_weight" in err


def test_resume_without_checkpoint_is_reported(tmp_path, image_lists, capsys):
    args = ["--config", "rm_tiny", "--resume", "last", *_rm_overrides(image_lists, tmp_path, 2)]
    err = _run_cli(main_rm, args, capsys)
    assert "--resume" in err and "last.ckpt" in err


def test_exported_weights_restore_an_image(gm_run, rm_run, sd_path):
    """The exported GM and RM weights load in the inference pipeline and restore an image."""
    from diffbir.pipeline.loading import build_restorer, resolve_weight_paths
    from diffbir.pipeline.options import RestoreOptions

    _, trained, gm_out = gm_run
    rm_out = rm_run[2]
    paths = resolve_weight_paths(
        "custom",
        sd=sd_path,
        controlnet=gm_out / "export" / "controlnet.safetensors",
        stage1=rm_out / "export" / "swinir.safetensors",
    )
    restorer = build_restorer(
        "custom", paths, version="v2", cldm_config="control_ldm_tiny", stage1_config="swinir_tiny"
    )
    lq = _first_val_batch(trained)["lq"][:1]
    options = RestoreOptions(steps=4, min_side=0)
    with torch.no_grad():
        # the pipeline's stage 1 and noise prediction are those of the trained tasks
        cond_image, cond = trained.condition(lq, [""])
        assert torch.allclose(restorer.condition(lq, options), cond_image, atol=1e-5)
        x_t = torch.randn_like(cond["latent"])
        t = torch.tensor([500])
        fresh_cond = restorer.cldm.prepare_condition(cond_image, [""])
        assert torch.allclose(
            restorer.cldm(x_t, t, fresh_cond), trained.cldm(x_t, t, cond), atol=1e-5
        )
        result = restorer.restore(lq, [[0]], options)
    restored = result.samples
    assert restored.shape == (1, 1, *lq.shape[1:])
    assert torch.isfinite(restored).all() and restored.min() >= 0 and restored.max() <= 1
    assert restored.std() > 0
