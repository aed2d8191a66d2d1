"""The sampler on the real recipes, one per family (docs/formulations.md#formulation-families, docs/sampling.md#the-update): exact-flow convergence on Gaussian data."""

from __future__ import annotations

import pytest
import torch

from src.formulations import RECIPES, build, get_recipe
from src.sampling import conversion_coefficients, initial_noise, rf_time_grid, sample, step_times
from tests.test_sampling import _gaussian, _no_text, exact_flow, gaussian_denoiser

ONE_PER_FAMILY = [
    "rf", "rf/lognorm(0.00, 1.00)", "rf/mode(1.29)", "rf/cosmap", "eps/linear", "v/linear", "eps/cos", "v/cos",
    "edm(-1.20, 1.20)", "edm/rf", "edm/cos",
]


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_every_family_converges_to_the_exact_flow_on_gaussian_data(name):
    f = get_recipe(name)
    mu, cov = _gaussian()
    n = 1000
    noise = initial_noise(n, (3, 1, 1), seed=0, dtype=torch.float64)
    ctx, pooled = _no_text(n)
    exact = exact_flow(f, mu, cov, noise)
    errors = []
    for steps in (5, 25, 200):
        x0 = sample(gaussian_denoiser(f, mu, cov), f, noise, ctx, pooled, steps, 1.0).reshape(n, 3)
        errors.append(float((x0 - exact).square().mean().sqrt()))
    assert errors[0] > errors[1] > 4 * errors[2], errors  # first order in the step size
    assert errors[2] < 0.01, errors
    # The data's moments, up to Monte Carlo error (1000 samples) and the bias of starting at b(t_max) noise.
    start_bias = float((exact_flow(f, mu, cov, torch.zeros(1, 3)) - mu).abs().max())
    assert start_bias < 0.1, start_bias
    assert float((x0.mean(0) - mu).abs().max()) < 0.12 + start_bias
    assert float((torch.cov(x0.T) - cov).abs().max()) < 0.15


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_step_times_have_the_grids_log_snr(name):
    f = get_recipe(name)
    t = step_times(f, 10, shift=3.0)
    assert t[0] == f.t_max and bool((t[1:] < t[:-1]).all()) and bool((t >= f.t_min).all())
    tau = rf_time_grid(f, 10, shift=3.0)[:10]
    torch.testing.assert_close(f.b(t) / (f.a(t) + f.b(t)), tau, rtol=1e-6, atol=1e-7)


def test_rf_sampler_matches_build():
    noise, (ctx, pooled) = torch.randn(2, 1, 2, 2), _no_text(2)
    net = lambda x, t, c, p: x * t.reshape(-1, 1, 1, 1)  # noqa: E731
    a = sample(net, get_recipe("rf"), noise, ctx, pooled, 3, 1.0)
    torch.testing.assert_close(a, sample(net, build("rf"), noise, ctx, pooled, 3, 1.0))


def test_every_recipes_conversion_is_linear_with_the_read_off_coefficients():
    gen = torch.Generator().manual_seed(0)
    for name in RECIPES:
        f = get_recipe(name)
        t = step_times(f, 7, shift=2.0)
        p, q, r, s = conversion_coefficients(f, t)  # raises where to_x0_eps is not linear
        z, out = torch.randn(2, 7, 4, generator=gen, dtype=torch.float64)
        x0, eps = f.to_x0_eps(out, z, t)
        torch.testing.assert_close(x0, p[:, None] * z + q[:, None] * out, rtol=1e-9, atol=1e-9, msg=name)
        torch.testing.assert_close(eps, r[:, None] * z + s[:, None] * out, rtol=1e-9, atol=1e-9, msg=name)


def test_a_nonlinear_conversion_is_refused():
    class Clamped(type(get_recipe("rf"))):
        def to_x0_eps(self, output, z_t, t):
            x0, eps = super().to_x0_eps(output, z_t, t)
            return x0.clamp(-1, 1), eps

    f = Clamped.__new__(Clamped)
    f.__dict__.update(get_recipe("rf").__dict__)
    noise, (ctx, pooled) = torch.randn(2, 1, 2, 2), _no_text(2)
    with pytest.raises(ValueError, match="not linear"):
        sample(lambda x, *_: x, f, noise, ctx, pooled, 3, 1.0)


def test_a_slightly_nonlinear_conversion_is_refused():
    # the linearity probe is tight: a quadratic term of relative size 1e-4 already fails it
    class Curved(type(get_recipe("v/cos"))):
        def to_x0_eps(self, output, z_t, t):
            x0, eps = super().to_x0_eps(output, z_t, t)
            return x0 * (1 + 1e-4 * x0), eps

    f = Curved("v", "cos")
    t = step_times(f, 5)
    with pytest.raises(ValueError, match="not linear"):
        conversion_coefficients(f, t)
