"""Diffusion math: schedules, the forward process, CFG, exact laws of toy data, guidance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_ref

from diffbir.diffusion import (
    SAMPLERS,
    GuidedModel,
    ModelDenoiser,
    NoiseSchedule,
    OfficialNoise,
    RecordedNoise,
    RestorationGuidance,
    SpacedSchedule,
    ddim_timesteps,
    region_weight_map,
    spaced_timesteps,
    with_guidance,
)

SCHEDULE_FIELDS = (
    "timesteps",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


@pytest.fixture(scope="module")
def base() -> NoiseSchedule:
    return NoiseSchedule.linear()


def reference_base(hparams: dict) -> NoiseSchedule:
    cfg = hparams["diffusion"]
    assert cfg["beta_schedule"] == "linear" and cfg["parameterization"] == "eps"
    return NoiseSchedule.linear(cfg["timesteps"], cfg["linear_start"], cfg["linear_end"])


# ---------------------------------------------------------------- schedules (parity)


@pytest.mark.parametrize("steps", [50, 20, 7])
def test_spaced_schedule_matches_reference(refs, hparams, steps):
    schedule = SpacedSchedule.from_base(reference_base(hparams), steps)
    ref = refs[f"spaced{steps}"]
    assert set(SCHEDULE_FIELDS) <= set(ref)
    assert schedule.timesteps.dtype == torch.int64
    for name in SCHEDULE_FIELDS:
        assert_close_ref(getattr(schedule, name), ref[name], f"spaced{steps}.{name}")


def test_base_schedule_is_float64_linear_in_sqrt(base):
    assert base.betas.dtype == base.alphas_cumprod.dtype == torch.float64
    assert base.num_timesteps == 1000
    sqrt_betas = base.betas.sqrt()
    assert torch.allclose(sqrt_betas[0] ** 2, torch.tensor(0.00085, dtype=torch.float64))
    assert torch.allclose(sqrt_betas[-1] ** 2, torch.tensor(0.012, dtype=torch.float64))
    steps = sqrt_betas.diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=0, atol=1e-12)
    assert torch.allclose(base.alphas_cumprod, torch.cumprod(1 - base.betas, 0))


def test_spaced_timesteps_accumulate_the_stride():
    assert spaced_timesteps(1000, 50)[:4] == [0, 20, 41, 61]
    assert spaced_timesteps(1000, 1000) == list(range(1000))
    # 10 * 49.95 is a .5 tie; the accumulated stride (improved-DDPM respacing) lands below it.
    assert spaced_timesteps(1000, 21)[10] == 499
    for steps in (2, 3, 21, 25, 999):
        taken = spaced_timesteps(1000, steps)
        assert len(set(taken)) == steps and taken[0] == 0 and taken[-1] == 999
    for bad in (0, 1, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            spaced_timesteps(1000, bad)


def test_spaced_schedule_consistency(base):
    schedule = SpacedSchedule.from_base(base, 10)
    kept = base.alphas_cumprod[schedule.timesteps]
    assert torch.allclose(schedule.alphas_cumprod, kept)
    assert torch.allclose(torch.cumprod(1 - schedule.betas, 0), kept)
    assert schedule.alphas_cumprod_prev[0] == 1
    assert torch.allclose(
        schedule.sqrt_alphas_cumprod * schedule.sqrt_recip_alphas_cumprod,
        torch.ones(10, dtype=torch.float64),
    )


def test_ddim_grid_is_the_official_uniform_one(base):
    assert ddim_timesteps(1000, 5) == [1, 201, 401, 601, 801]
    grid = SpacedSchedule.ddim(base, 5)
    assert grid.timesteps.tolist() == [1, 201, 401, 601, 801]
    assert grid.alphas_cumprod_prev[0] == base.alphas_cumprod[0]  # not 1
    assert torch.equal(grid.alphas_cumprod, base.alphas_cumprod[grid.timesteps])
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(1000, 1000)


def test_forward_process_and_training_targets():
    schedule = NoiseSchedule.linear(zero_terminal_snr=True)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([0, 500, 999])
    a = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(x_t[2], noise[2])  # zero terminal SNR: pure noise at t = 999
    assert schedule.training_target(x0, noise, t, "eps") is noise
    v = schedule.training_target(x0, noise, t, "v")
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    # the v target and x_t give back x0 and the noise (SPEC's formulas)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * x_t, noise, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="parameterization"):
        schedule.training_target(x0, noise, t, "x0")


def test_zero_terminal_snr():
    schedule = NoiseSchedule.linear(zero_terminal_snr=True)
    plain = NoiseSchedule.linear()
    assert schedule.alphas_cumprod[-1] == 0
    assert torch.allclose(schedule.alphas_cumprod[0], plain.alphas_cumprod[0])
    assert bool(((schedule.betas > 0) & (schedule.betas <= 1)).all())
    assert schedule.betas[-1] == 1
    assert torch.allclose(torch.cumprod(1 - schedule.betas, 0), schedule.alphas_cumprod)
    spaced = SpacedSchedule.from_base(schedule, 10)
    assert spaced.alphas_cumprod[-1] == 0 and spaced.betas[-1] == 1


# ---------------------------------------------------------------- one step (parity)


def constant_model(output: torch.Tensor) -> GuidedModel:
    return GuidedModel(lambda x, t, cond: output, {})


def test_step_matches_reference(refs, hparams):
    """One spaced-DDPM step: the clean estimate through ModelDenoiser, the posterior mean and
    variance."""
    ref = refs["step"]
    schedule = SpacedSchedule.from_base(reference_base(hparams), ref["steps"])
    index = ref["index"]
    assert schedule.level(index).t == ref["model_t"]
    pred_x0 = ModelDenoiser(constant_model(ref["eps"]), schedule, "eps")(ref["x_t"], index)
    assert_close_ref(pred_x0, ref["pred_x0"], "pred_x0")
    mean = (
        schedule.posterior_mean_coef1[index] * pred_x0
        + schedule.posterior_mean_coef2[index] * ref["x_t"]
    )
    assert_close_ref(mean.float(), ref["posterior_mean"], "posterior_mean")
    variance = schedule.posterior_variance[index].reshape(1, 1, 1, 1)
    assert_close_ref(variance, ref["posterior_variance"], "posterior_variance")
    assert torch.allclose(schedule.posterior_log_variance_clipped[index].exp(), variance)


def test_spaced_sampler_draws_every_step_and_uses_all_but_the_last(base):
    """The official draw order: one draw per step; the last step returns the posterior mean."""
    schedule = SpacedSchedule.from_base(base, 4)
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    draws = [torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    denoise = ModelDenoiser(constant_model(eps), schedule, "eps")
    spec = SAMPLERS["spaced"]
    out = spec.fn(denoise, x_T, schedule, noise=RecordedNoise(draws))
    changed = spec.fn(denoise, x_T, schedule, noise=RecordedNoise([*draws[:3], draws[3] * 100]))
    assert torch.equal(out, changed)
    x = x_T
    for i in reversed(range(4)):
        x0 = denoise(x, i)
        mean = schedule.posterior_mean_coef1[i] * x0 + schedule.posterior_mean_coef2[i] * x
        std = (0.5 * schedule.posterior_log_variance_clipped[i]).exp()
        x = (mean + std * draws[3 - i] if i > 0 else mean).float()
    torch.testing.assert_close(out, x)


# ---------------------------------------------------------------- classifier-free guidance


class CountingModel:
    """A conditional toy model whose output depends on x, t and both condition entries."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        text = cond["text"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return x * text + cond["latent"] * 0.5 + t.view(-1, 1, 1, 1).float() / 1000


def test_classifier_free_guidance_is_one_batched_forward():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, generator=gen)
    t = torch.tensor([999, 999])
    latent = torch.randn(2, 4, 3, 5, generator=gen)
    cond = {"text": torch.randn(2, 7, 8, generator=gen), "latent": latent}
    uncond = {"text": torch.randn(2, 7, 8, generator=gen), "latent": latent}
    model = CountingModel()
    out = GuidedModel(model, cond, uncond, 4.0)(x, 999.0)
    assert model.calls == [4]
    eps_c, eps_u = CountingModel()(x, t, cond), CountingModel()(x, t, uncond)
    torch.testing.assert_close(out, eps_u + 4.0 * (eps_c - eps_u))

    model = CountingModel()
    out = GuidedModel(model, cond, uncond, 1.0)(x, 999.0)
    assert model.calls == [2]
    torch.testing.assert_close(out, eps_c)

    with pytest.raises(ValueError, match="same keys"):
        GuidedModel(model, cond, {"text": uncond["text"]}, 2.0)


# ---------------------------------------------------------------- toy Gaussian data

DATA_MEAN, DATA_STD = 0.5, 0.3


def gaussian_posterior(base: NoiseSchedule, x_t, t):
    """Exact E[x0 | x_t] and E[eps | x_t] for data x0 ~ N(DATA_MEAN, DATA_STD^2)."""
    a = base.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
    centered = x_t - a.sqrt() * DATA_MEAN
    marginal_var = a * DATA_STD**2 + 1 - a
    x0 = DATA_MEAN + a.sqrt() * DATA_STD**2 / marginal_var * centered
    eps = (1 - a).sqrt() / marginal_var * centered
    return x0, eps, a


def toy_denoiser(base: NoiseSchedule, schedule, parameterization="eps", calls=None):
    """ModelDenoiser of the exact eps or v prediction for the toy data."""

    def model_fn(x_t, t, cond):
        if calls is not None:
            calls.append(t.clone())
        x0, eps, a = gaussian_posterior(base, x_t, t.long())
        return eps if parameterization == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return ModelDenoiser(GuidedModel(model_fn, {}), schedule, parameterization)


def sample(name: str, denoise, schedule, x_T, seed: int = 1):
    return SAMPLERS[name].fn(denoise, x_T, schedule, noise=OfficialNoise(seed))


def affine_chain(schedule: SpacedSchedule, sampler: str):
    """Exact per-step maps x_{i-1} = g * x_i + h + s * z of a sampler fed the exact posterior.

    For Gaussian data every sampler step is affine in x_i, so the law of the output is known.
    """
    s = schedule  # float64
    maps = []
    for i in reversed(range(s.num_steps)):
        a, a_prev = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
        marginal_var = a * DATA_STD**2 + 1 - a
        k = a.sqrt() * DATA_STD**2 / marginal_var  # E[x0|x] = mu + k (x - sqrt(a) mu)
        e = (1 - a).sqrt() / marginal_var  # E[eps|x] = e (x - sqrt(a) mu)
        x0_offset = DATA_MEAN * (1 - k * a.sqrt())
        if sampler == "ddpm":
            c1, c2 = s.posterior_mean_coef1[i], s.posterior_mean_coef2[i]
            std = (0.5 * s.posterior_log_variance_clipped[i]).exp() if i > 0 else 0.0
            maps.append((c1 * k + c2, c1 * x0_offset, std))
        else:
            direction = (1 - a_prev).sqrt()
            gain = a_prev.sqrt() * k + direction * e
            offset = a_prev.sqrt() * x0_offset - direction * e * a.sqrt() * DATA_MEAN
            maps.append((gain, offset, 0.0))
    return maps


def output_law(maps, x_T: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean (per element, given x_T) and variance of the chain output."""
    mean, variance = x_T.double(), 0.0
    for gain, offset, std in maps:
        mean, variance = gain * mean + offset, gain**2 * variance + float(std) ** 2
    return mean, variance


def assert_matches_law(samples, maps, x_T) -> None:
    """Samples agree with the exact law: their mean given x_T, and their noise variance."""
    mean, variance = output_law(maps, x_T)
    residual = samples.double() - mean
    if variance == 0:
        assert residual.abs().max() < 1e-4
        return
    assert abs(residual.mean().item()) < 4 * (variance / residual.numel()) ** 0.5
    assert abs(residual.var().item() / variance - 1) < 0.06


def test_ddpm_samples_toy_gaussian(base):
    schedule = SpacedSchedule.from_base(base, 50)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls, progress = [], []
    run = SAMPLERS["spaced"].fn(
        toy_denoiser(base, schedule, calls=calls),
        x_T,
        schedule,
        noise=OfficialNoise(1),
        callback=lambda info: progress.append((info["i"], info["level"], info["x"].shape)),
    )
    assert_matches_law(run, affine_chain(schedule, "ddpm"), x_T)
    assert abs(run.mean().item() - DATA_MEAN) < 0.02
    assert [int(t[0]) for t in calls] == schedule.timesteps.flip(0).tolist()
    assert all(t.shape == (64,) for t in calls)
    assert progress == [(i, 49 - i, x_T.shape) for i in range(50)]

    again = sample("spaced", toy_denoiser(base, schedule), schedule, x_T, seed=1)
    other = sample("spaced", toy_denoiser(base, schedule), schedule, x_T, seed=2)
    assert torch.equal(run, again)
    assert not torch.allclose(run, other)


def test_ddim_samples_toy_gaussian(base):
    schedule = SpacedSchedule.ddim(base, 25)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = sample("ddim", toy_denoiser(base, schedule), schedule, x_T, seed=1)
    second = sample("ddim", toy_denoiser(base, schedule), schedule, x_T, seed=5)
    assert torch.equal(first, second)  # eta 0: the draws are unused
    assert_matches_law(first, affine_chain(schedule, "ddim"), x_T)
    assert abs(first.mean().item() - DATA_MEAN) < 0.02


def test_many_steps_land_on_the_data_distribution(base):
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for name in ("spaced", "ddim"):
        schedule = SAMPLERS[name].make_grid(base, 500)
        samples = sample(name, toy_denoiser(base, schedule), schedule, x_T)
        assert abs(samples.mean().item() - DATA_MEAN) < 0.02
        assert abs(samples.std().item() / DATA_STD - 1) < 0.04


def test_v_prediction_with_zero_terminal_snr():
    """v-prediction + zero SNR, spaced DDPM and DDIM: outputs follow the exact law of the
    toy data (SPEC's v formulas inside ModelDenoiser, the rescaled schedule)."""
    zero_snr = NoiseSchedule.linear(zero_terminal_snr=True)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    schedule = SpacedSchedule.from_base(zero_snr, 50)
    ddpm = sample("spaced", toy_denoiser(zero_snr, schedule, "v"), schedule, x_T)
    assert torch.isfinite(ddpm).all()
    assert_matches_law(ddpm, affine_chain(schedule, "ddpm"), x_T)
    ddim_grid = SpacedSchedule.ddim(zero_snr, 50)
    ddim = sample("ddim", toy_denoiser(zero_snr, ddim_grid, "v"), ddim_grid, x_T)
    assert_matches_law(ddim, affine_chain(ddim_grid, "ddim"), x_T)
    # At zero terminal SNR the first DDPM step (beta = 1) forgets x_T: only the noise matters.
    other_x_T = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(4))
    other_start = sample("spaced", toy_denoiser(zero_snr, schedule, "v"), schedule, other_x_T)
    torch.testing.assert_close(other_start, ddpm)
    with pytest.raises(ValueError, match="v-prediction"):
        toy_denoiser(zero_snr, schedule, "eps")(x_T, schedule.num_steps - 1)


# ---------------------------------------------------------------- restoration guidance


def test_weight_map_matches_reference(refs):
    weight = region_weight_map(refs["guidance_target"])
    assert_close_ref(weight, refs["guidance_weight"], "guidance_weight")


def test_weight_map_odd_sizes_and_flat_regions():
    flat = torch.full((2, 3, 7, 9), 0.3)
    weight = region_weight_map(flat)
    assert weight.shape == (2, 1, 7, 9)
    assert torch.allclose(weight, torch.ones_like(weight))
    edge = torch.zeros(1, 3, 9, 11)
    edge[..., 6:] = 1.0  # a vertical step edge between columns 5 and 6
    weight = region_weight_map(edge)
    assert torch.allclose(weight[..., :4], torch.ones(1, 1, 9, 4))
    assert torch.allclose(weight[..., 8:], torch.ones(1, 1, 9, 3))
    assert (weight[..., 4:8] < 0.01).all()
    with pytest.raises(ValueError, match="RGB"):
        region_weight_map(torch.rand(1, 1, 8, 8))


def manual_guided(z0, target01, weight, scale, coef1, decode=lambda z: z):
    """Independent one-step reference: the analytic gradient for a linear decoder."""
    goal = 2 * target01 - 1
    residual = decode(z0) - goal
    per_item = residual[0].numel()
    grad = 2 * weight * residual / per_item
    return z0 - 3000 * scale * grad / coef1


def test_guidance_update_in_rgb_space_matches_analytic_gradient():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 6, 8, generator=gen)
    z0 = torch.randn(2, 3, 6, 8, generator=gen)
    weight = region_weight_map(target)
    for loss, expected_weight in (("w_mse", weight), ("mse", torch.ones_like(weight))):
        guidance = RestorationGuidance(target, 0.5, loss=loss, decode=lambda z: z)
        with torch.no_grad():
            got = guidance(z0, 400, 0.2)
        assert not got.requires_grad
        torch.testing.assert_close(got, manual_guided(z0, target, expected_weight, 0.5, 0.2))


def test_guidance_is_detached_and_works_in_inference_mode():
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 4, 4, generator=gen)
    leaf = torch.randn(1, 3, 4, 4, generator=gen, requires_grad=True)
    guidance = RestorationGuidance(target, 1.0, decode=lambda z: z * 2)
    got = guidance(leaf * 1.0, 10, 0.5)
    assert not got.requires_grad and leaf.grad is None
    with torch.inference_mode():
        inner = RestorationGuidance(target, 1.0, decode=lambda z: z * 2)
        in_inference = inner(leaf.detach(), 10, 0.5)
    torch.testing.assert_close(in_inference, got)


def test_guidance_window_scale_zero_and_repeat():
    gen = torch.Generator().manual_seed(2)
    target = torch.rand(1, 3, 4, 4, generator=gen)
    z0 = torch.randn(1, 3, 4, 4, generator=gen)
    guidance = RestorationGuidance(target, 0.1, t_start=500, t_stop=100, decode=lambda z: z)
    assert guidance(z0, 499, 0.3) is z0  # t + 1 == t_start: outside
    assert guidance(z0, 99, 0.3) is z0  # t + 1 == t_stop: outside
    assert not torch.equal(guidance(z0, 498, 0.3), z0)
    assert not torch.equal(guidance(z0, 100, 0.3), z0)
    assert RestorationGuidance(target, 0.0, decode=lambda z: z)(z0, 500, 0.3) is z0

    twice = RestorationGuidance(target, 0.01, repeat=2, decode=torch.tanh)
    once = RestorationGuidance(target, 0.01, decode=torch.tanh)
    torch.testing.assert_close(twice(z0, 10, 0.3), once(once(z0, 10, 0.3), 10, 0.3))


def test_guidance_in_latent_space():
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(1, 3, 8, 12, generator=gen)
    z0 = torch.randn(1, 3, 4, 6, generator=gen)
    encode = lambda img: F.avg_pool2d(img, 2)  # noqa: E731
    guidance = RestorationGuidance(target, 0.2, space="latent", encode=encode)
    weight = F.interpolate(region_weight_map(target), size=(4, 6), mode="area")
    residual = z0 - encode(2 * target - 1)
    expected = z0 - 3000 * 0.2 * (2 * weight * residual / residual.numel()) / 0.4
    torch.testing.assert_close(guidance(z0, 10, 0.4), expected)


def test_guidance_rejects_bad_options():
    target = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="space"):
        RestorationGuidance(target, 1.0, space="pixel", decode=lambda z: z)
    with pytest.raises(ValueError, match="loss"):
        RestorationGuidance(target, 1.0, loss="l1", decode=lambda z: z)
    with pytest.raises(ValueError, match="decode"):
        RestorationGuidance(target, 1.0)
    with pytest.raises(ValueError, match="encode"):
        RestorationGuidance(target, 1.0, space="latent")
    with pytest.raises(ValueError, match="target"):
        RestorationGuidance(target[:, :1], 1.0, decode=lambda z: z)


def test_samplers_feed_the_guided_x0_into_their_steps(base):
    schedule = SpacedSchedule.from_base(base, 10)
    seen = []

    def guidance(pred_x0, t_model, coef1):
        seen.append((t_model, coef1))
        return torch.zeros_like(pred_x0)

    x_T = torch.randn(1, 4, 3, 3)
    guided = with_guidance(toy_denoiser(base, schedule), guidance, schedule)
    assert torch.equal(guided(x_T, 4), torch.zeros_like(x_T))
    assert seen == [(float(schedule.timesteps[4]), float(schedule.posterior_mean_coef1[4]))]
    seen.clear()
    result = sample("spaced", guided, schedule, x_T)
    assert [t for t, _ in seen] == schedule.timesteps.flip(0).tolist()
    # With x0 forced to 0 the final mean is coef2[0] * x_1 = 0 (coef2 at index 0 is 0).
    assert torch.allclose(result, torch.zeros_like(result))
    grid = SAMPLERS["edm_heun"].make_grid(base, 4)
    seen.clear()
    sample("edm_heun", with_guidance(toy_denoiser(base, grid), guidance, grid), grid, x_T)
    assert len(seen) == 2 * 4 - 1  # every clean estimate, the second Heun stage included


def test_guided_pred_x0_matches_reference(refs, hparams, parity_dir):
    control_ldm = pytest.importorskip("diffbir.models.control_ldm")
    from diffbir.checkpoint import read_state_dict

    model = control_ldm.ControlLDM(**hparams["cldm"]).eval()
    model.load_sd_weights(read_state_dict(parity_dir / "sd.ckpt"), str(parity_dir / "sd.ckpt"))
    step = refs["step"]
    schedule = SpacedSchedule.from_base(reference_base(hparams), step["steps"])
    coef1 = schedule.level(step["index"]).x0_coef
    for loss in ("w_mse", "mse"):
        guidance = RestorationGuidance(
            refs["guidance_target"], 0.5, space="rgb", loss=loss, decode=model.vae_decode
        )
        with torch.no_grad():
            guided = guidance(step["pred_x0"], step["model_t"], coef1)
        assert_close_ref(guided, refs[f"guided_pred_x0_{loss}_rgb_s0.5"], f"guided {loss}")
