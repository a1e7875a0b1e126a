"""Every sampler of the registry: official parity, draw counts, eps/v, batches, guidance, knobs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchsde
from conftest import assert_close_ref

from diffbir.diffusion import (
    SAMPLERS,
    BrownianNoise,
    EdmGrid,
    GuidedModel,
    ModelDenoiser,
    NoiseSchedule,
    OfficialNoise,
    PerImageNoise,
    RecordedNoise,
    RestorationGuidance,
    SpacedSchedule,
    rescaled_cfg_scale,
    with_guidance,
)
from diffbir.pipeline.cleaner import Cleaner
from diffbir.pipeline.options import GuidanceOptions, RestoreOptions, SamplerOptions, TileOptions
from diffbir.pipeline.restorer import Restorer

# Draws per run of N steps, as SPEC counts them for the official samplers.
DRAWS = {
    "spaced": lambda n: n,
    "ddim": lambda n: n,
    "dpm++_m2": lambda n: 0,
    "edm_euler": lambda n: n,
    "edm_heun": lambda n: n,
    "edm_dpm_2": lambda n: n,
    "edm_euler_a": lambda n: n - 1,
    "edm_dpm_2_a": lambda n: n - 1,
    "edm_dpm++_2s_a": lambda n: n - 1,
    "edm_dpm++_2m_sde": lambda n: n - 1,
    "edm_dpm++_3m_sde": lambda n: n - 1,
    "edm_dpm++_sde": lambda n: 2 * (n - 1),
    "edm_lms": lambda n: 0,
    "edm_dpm++_2m": lambda n: 0,
}


def test_registry_matches_the_spec_list():
    assert set(SAMPLERS) == set(DRAWS)
    assert all(spec.name == name for name, spec in SAMPLERS.items())


# ---------------------------------------------------------------- official parity


@pytest.fixture(scope="module")
def parity(parity_dir: Path, hparams: dict):
    """The tiny official-format models, their condition, and the recorded sampler cases."""
    from diffbir.checkpoint import read_state_dict
    from diffbir.models.control_ldm import ControlLDM

    data = torch.load(parity_dir / "samplers.pt", map_location="cpu", weights_only=True)
    cldm = ControlLDM(**hparams["cldm"]).eval()
    cldm.load_sd_weights(read_state_dict(parity_dir / "sd.ckpt"), "sd.ckpt")
    cldm.load_controlnet_weights(read_state_dict(parity_dir / "controlnet.pth"), "controlnet")
    with torch.no_grad():
        texts = cldm.encode_text([data["pos_prompt"], data["neg_prompt"]])
        cond = cldm.condition(texts[:1], data["cond_img"])
    uncond = {**cond, "text": texts[1:]}
    diffusion = hparams["diffusion"]

    def base(zero_snr: bool) -> NoiseSchedule:
        return NoiseSchedule.linear(
            diffusion["timesteps"], diffusion["linear_start"], diffusion["linear_end"], zero_snr
        )

    return {"data": data, "cldm": cldm, "cond": cond, "uncond": uncond, "base": base}


def test_every_sampler_has_parity_cases(parity):
    assert {case["sampler"] for case in parity["data"]["cases"].values()} == set(SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_the_official_cases(parity, name: str):
    """Each recorded case, fed its recorded draws: the stream is used up exactly, its length is
    SPEC's count, the EDM grid equals the official one, the latent is within SPEC tolerance."""
    spec = SAMPLERS[name]
    cases = {k: c for k, c in parity["data"]["cases"].items() if c["sampler"] == name}
    assert cases
    for key, case in cases.items():
        base = parity["base"](case["zero_snr"])
        grid = spec.make_grid(base, case["steps"])
        if "sigmas" in case:
            assert torch.equal(
                torch.tensor(grid.sigmas, dtype=case["sigmas"].dtype), case["sigmas"]
            )
            assert list(grid.timesteps) == case["timesteps"].tolist(), key
        model = GuidedModel(
            parity["cldm"],
            parity["cond"],
            parity["uncond"],
            case["cfg_scale"],
            rescale=case["rescale_cfg"],
        )
        noise = RecordedNoise(case["noises"])
        knobs = {k: v for k, v in case["params"].items() if k in spec.knobs}
        with torch.no_grad():
            out = spec.sample(
                ModelDenoiser(model, grid, case["parameterization"]),
                parity["data"]["x_T"],
                grid,
                noise=noise,
                **knobs,
            )
        assert len(case["noises"]) == DRAWS[name](case["steps"]), key
        assert noise.remaining == 0, key
        assert_close_ref(out, case["out"], key)


def test_rescaled_cfg_scale_follows_the_spec_formula():
    for t in (0, 1, 250.5, 500, 999):
        expected = 1 + 4.0 * (1 - math.cos(math.pi * ((1000 - t) / 1000) ** 5)) / 2
        assert rescaled_cfg_scale(4.0, t) == pytest.approx(expected, rel=1e-12)
    assert rescaled_cfg_scale(1.0, 10) == 1.0 and rescaled_cfg_scale(0.5, 10) == 0.5
    assert rescaled_cfg_scale(6.0, 999) == pytest.approx(1.0, abs=1e-12)  # starts near 1

    seen = []

    def model_fn(x, t, cond):
        seen.append(float(t[0]))
        return torch.cat([torch.ones_like(x[:1]), torch.zeros_like(x[:1])])

    x = torch.zeros(1, 1, 2, 2)
    cond = {"text": torch.zeros(1, 3)}
    out = GuidedModel(model_fn, cond, cond, 4.0, rescale=True)(x, 600.0)
    assert seen == [600.0]
    torch.testing.assert_close(out, torch.full_like(x, rescaled_cfg_scale(4.0, 600.0)))


# ---------------------------------------------------------------- toy Gaussian data

DATA_MEAN, DATA_STD = 0.5, 0.3


def toy_model(base: NoiseSchedule, parameterization: str):
    """The exact eps or v prediction for data x0 ~ N(DATA_MEAN, DATA_STD^2) (per element)."""

    def model_fn(x_t, t, cond):
        a = torch.as_tensor(
            base.alphas_cumprod.numpy()[t.round().long().numpy()], dtype=x_t.dtype
        ).view(-1, *[1] * (x_t.ndim - 1))
        centered = x_t - a.sqrt() * DATA_MEAN
        marginal = a * DATA_STD**2 + 1 - a
        x0 = DATA_MEAN + a.sqrt() * DATA_STD**2 / marginal * centered
        eps = (1 - a).sqrt() / marginal * centered
        return eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return GuidedModel(model_fn, {})


def run(name: str, model, base, x_T, noise, parameterization="eps", steps=6, guidance=None):
    spec = SAMPLERS[name]
    grid = spec.make_grid(base, steps)
    denoise = ModelDenoiser(model, grid, parameterization)
    if guidance is not None:
        denoise = with_guidance(denoise, guidance, grid)
    return spec.sample(denoise, x_T, grid, noise=noise)


@pytest.mark.parametrize("grid_of", ["spaced", "ddim", "dpm++_m2", "edm_euler"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_eps_and_v_models_give_the_same_clean_estimate(grid_of: str, zero_snr: bool):
    """An eps and a v model predicting the same x0 give that x0 through ModelDenoiser, at every
    level of every kind of grid (EDM: the Karras c_skip/c_out/c_in); float64 to test the
    formulas, not float32 rounding."""
    base = NoiseSchedule.linear(zero_terminal_snr=zero_snr)
    grid = SAMPLERS[grid_of].make_grid(base, 5)
    keys = grid.sigmas[:-1] if grid_of == "edm_euler" else range(grid.num_steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) * 3
    x0 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    for key in keys:
        lv = grid.level(key)
        if lv.alpha == 0:
            continue
        x_in = x * lv.c_in
        eps = (x_in - lv.alpha * x0) / lv.sigma
        outputs = {"eps": eps, "v": lv.alpha * eps - lv.sigma * x0}
        for parameterization, output in outputs.items():
            model = GuidedModel(lambda x_, t, cond, out=output: out, {})
            got = ModelDenoiser(model, grid, parameterization)(x, key)
            torch.testing.assert_close(got, x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["spaced", "ddim"])
def test_eps_and_v_toy_models_sample_alike(name: str):
    base = NoiseSchedule.linear()
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = run(name, toy_model(base, "eps"), base, x_T, PerImageNoise([5, 6]), "eps")
    v = run(name, toy_model(base, "v"), base, x_T, PerImageNoise([5, 6]), "v")
    torch.testing.assert_close(v, eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_batch_of_two_equals_two_runs_of_one(name: str):
    """Per-image noise: an image's result does not depend on its batch (v2.1's v-prediction,
    zero-SNR setting, where every sampler also lands near the data mean)."""
    base = NoiseSchedule.linear(zero_terminal_snr=True)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pair = run(name, toy_model(base, "v"), base, x_T, PerImageNoise([5, 6]), "v")
    assert pair.isfinite().all() and (pair.mean() - DATA_MEAN).abs() < 0.3
    singles = [
        run(name, toy_model(base, "v"), base, x_T[i : i + 1], PerImageNoise([seed]), "v")
        for i, seed in enumerate((5, 6))
    ]
    assert torch.equal(torch.cat(singles), pair)


# Model evaluations (each one batched CFG forward) per run of N steps: the second-order
# single-step samplers evaluate twice per step but the last.
MODEL_CALLS = {name: (lambda n: n) for name in SAMPLERS} | {
    name: (lambda n: 2 * n - 1)
    for name in ("edm_heun", "edm_dpm_2", "edm_dpm_2_a", "edm_dpm++_2s_a", "edm_dpm++_sde")
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_model_calls_per_run(name: str):
    base = NoiseSchedule.linear(zero_terminal_snr=True)
    calls = []
    model = toy_model(base, "v")
    counted = GuidedModel(lambda x, t, cond: calls.append(t) or model.model_fn(x, t, cond), {})
    run(name, counted, base, torch.zeros(1, 1, 2, 2), OfficialNoise(0), "v", steps=7)
    assert len(calls) == MODEL_CALLS[name](7)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_guidance_at_scale_zero_changes_nothing(name: str):
    base = NoiseSchedule.linear()
    x_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    off = RestorationGuidance(target, 0.0, decode=lambda z: z)
    plain = run(name, toy_model(base, "eps"), base, x_T, OfficialNoise(3))
    guided = run(name, toy_model(base, "eps"), base, x_T, OfficialNoise(3), guidance=off)
    assert torch.equal(plain, guided)


def test_guidance_step_size_on_the_grids():
    """c1 is the spaced schedule's posterior_mean_coef1 exactly; on an EDM grid it follows the
    documented formula from the level and the next grid level (1 at the last step)."""
    base = NoiseSchedule.linear()
    spaced = SpacedSchedule.from_base(base, 10)
    assert [lv.x0_coef for lv in spaced.levels] == spaced.posterior_mean_coef1.tolist()
    edm = EdmGrid.from_base(base, 5)
    sigma, below = edm.sigmas[2], edm.sigmas[3]
    abar, abar_next = 1 / (1 + sigma**2), 1 / (1 + below**2)
    expected = (1 - abar / abar_next) * abar_next**0.5 / (1 - abar)
    assert edm.level(sigma).x0_coef == pytest.approx(expected, rel=1e-12)
    assert edm.level(edm.sigmas[-2]).x0_coef == 1.0
    assert edm.level(edm.sigmas[1] * 1.01).t == edm.timesteps[1]


def test_guidance_with_an_edm_sampler_lowers_the_restoration_loss(parity):
    """Same model, seed and sampler (v2.1 defaults); guided toward the condition image, the
    decoded result has a lower region-weighted loss against it than unguided."""
    data, cldm = parity["data"], parity["cldm"]
    base = parity["base"](True)
    model = GuidedModel(cldm, parity["cond"], parity["uncond"], 4.0)
    guidance = RestorationGuidance(data["cond_img"], 0.5, decode=cldm.vae_decode)
    results = []
    for g in (None, guidance):
        with torch.no_grad():
            z = run("edm_dpm++_3m_sde", model, base, data["x_T"], OfficialNoise(0), "v", 5, g)
            results.append(guidance.loss(cldm.vae_decode(z)).item())
    unguided, guided = results
    assert guided < 0.9 * unguided, (guided, unguided)


# ---------------------------------------------------------------- knobs and noise sources


def test_a_knob_the_sampler_lacks_is_an_error_naming_both():
    with pytest.raises(ValueError, match="order: sampler .edm_euler."):
        SAMPLERS["edm_euler"].check_knobs({"order": 2})
    with pytest.raises(ValueError, match=r"--order.*edm_euler"):
        SamplerOptions(name="edm_euler", order=2)
    with pytest.raises(ValueError, match=r"--eta.*spaced"):
        RestoreOptions(sampler=SamplerOptions(eta=0.5))
    with pytest.raises(ValueError, match="--sampler"):
        SamplerOptions(name="euler")
    with pytest.raises(ValueError, match="--s-noise"):
        SamplerOptions(name="edm_euler_a", s_noise=float("nan"))
    with pytest.raises(ValueError, match="--start-point"):
        SamplerOptions(start_point="image")
    with pytest.raises(ValueError, match="--noise-aug"):
        SamplerOptions(noise_aug=1000)
    assert SamplerOptions(name="edm_lms", order=3).knobs == {"order": 3}


def test_noise_sources():
    like = torch.zeros(2, 3, 4, 4)
    pair = PerImageNoise([7, 8])(like)
    alone = PerImageNoise([8])(like[:1])
    assert torch.equal(pair[1:], alone)  # batch composition changes nothing
    torch.manual_seed(9)
    official = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    source = OfficialNoise(9)
    assert all(torch.equal(source(like), expected) for expected in official)
    recorded = RecordedNoise([torch.ones(2, 3, 4, 4)])
    assert torch.equal(recorded(like), torch.ones_like(like)) and recorded.remaining == 0
    with pytest.raises(RuntimeError, match="used up"):
        recorded(like)


# ---------------------------------------------------------------- Brownian paths


class _RecordingStream:
    """A run's stream whose Brownian path records every draw as (level, next_level, draw)."""

    def __init__(self, stream) -> None:
        self.stream, self.path, self.draws = stream, None, []

    def __call__(self, like, level=None, next_level=None):
        return self.stream(like, level, next_level)

    def brownian(self, like, sigma_min, sigma_max):
        self.path = self.stream.brownian(like, sigma_min, sigma_max)

        def draw(like_, level=None, next_level=None):
            self.draws.append((level, next_level, self.path(like_, level, next_level)))
            return self.draws[-1][2]

        return draw


@pytest.mark.parametrize("stream", [PerImageNoise([5, 6]), OfficialNoise(5)], ids=type)
def test_dpmpp_sde_draws_two_increments_of_one_path_per_step(stream):
    """edm_dpm++_sde asks, per step, for noise over t->s and over t->t_next (overlapping): scaled
    back by sqrt(|d sigma|), the second is the first plus the path's increment over s->t_next."""
    base = NoiseSchedule.linear(zero_terminal_snr=True)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    recording = _RecordingStream(stream)
    run("edm_dpm++_sde", toy_model(base, "v"), base, x_T, recording, "v", steps=5)
    assert len(recording.draws) == 2 * 4
    for (t, s, first), (t_, t_next, second) in zip(
        recording.draws[::2], recording.draws[1::2], strict=True
    ):
        assert t == t_ and t > s > t_next > 0
        rest = recording.path(x_T, s, t_next) * abs(s - t_next) ** 0.5
        whole = second * abs(t - t_next) ** 0.5
        tol = 1e-6 * whole.abs().max().item()
        torch.testing.assert_close(first * abs(t - s) ** 0.5 + rest, whole, rtol=0, atol=tol)
        assert not torch.allclose(first, second, atol=0.1)  # not one draw reused


def test_official_brownian_path_is_the_spec_tree_seeded_by_one_draw_of_the_stream():
    """SPEC: the tree's seed is ``torch.randint(0, 2**63 - 1, [])`` drawn from the run's stream
    when the sampler starts; one torchsde tree (w0 = zeros of the whole batch); the noise over
    (a, b) is (W(b) - W(a)) / sqrt(|b - a|)."""
    like = torch.zeros(2, 3, 4, 4)
    gen = torch.Generator().manual_seed(9)
    x_T = torch.randn(like.shape, generator=gen)
    seed = torch.randint(0, 2**63 - 1, [], generator=gen)
    after = torch.randn(like.shape, generator=gen)
    stream = OfficialNoise(9)
    assert torch.equal(stream(like), x_T)
    path = stream.brownian(like, 0.5, 80.0)
    assert torch.equal(stream(like), after)  # the path took one draw, and only one
    tree = torchsde.BrownianTree(0.5, torch.zeros(like.shape), 80.0, entropy=int(seed))
    assert torch.equal(path(like, 10.0, 2.0), (tree(2.0, 10.0) * -1) / 8.0**0.5)
    assert torch.equal(path(like, 2.0, 10.0), tree(2.0, 10.0) / 8.0**0.5)
    with pytest.raises(ValueError, match="two noise levels"):
        path(like)
    with pytest.raises(ValueError, match="a batch of 2 for 3 tree seeds"):
        BrownianNoise(like, 0.5, 80.0, [1, 2, 3])


def test_per_image_brownian_paths_do_not_depend_on_the_batch(restorer_tiny):
    """One tree per image, seeded from that image's generator: an SDE sampler gives an image
    the same image alone or inside a batch (its latent differs in float32 rounding only, as
    with every sampler: a batch of two convolves with other last bits than a batch of one)."""
    conds = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    options = _options("edm_dpm++_sde", steps=3)
    pair = restorer_tiny.finish(restorer_tiny.sample(conds, [5, 6], options), conds, options)
    alone = restorer_tiny.finish(restorer_tiny.sample(conds[1:], [6], options), conds[1:], options)
    torch.testing.assert_close(pair[1:], alone, rtol=0, atol=1e-4)  # < 1/40 grey level
    like = torch.zeros(2, 4, 4, 4)
    pair_path = PerImageNoise([5, 6]).brownian(like, 0.1, 50.0)
    alone_path = PerImageNoise([6]).brownian(like[:1], 0.1, 50.0)
    assert torch.equal(pair_path(like, 20.0, 3.0)[1:], alone_path(like[:1], 20.0, 3.0))


# ---------------------------------------------------------------- the restorer


@pytest.fixture(scope="module")
def restorer_tiny(parity):
    """A Restorer of the parity models, without a stage-1 model."""
    return Restorer(parity["cldm"], Cleaner(model=None))


def _options(name: str = "spaced", steps: int = 3, **kwargs) -> RestoreOptions:
    tiles = kwargs.pop("tiles", TileOptions())
    guidance = kwargs.pop("guidance", GuidanceOptions())
    return RestoreOptions(
        steps=steps,
        cfg_scale=3.0,
        min_side=0,
        tiles=tiles,
        guidance=guidance,
        sampler=SamplerOptions(name=name, **kwargs),
    )


def _draws(count: int, shape=(1, 4, 8, 8)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


def test_start_point_and_noise_augmentation_draw_in_the_official_order(restorer_tiny):
    """x_T, then the augmentation noise, then the sampler's draws: the stream is used up; the
    ``cond`` start is q_sample(c_img, 999, noise), which at zero terminal SNR is the noise."""
    cond01 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    draws = _draws(5)
    restorer = restorer_tiny
    noise = RecordedNoise(draws)
    augmented = restorer.sample(cond01, [0], _options(noise_aug=200), noise=noise)
    assert noise.remaining == 0
    plain = restorer.sample(cond01, [0], _options(), noise=RecordedNoise(draws[:1] + draws[2:]))
    from_cond = restorer.sample(
        cond01, [0], _options(start_point="cond"), noise=RecordedNoise(draws[:4])
    )
    assert not torch.equal(augmented, plain) and not torch.equal(from_cond, plain)

    zero_snr = Restorer(
        restorer.cldm,
        restorer.cleaner,
        schedule=NoiseSchedule.linear(zero_terminal_snr=True),
        parameterization="v",
    )
    outs = [
        zero_snr.sample(cond01, [0], _options(start_point=p), noise=RecordedNoise(draws[:4]))
        for p in ("noise", "cond")
    ]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["spaced", "edm_heun", "edm_dpm++_3m_sde"])
def test_samplers_restore_tiled_with_guidance(restorer_tiny, name: str):
    """Tiled diffusion (several tiles) and tiled restoration guidance with samplers of each
    kind (the tiles wrap the model and the guidance, which every sampler calls alike)."""
    lq = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    tiles = TileOptions(diffusion=16, diffusion_stride=8)
    guidance = GuidanceOptions(scale=0.5, space="latent")
    out = restorer_tiny.restore(lq, [[1]], _options(name, 2, tiles=tiles, guidance=guidance))
    assert out.samples.shape == (1, 1, 3, 24, 40) and out.samples.isfinite().all()


def test_tiled_equals_untiled_when_one_tile_covers_with_an_edm_sampler(restorer_tiny):
    lq = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    guidance = GuidanceOptions(scale=0.5)
    options = _options("edm_dpm++_3m_sde", 3, guidance=guidance)
    plain = restorer_tiny.restore(lq, [[3]], options)
    tiles = TileOptions(vae_encoder=64, vae_decoder=64, diffusion=64)
    tiled = restorer_tiny.restore(
        lq, [[3]], _options("edm_dpm++_3m_sde", 3, guidance=guidance, tiles=tiles)
    )
    assert torch.equal(plain.samples, tiled.samples)


def test_gm_training_with_a_v_target_from_the_config(parity_dir: Path):
    """``model.parameterization=v`` and ``model.zero_terminal_snr=true`` make the GM loss the
    MSE to the velocity of the shared forward process (a zero model: the loss is E[v^2])."""
    from diffbir.training.cli import load_training_config
    from diffbir.training.gm import GenerationModuleTask

    overrides = [
        f"model.sd_weights={parity_dir / 'sd.ckpt'}",
        "model.stage1=null",
        "model.noise_aug_timestep=0",
        "model.parameterization=v",
        "model.zero_terminal_snr=true",
    ]
    task = GenerationModuleTask(load_training_config("gm_tiny", overrides))
    assert task.parameterization == "v" and task.schedule.alphas_cumprod[-1] == 0
    task.cldm.forward = lambda x_t, t, cond: torch.zeros_like(x_t)
    hq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = {"text": torch.zeros(2, 77, 64), "latent": torch.zeros(2, 4, 4, 4)}
    with torch.no_grad():
        loss = task.diffusion_loss(hq, cond, torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        z0 = task.cldm.vae_encode(hq * 2 - 1, sample=True, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = task.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        v = a.sqrt() * noise - (1 - a).sqrt() * z0
    torch.testing.assert_close(loss, (v**2).mean())


def test_benchmark_times_a_whole_image_with_a_named_sampler(tmp_path: Path):
    import json

    from diffbir.benchmark.cli import main

    out = tmp_path / "bench.json"
    argv = ["--config", "tiny", "--size", "64", "--device", "cpu", "--parts", "image"]
    argv += ["--sampler", "edm_dpm++_3m_sde", "--steps", "2", "--json", str(out)]
    assert main([*argv, "--matmul-size", "64", "--matmul-seconds", "0.05"]) == 0
    results = json.loads(out.read_text())
    assert results["sampler"] == "edm_dpm++_3m_sde" and results["steps"] == 2
    assert results["image_s"] > 0


def test_cli_sampler_flags_reach_the_options_and_are_checked(tmp_path: Path, capsys):
    from diffbir.pipeline.cli import config_from_argv, main

    flags = ["--sampler", "edm_lms", "--order", "3", "--rescale-cfg", "--start-point", "cond"]
    sampler = config_from_argv([*flags, "--noise-aug", "200"])[0].restore.sampler
    assert sampler == SamplerOptions(
        name="edm_lms", order=3, rescale_cfg=True, start_point="cond", noise_aug=200
    )
    assert main(["--sampler", "edm_euler", "--order", "2", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--order" in err and "edm_euler" in err
