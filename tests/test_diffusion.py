"""Diffusion math: schedules, samplers, classifier-free and restoration guidance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_ref

from diffbir.diffusion import (
    NoiseSchedule,
    RestorationGuidance,
    SpacedSchedule,
    cfg_denoiser,
    gaussian_noise,
    noise_like,
    posterior_mean_variance,
    predict_x0_and_eps,
    region_weight_map,
    sample_ddim,
    sample_spaced_ddpm,
    spaced_ddpm_step,
    spaced_timesteps,
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


def test_schedule_to_moves_once(base):
    schedule = SpacedSchedule.from_base(base, 7)
    assert schedule.to(dtype=torch.float64) is schedule
    moved = schedule.to("cpu", torch.float32)
    assert moved.posterior_variance.dtype == torch.float32
    assert moved.sqrt_alphas_cumprod.dtype == torch.float32
    assert moved.timesteps.dtype == torch.int64
    assert moved.to("cpu", torch.float32) is moved


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


def test_step_matches_reference(refs, hparams):
    ref = refs["step"]
    schedule = SpacedSchedule.from_base(reference_base(hparams), ref["steps"])
    index = ref["index"]
    assert int(schedule.timesteps[index]) == ref["model_t"]
    pred_x0, pred_eps = predict_x0_and_eps(schedule, ref["x_t"], index, ref["eps"])
    assert pred_eps is ref["eps"]
    assert_close_ref(pred_x0, ref["pred_x0"], "pred_x0")
    mean, variance, log_variance = posterior_mean_variance(schedule, ref["x_t"], pred_x0, index)
    assert_close_ref(mean, ref["posterior_mean"], "posterior_mean")
    assert_close_ref(variance.reshape(1, 1, 1, 1), ref["posterior_variance"], "posterior_variance")

    out = spaced_ddpm_step(
        schedule, ref["x_t"], index, ref["eps"], generator=torch.Generator().manual_seed(3)
    )
    noise = torch.randn(ref["x_t"].shape, generator=torch.Generator().manual_seed(3))
    expected = ref["posterior_mean"] + (0.5 * log_variance).exp() * noise
    assert_close_ref(out.x_prev, expected, "x_prev")
    assert torch.allclose(log_variance.exp(), variance)


def test_last_step_adds_no_noise(base):
    schedule = SpacedSchedule.from_base(base, 10)
    x_t, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = spaced_ddpm_step(schedule, x_t, 0, eps)
    mean, _, _ = posterior_mean_variance(schedule, x_t, out.pred_x0, 0)
    assert torch.equal(out.x_prev, mean)


def test_parameterization_round_trips(base):
    schedule = SpacedSchedule.from_base(base, 20)
    x0, eps = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    for index in (0, 7, 19):
        a = schedule.alphas_cumprod[index]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        velocity = a.sqrt() * eps - (1 - a).sqrt() * x0
        got_x0, got_eps = predict_x0_and_eps(schedule, x_t, index, velocity, "v")
        assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, eps, atol=1e-5)
        got_x0, _ = predict_x0_and_eps(schedule, x_t, index, eps, "eps")
        assert torch.allclose(got_x0, x0, atol=1e-4)
    with pytest.raises(ValueError, match="parameterization"):
        predict_x0_and_eps(schedule, x0, 0, eps, "x0")


# ---------------------------------------------------------------- classifier-free guidance


class CountingModel:
    """A conditional toy model whose output depends on x, t and both condition entries."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, cond):
        self.calls.append(x.shape[0])
        text = cond["text"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return x * text + cond["latent"] * 0.5 + t.view(-1, 1, 1, 1).float() / 1000


def test_cfg_denoiser_is_one_batched_forward():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, generator=gen)
    t = torch.tensor([999, 999])
    latent = torch.randn(2, 4, 3, 5, generator=gen)
    cond = {"text": torch.randn(2, 7, 8, generator=gen), "latent": latent}
    uncond = {"text": torch.randn(2, 7, 8, generator=gen), "latent": latent}
    model = CountingModel()
    out = cfg_denoiser(model, cond, uncond, 4.0)(x, t)
    assert model.calls == [4]
    eps_c, eps_u = CountingModel()(x, t, cond), CountingModel()(x, t, uncond)
    torch.testing.assert_close(out, eps_u + 4.0 * (eps_c - eps_u))

    model = CountingModel()
    out = cfg_denoiser(model, cond, uncond, 1.0)(x, t)
    assert model.calls == [2]
    torch.testing.assert_close(out, eps_c)

    with pytest.raises(ValueError, match="same keys"):
        cfg_denoiser(model, cond, {"text": uncond["text"]}, 2.0)


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


def eps_denoiser(base: NoiseSchedule, calls: list | None = None):
    def denoiser(x_t, t):
        if calls is not None:
            calls.append(t.clone())
        return gaussian_posterior(base, x_t, t)[1]

    return denoiser


def v_denoiser(base: NoiseSchedule):
    def denoiser(x_t, t):
        x0, eps, a = gaussian_posterior(base, x_t, t)
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return denoiser


def affine_chain(schedule: SpacedSchedule, sampler: str, eta: float = 0.0):
    """Exact per-step maps x_{i-1} = g * x_i + h + s * z of a sampler fed the exact posterior.

    For Gaussian data every sampler step is affine in x_i, so the law of the output is known.
    """
    s = schedule.to(dtype=torch.float64)
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
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            direction = (1 - a_prev - sigma**2).sqrt()
            gain = a_prev.sqrt() * k + direction * e
            offset = a_prev.sqrt() * x0_offset - direction * e * a.sqrt() * DATA_MEAN
            maps.append((gain, offset, sigma))
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
    run = sample_spaced_ddpm(
        eps_denoiser(base, calls),
        schedule,
        x_T,
        generator=torch.Generator().manual_seed(1),
        callback=lambda done, total, x: progress.append((done, total, x.shape)),
    )
    assert_matches_law(run, affine_chain(schedule, "ddpm"), x_T)
    assert abs(run.mean().item() - DATA_MEAN) < 0.02
    assert [int(t[0]) for t in calls] == schedule.timesteps.flip(0).tolist()
    assert all(t.dtype == torch.int64 and t.shape == (64,) for t in calls)
    assert progress == [(done, 50, x_T.shape) for done in range(1, 51)]

    again = sample_spaced_ddpm(
        eps_denoiser(base), schedule, x_T, generator=torch.Generator().manual_seed(1)
    )
    other = sample_spaced_ddpm(
        eps_denoiser(base), schedule, x_T, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(run, again)
    assert not torch.allclose(run, other)


def test_ddim_samples_toy_gaussian(base):
    schedule = SpacedSchedule.from_base(base, 25)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    first = sample_ddim(eps_denoiser(base), schedule, x_T)
    second = sample_ddim(
        eps_denoiser(base), schedule, x_T, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(first, second)
    assert_matches_law(first, affine_chain(schedule, "ddim"), x_T)
    assert abs(first.mean().item() - DATA_MEAN) < 0.02

    stochastic = [
        sample_ddim(
            eps_denoiser(base), schedule, x_T, eta=1.0, generator=torch.Generator().manual_seed(s)
        )
        for s in (7, 7, 8)
    ]
    assert torch.equal(stochastic[0], stochastic[1])
    assert not torch.allclose(stochastic[0], stochastic[2])
    assert_matches_law(stochastic[0], affine_chain(schedule, "ddim", eta=1.0), x_T)


def test_many_steps_land_on_the_data_distribution(base):
    schedule = SpacedSchedule.from_base(base, 500)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for samples in (
        sample_spaced_ddpm(
            eps_denoiser(base), schedule, x_T, generator=torch.Generator().manual_seed(1)
        ),
        sample_ddim(eps_denoiser(base), schedule, x_T),
    ):
        assert abs(samples.mean().item() - DATA_MEAN) < 0.02
        assert abs(samples.std().item() / DATA_STD - 1) < 0.04


def test_v_prediction_with_zero_terminal_snr():
    zero_snr = NoiseSchedule.linear(zero_terminal_snr=True)
    schedule = SpacedSchedule.from_base(zero_snr, 50)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ddpm = sample_spaced_ddpm(
        v_denoiser(zero_snr),
        schedule,
        x_T,
        parameterization="v",
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.isfinite(ddpm).all()
    assert_matches_law(ddpm, affine_chain(schedule, "ddpm"), x_T)
    ddim = sample_ddim(v_denoiser(zero_snr), schedule, x_T, parameterization="v")
    assert_matches_law(ddim, affine_chain(schedule, "ddim"), x_T)
    # At zero terminal SNR the first DDPM step (beta = 1) forgets x_T: only the noise matters.
    other_start = sample_spaced_ddpm(
        v_denoiser(zero_snr),
        schedule,
        torch.randn(x_T.shape, generator=torch.Generator().manual_seed(4)),
        parameterization="v",
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(other_start, ddpm)


def test_noise_like_is_seeded():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    first = noise_like(x, torch.Generator().manual_seed(9))
    assert first.dtype == torch.float64 and first.shape == x.shape
    assert torch.equal(first, noise_like(x, torch.Generator().manual_seed(9)))
    assert not torch.equal(first, noise_like(x, torch.Generator().manual_seed(10)))
    x_T = gaussian_noise((2, 3, 4, 4), generator=torch.Generator().manual_seed(9))
    assert x_T.dtype == torch.float32
    torch.testing.assert_close(x_T.double(), first)


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


def test_sampler_feeds_guided_x0_into_the_posterior(base):
    schedule = SpacedSchedule.from_base(base, 10)
    seen = []

    def guidance(pred_x0, t_model, coef1):
        seen.append((t_model, coef1))
        return torch.zeros_like(pred_x0)

    x_t = torch.randn(1, 4, 3, 3)
    out = spaced_ddpm_step(schedule, x_t, 4, torch.randn_like(x_t), guidance=guidance)
    assert seen == [(int(schedule.timesteps[4]), float(schedule.posterior_mean_coef1[4]))]
    assert torch.equal(out.pred_x0, torch.zeros_like(x_t))
    seen.clear()
    result = sample_spaced_ddpm(eps_denoiser(base), schedule, x_t, guidance=guidance)
    assert [t for t, _ in seen] == schedule.timesteps.flip(0).tolist()
    # With x0 forced to 0 the final mean is coef2[0] * x_1 = 0 (coef2 at index 0 is 0).
    assert torch.allclose(result, torch.zeros_like(result))
    seen.clear()
    sample_ddim(eps_denoiser(base), schedule, x_t, guidance=guidance)
    assert len(seen) == 10


def test_guided_pred_x0_matches_reference(refs, hparams, parity_dir):
    control_ldm = pytest.importorskip("diffbir.models.control_ldm")
    from diffbir.checkpoint import read_state_dict

    model = control_ldm.ControlLDM(**hparams["cldm"]).eval()
    model.load_sd_weights(read_state_dict(parity_dir / "sd.ckpt"), str(parity_dir / "sd.ckpt"))
    step = refs["step"]
    schedule = SpacedSchedule.from_base(reference_base(hparams), step["steps"])
    coef1 = float(schedule.posterior_mean_coef1[step["index"]])
    for loss in ("w_mse", "mse"):
        guidance = RestorationGuidance(
            refs["guidance_target"], 0.5, space="rgb", loss=loss, decode=model.vae_decode
        )
        with torch.no_grad():
            guided = guidance(step["pred_x0"], step["model_t"], coef1)
        assert_close_ref(guided, refs[f"guided_pred_x0_{loss}_rgb_s0.5"], f"guided {loss}")
