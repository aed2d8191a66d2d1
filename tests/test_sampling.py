"""Tests for src.sampling: time grids, common random noise, and the Euler sampler (docs/sampling.md#sampler)."""

from __future__ import annotations

import math

import pytest
import torch

from src.formulations.base import Formulation, expand_like, mean_flat
from src.sampling import initial_noise, rf_time_grid, sample, shift_time, step_times


# ---- small local formulations (the real recipes are used in test_sampling_recipes.py) -------------
class _RF(Formulation):
    """Rectified flow: z = (1 - t) x0 + t eps, predicts v = eps - x0."""

    name, family = "rf", "rf"

    def params(self):
        return {}

    def a(self, t):
        return 1 - t

    def b(self, t):
        return t

    def t_from_sigma(self, sigma):
        return sigma / (1 + sigma)

    def sample_t(self, n, generator=None):
        return torch.rand(n, generator=generator)

    def c_noise(self, t):
        return t

    def target(self, x0, eps, t):
        return eps - x0

    def to_x0_eps(self, out, z, t):
        t = expand_like(t, z)
        return z - t * out, z + (1 - t) * out

    def loss(self, out, x0, eps, t):
        return mean_flat((out - self.target(x0, eps, t)) ** 2)

    def w_eps(self, t):
        return 1 / (1 - t) ** 2


class _CosEps(_RF):
    """eps-prediction on the cosine process, t clipped below 1."""

    name, family, t_max = "eps/cos", "eps_cos", 0.999

    def a(self, t):
        return torch.cos(math.pi / 2 * t)

    def b(self, t):
        return torch.sin(math.pi / 2 * t)

    def t_from_sigma(self, sigma):
        return torch.atan(sigma) * 2 / math.pi

    def target(self, x0, eps, t):
        return eps

    def to_x0_eps(self, out, z, t):
        a, b = expand_like(self.a(t), z), expand_like(self.b(t), z)
        return (z - b * out) / a, out


class _EDM(_RF):
    """EDM preconditioning (Karras et al. 2022) with sigma = t / (1 - t)."""

    name, family, t_min, t_max = "edm/rf", "edm_rf", 1e-4, 0.99
    sd = 0.5

    def a(self, t):
        return torch.ones_like(t)

    def b(self, t):
        return t / (1 - t)

    def c_in(self, t):
        return 1 / torch.sqrt(self.b(t) ** 2 + self.sd**2)

    def c_noise(self, t):
        return torch.log(self.b(t)) / 4

    def _skip_out(self, t, z):
        s = expand_like(self.b(t), z)
        return self.sd**2 / (s**2 + self.sd**2), s * self.sd / torch.sqrt(s**2 + self.sd**2), s

    def target(self, x0, eps, t):
        z = self.add_noise(x0, eps, t)
        c_skip, c_out, _ = self._skip_out(t, z)
        return (x0 - c_skip * z) / c_out

    def to_x0_eps(self, out, z, t):
        c_skip, c_out, s = self._skip_out(t, z)
        x0 = c_skip * z + c_out * out
        return x0, (z - x0) / s


FORMULATIONS = [_RF(), _CosEps(), _EDM()]


IDS = [f.name for f in FORMULATIONS]


# ---- analytic denoiser for Gaussian data ----------------------------------------------------------
def _t_from_c_noise(f: Formulation, value: float) -> float:
    """Invert the monotone c_noise on [t_min, t_max] by multisection (the backbone only sees c_noise(t))."""
    lo, hi = f.t_min, f.t_max
    for _ in range(6):  # each round shrinks the bracket 512-fold
        grid = torch.linspace(lo, hi, 513, dtype=torch.float64)
        c = f.c_noise(grid)
        below = (c < value) if c[-1] > c[0] else (c > value)
        i = int(below.sum().clamp(1, 512))  # c is monotone: the bracket is [grid[i - 1], grid[i]]
        lo, hi = float(grid[i - 1]), float(grid[i])
    return 0.5 * (lo + hi)


def gaussian_denoiser(f: Formulation, mu: torch.Tensor, cov: torch.Tensor):
    """Backbone returning f's native output for the exact posterior mean E[x0 | z_t], x0 ~ N(mu, cov)."""
    d = mu.numel()

    def backbone(x, c_noise, context, pooled):
        t = _t_from_c_noise(f, float(c_noise[0]))
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        a, b = float(f.a(tt)[0]), float(f.b(tt)[0])
        z = x.double() / f.c_in(tt)[0].double()
        flat = z.reshape(x.shape[0], d)
        gain = a * cov @ torch.linalg.inv(a * a * cov + b * b * torch.eye(d, dtype=torch.float64))
        x0 = mu + (flat - a * mu) @ gain.T
        eps = (flat - a * x0) / b
        return f.target(x0.reshape(x.shape), eps.reshape(x.shape), tt).to(x.dtype)

    return backbone


def exact_flow(f: Formulation, mu, cov, noise):
    """The probability-flow ODE's exact map from z = b(t_max) noise to t = 0 for Gaussian data."""
    t_max = torch.tensor([f.t_max], dtype=torch.float64)
    s = float(f.b(t_max)[0] / f.a(t_max)[0])  # sigma_max; inf for rf
    lam, vec = torch.linalg.eigh(cov)
    gain_noise = vec @ torch.diag(lam.sqrt() / torch.sqrt(lam / s**2 + 1)) @ vec.T  # sqrt(lam / (lam + s^2)) s
    gain_mu = vec @ torch.diag(lam.sqrt() / torch.sqrt(lam + s**2)) @ vec.T
    flat = noise.double().reshape(noise.shape[0], -1)
    return mu + flat @ gain_noise.T - mu @ gain_mu.T


def _gaussian():
    mu = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]], dtype=torch.float64)
    return mu, m @ m.T


def _no_text(n):
    return torch.zeros(n, 2, 4), torch.zeros(n, 4)


# ---- time grid ------------------------------------------------------------------------------------
def test_shift_time_formula_and_identity():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    torch.testing.assert_close(shift_time(t, 3.0), 3 * t / (1 + 2 * t))
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    torch.testing.assert_close(shift_time(shift_time(t, 3.0), 1 / 3.0), t)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x", True])
def test_shift_time_rejects_bad_alpha(bad):
    with pytest.raises(ValueError, match="shift"):
        shift_time(0.5, bad)


def test_rf_time_grid_uniform_then_shifted():
    torch.testing.assert_close(rf_time_grid(_RF(), 4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    u = torch.linspace(1, 0, 6, dtype=torch.float64)
    torch.testing.assert_close(rf_time_grid(_RF(), 5, shift=3.0), 3 * u / (1 + 2 * u))


def test_rf_time_grid_starts_at_the_formulations_largest_noise_level():
    f = _CosEps()
    s_max = math.tan(math.pi / 2 * f.t_max)
    for shift in (1.0, 3.0, 0.5):
        tau = rf_time_grid(f, 7, shift)
        assert tau.shape == (8,) and tau[-1] == 0.0
        assert tau[0].item() == pytest.approx(s_max / (1 + s_max), rel=1e-12)
        assert bool((tau[1:] < tau[:-1]).all())
    with pytest.raises(ValueError, match="steps"):
        rf_time_grid(f, 0)


def test_rf_time_grid_refuses_a_formulation_without_noise_at_t_max():
    class NoNoise(_RF):
        t_max = 0.0

    with pytest.raises(ValueError, match=r"rf: tau\(t_max=0.0\) = 0.0, expected in \(0, 1\]"):
        rf_time_grid(NoNoise(), 4)


def test_step_times_map_tau_to_same_log_snr():
    for f in FORMULATIONS:
        t = step_times(f, 6, shift=2.0)
        tau = rf_time_grid(f, 6, shift=2.0)[:6]
        torch.testing.assert_close(f.b(t) / (f.a(t) + f.b(t)), tau, rtol=1e-9, atol=1e-9)  # sigma / (1 + sigma)


# ---- common random numbers ------------------------------------------------------------------------
def test_initial_noise_is_index_stable():
    full = initial_noise(10, (1, 4, 4), seed=7)
    assert full.shape == (10, 1, 4, 4) and full.dtype == torch.float32
    torch.testing.assert_close(initial_noise(3, (1, 4, 4), seed=7, start=4), full[4:7], rtol=0, atol=0)
    torch.testing.assert_close(initial_noise(1, (1, 4, 4), seed=7, start=9)[0], full[9], rtol=0, atol=0)
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(initial_noise(1, (1, 4, 4), seed=8), full[:1])
    assert abs(float(initial_noise(200, (64,), seed=0).std()) - 1) < 0.02


def test_initial_noise_values_are_pinned():
    # common random numbers across versions: results records compare samples drawn from exactly this noise
    got = initial_noise(2, (3,), seed=0)
    expected = [[0.5458651781082153, -0.3587554693222046, -0.7178654670715332],
                [0.8435521125793457, 1.344171166419983, -0.17629097402095795]]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=0)
    torch.testing.assert_close(initial_noise(1, (3,), seed=7, start=5),
                               torch.tensor([[0.2583451271057129, -0.2432297021150589, -1.9720906019210815]]),
                               rtol=0, atol=0)


def test_initial_noise_is_the_same_numbers_in_every_dtype_and_seeds_do_not_overlap():
    x = initial_noise(4, (8,), seed=3)
    torch.testing.assert_close(initial_noise(4, (8,), seed=3, dtype=torch.float64), x.double(), rtol=0, atol=0)
    # (seed, k) is mixed, not added: seed 3's prompt 1 is not seed 4's prompt 0
    assert not torch.equal(x[1], initial_noise(1, (8,), seed=4)[0])
    for bad in ({"n": -1}, {"seed": -1}, {"start": -1}, {"n": True}):
        with pytest.raises(ValueError, match="initial_noise"):
            initial_noise(**{"n": 1, "shape": (2,), "seed": 0, **bad})


def test_other_streams_of_a_prompt_differ_from_its_initial_noise():
    # numpy's SeedSequence drops trailing zeros of its entropy: stream 0 would repeat the noise's seed, so it is refused
    from src.sampling.noise import _index_seed

    seeds = {_index_seed(3, k, stream) for k in (0, 1) for stream in (None, 1, 2)}
    assert len(seeds) == 6
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="stream must be an integer >= 1"):
            _index_seed(3, 1, bad)


# ---- the sampler ----------------------------------------------------------------------------------
def _nonlinear_backbone(x, t, context, pooled):
    return torch.tanh(x) * (1 + t.reshape(-1, 1, 1, 1)) + 0.1 * pooled.mean(1).reshape(-1, 1, 1, 1)


def test_rf_one_step_is_euler_on_dz_equals_v_dt():
    torch.manual_seed(0)
    noise, (ctx, pooled) = torch.randn(5, 2, 3, 3), (torch.randn(5, 2, 4), torch.randn(5, 4))
    v = lambda z, t: _nonlinear_backbone(z, torch.full((5,), t), ctx, pooled)  # noqa: E731
    torch.testing.assert_close(sample(_nonlinear_backbone, _RF(), noise, ctx, pooled, 1, 1.0), noise - v(noise, 1.0))
    z, grid = noise, [1.0, 2 / 3, 1 / 3, 0.0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        z = z + (t_next - t) * v(z, t)
    torch.testing.assert_close(sample(_nonlinear_backbone, _RF(), noise, ctx, pooled, 3, 1.0), z)


@pytest.mark.parametrize("f", FORMULATIONS, ids=IDS)
def test_last_step_returns_x0_hat(f):
    calls = []

    def spy(x, t, context, pooled):
        out = _nonlinear_backbone(x, t, context, pooled)
        calls.append((x.clone(), out))
        return out

    torch.manual_seed(1)
    noise, (ctx, pooled) = torch.randn(3, 1, 2, 2), _no_text(3)
    x0 = sample(spy, f, noise, ctx, pooled, 4, 1.0)
    assert len(calls) == 4
    t_last = step_times(f, 4)[-1:].float().expand(3)
    x_last, out_last = calls[-1]
    z_last = x_last / expand_like(f.c_in(t_last), x_last)
    torch.testing.assert_close(x0, f.to_x0_eps(out_last, z_last, t_last)[0])
    t_max = torch.tensor([f.t_max])
    torch.testing.assert_close(calls[0][0], f.c_in(t_max) * f.b(t_max) * noise)  # starts at z = b(t_max) noise


def test_cfg_is_one_batched_forward_with_zeroed_uncond():
    calls = []

    def spy(x, t, context, pooled):
        calls.append((x.shape[0], context.clone(), pooled.clone()))
        return _nonlinear_backbone(x, t, context, pooled)

    torch.manual_seed(2)
    noise, ctx, pooled = torch.randn(4, 1, 2, 2), torch.randn(4, 2, 4), torch.randn(4, 4)
    out = sample(spy, _RF(), noise, ctx, pooled, 1, 5.0)
    assert len(calls) == 1 and calls[0][0] == 8
    torch.testing.assert_close(calls[0][1], torch.cat([ctx, torch.zeros_like(ctx)]))
    torch.testing.assert_close(calls[0][2], torch.cat([pooled, torch.zeros_like(pooled)]))
    t1 = torch.ones(4)
    cond = _nonlinear_backbone(noise, t1, ctx, pooled)
    uncond = _nonlinear_backbone(noise, t1, torch.zeros_like(ctx), torch.zeros_like(pooled))
    torch.testing.assert_close(out, noise - (uncond + 5.0 * (cond - uncond)))
    calls.clear()
    sample(spy, _RF(), noise, ctx, pooled, 3, 1.0)
    assert [c[0] for c in calls] == [4, 4, 4]


@pytest.mark.parametrize("f", FORMULATIONS, ids=IDS)
def test_guidance_on_raw_output_equals_guidance_on_x0_and_eps(f):
    torch.manual_seed(3)
    z, cond, uncond = torch.randn(3, 3, 2, 2, 2)
    t, w = torch.tensor([0.2, 0.5, 0.9]).clamp(f.t_min, f.t_max), 4.0
    x0_g, eps_g = f.to_x0_eps(uncond + w * (cond - uncond), z, t)
    (x0_c, eps_c), (x0_u, eps_u) = f.to_x0_eps(cond, z, t), f.to_x0_eps(uncond, z, t)
    torch.testing.assert_close(x0_g, x0_u + w * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_g, eps_u + w * (eps_c - eps_u), rtol=1e-5, atol=1e-5)


def test_sample_rejects_bad_input():
    noise, (ctx, pooled) = torch.randn(2, 1, 2, 2), _no_text(2)
    with pytest.raises(ValueError, match="steps"):
        sample(_nonlinear_backbone, _RF(), noise, ctx, pooled, 0, 1.0)
    with pytest.raises(ValueError, match="batch"):
        sample(_nonlinear_backbone, _RF(), noise, ctx[:1], pooled, 2, 1.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(_nonlinear_backbone, _RF(), noise, ctx, pooled, 2, float("nan"))
    with pytest.raises(ValueError, match="batch sizes differ: noise 2, context 2, pooled 1"):
        sample(_nonlinear_backbone, _RF(), noise, ctx, pooled[:1], 2, 1.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(_nonlinear_backbone, _RF(), noise, ctx, pooled, 2, True)


@pytest.mark.parametrize("cfg_scale", [0.0, 0.5])
def test_guidance_below_one_is_applied_too(cfg_scale):
    # out = uncond + w (cond - uncond) for every w != 1; w = 0 is the unconditional model
    torch.manual_seed(4)
    noise, ctx, pooled = torch.randn(3, 1, 2, 2), torch.randn(3, 2, 4), torch.randn(3, 4)
    t1 = torch.ones(3)
    cond = _nonlinear_backbone(noise, t1, ctx, pooled)
    uncond = _nonlinear_backbone(noise, t1, torch.zeros_like(ctx), torch.zeros_like(pooled))
    out = sample(_nonlinear_backbone, _RF(), noise, ctx, pooled, 1, cfg_scale)
    torch.testing.assert_close(out, noise - (uncond + cfg_scale * (cond - uncond)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_backbone_gets_its_inputs_in_the_noise_dtype(dtype):
    seen = []

    def spy(x, t, context, pooled):
        seen.append((x.dtype, t.dtype))
        return _nonlinear_backbone(x, t, context, pooled)

    noise, (ctx, pooled) = torch.randn(2, 1, 2, 2, dtype=dtype), _no_text(2)
    sample(spy, _RF(), noise, ctx, pooled, 2, 3.0)
    assert seen == [(dtype, dtype)] * 2


def test_samples_keep_the_noise_dtype_whatever_the_backbone_returns():
    noise, (ctx, pooled) = torch.randn(2, 1, 2, 2), _no_text(2)
    net = lambda x, t, c, p: _nonlinear_backbone(x, t, c, p).double()  # noqa: E731
    for cfg_scale in (1.0, 3.0):
        assert sample(net, _RF(), noise, ctx, pooled, 3, cfg_scale).dtype == torch.float32
        assert sample(net, _RF(), noise, ctx, pooled, 3, cfg_scale, sampler="heun").dtype == torch.float32


# ---- convergence on Gaussian data -----------------------------------------------------------------
@pytest.mark.parametrize("f", FORMULATIONS, ids=IDS)
def test_sampler_converges_to_the_exact_flow_on_gaussian_data(f):
    mu, cov = _gaussian()
    noise = initial_noise(2000, (3, 1, 1), seed=0, dtype=torch.float64)
    ctx, pooled = _no_text(2000)
    exact = exact_flow(f, mu, cov, noise)
    errors = []
    for steps in (5, 25, 200):
        x0 = sample(gaussian_denoiser(f, mu, cov), f, noise, ctx, pooled, steps, 1.0).reshape(2000, 3)
        errors.append(float((x0 - exact).square().mean().sqrt()))
        mean_err = float((x0.mean(0) - mu).abs().max())
        cov_err = float((torch.cov(x0.T) - cov).abs().max())
    assert errors[0] > errors[1] > 4 * errors[2], errors  # first order: 8x more steps, ~8x smaller error
    assert errors[2] < 0.01, errors
    # the data's moments, up to Monte Carlo error (2000 samples) and the start bias of t_max < 1
    start_bias = float((exact_flow(f, mu, cov, torch.zeros(1, 3)) - mu).abs().max())
    assert mean_err < 0.1 + start_bias and cov_err < 0.15, (mean_err, cov_err, start_bias)
