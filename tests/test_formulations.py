"""Formulations (docs/formulations.md): the 61 recipes, the loss identity, conversions, schedules, EDM, errors."""

import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

from src.formulations import (
    FAMILIES,
    RECIPES,
    build,
    family_params,
    from_config,
    get_recipe,
    validation_times,
)
from src.formulations.base import Formulation
from src.formulations.schedules import SIGMA_MAX, SIGMA_MIN


ONE_PER_FAMILY = {get_recipe(n).family: n for n in RECIPES}


def two(x):
    s = f"{x:.2f}"
    return "0.00" if s == "-0.00" else s


def paper_names():
    """The 61 names (docs/formulations.md#the-61-recipes), written out independently of the registry."""
    modes = [two(s) for s in np.round(np.linspace(-1, 1.75, 7), 2)] + ["1.00"]
    names = ["eps/linear", "v/linear", "eps/cos", "v/cos"]
    names += [f"rf/mode({s})" for s in modes] + ["rf"]
    names += [f"rf/lognorm({two(m)}, {two(s)})" for m in (-1, -0.5, 0, 0.5, 1) for s in (0.2, 0.6, 1.0, 1.4, 1.8, 2.2)]
    names += ["rf/cosmap"]
    names += [f"edm({two(pm)}, {two(ps)})" for pm in (-1.2, -0.6, 0, 0.6, 1.2) for ps in (0.6, 1.2, 1.8)]
    return names + ["edm/rf", "edm/cos"]


def random_case(f, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = f.t_min + (f.t_max - f.t_min) * torch.rand(n, generator=g, dtype=torch.float64)
    x0, eps, out = (torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    return t, x0, eps, out


# ---- recipes and names ------------------------------------------------------------------------------


def test_exactly_the_61_paper_recipes():
    assert RECIPES == paper_names()
    assert len(RECIPES) == 61 == len(set(RECIPES))
    assert "rf/mode(0.38)" in RECIPES and "rf/lognorm(0.00, 1.00)" in RECIPES and "edm(0.00, 0.60)" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_name_recipe_name_round_trip(name):
    f = get_recipe(name)
    assert f.name == name
    assert from_config({"recipe": name}).name == name
    rebuilt = from_config({"family": f.family, **f.params(), "_name": "ignored"})
    assert rebuilt.name == name and rebuilt.params() == f.params() and type(rebuilt) is type(f)


def test_slugs_are_unique_and_filesystem_safe():
    slugs = [get_recipe(n).slug for n in RECIPES]
    assert len(set(slugs)) == 61
    assert all(re.fullmatch(r"[a-z0-9_.\-]+", s) for s in slugs)
    assert get_recipe("rf/lognorm(0.50, 0.60)").slug == "rf_lognorm_0.50_0.60"
    assert get_recipe("edm(-1.20, 1.20)").slug == "edm_-1.20_1.20"
    assert get_recipe("eps/linear").slug == "eps_linear"
    assert get_recipe("rf").slug == "rf"


def test_names_print_two_decimals_and_no_negative_zero():
    assert build("rf_lognorm", m=-0.0, s=1.0).name == "rf/lognorm(0.00, 1.00)"
    assert build("edm", p_mean=-0.001, p_std=1.2).name == "edm(0.00, 1.20)"
    assert build("rf_mode", s=0.0).name == "rf/mode(0.00)"
    assert build("rf_lognorm", m=0.5, s=0.6).params() == {"m": 0.5, "s": 0.6}


def test_every_family_is_registered_with_its_parameters():
    assert set(FAMILIES) == {
        "rf", "rf_lognorm", "rf_mode", "rf_cosmap", "eps_linear", "v_linear", "eps_cos", "v_cos",
        "edm", "edm_rf", "edm_cos",
    }  # fmt: skip
    assert family_params("rf_lognorm") == ["m", "s"]
    assert family_params("edm") == ["p_mean", "p_std"]
    assert family_params("rf_mode") == ["s"]
    for family in FAMILIES:
        assert build(family, **dict.fromkeys(family_params(family), 1.0)).family == family


# ---- the unified objective -----------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_loss_equals_w_eps_times_eps_error(name):
    f = get_recipe(name)
    t, x0, eps, out = random_case(f)
    z = f.add_noise(x0, eps, t)
    _, eps_hat = f.to_x0_eps(out, z, t)
    expected = f.w_eps(t) * ((eps_hat - eps) ** 2).flatten(1).mean(1)
    loss = f.loss(out, x0, eps, t)
    assert loss.shape == (64,) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", list(ONE_PER_FAMILY.values()))
def test_true_target_recovers_x0_and_eps(name):
    f = get_recipe(name)
    t, x0, eps, _ = random_case(f, seed=1)
    z = f.add_noise(x0, eps, t)
    target = f.target(x0, eps, t)
    x0_hat, eps_hat = f.to_x0_eps(target, z, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(f.loss(target, x0, eps, t), torch.zeros(64, dtype=torch.float64), rtol=0, atol=1e-18)


def test_w_eps_of_the_matched_edm_variants():
    # docs/formulations.md#edm-matched-to-rf-and-cosine: edm/rf weights like rf, edm/cos like v/cos, eps-prediction has weight 1.
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(get_recipe("edm/rf").w_eps(t), get_recipe("rf").w_eps(t))
    torch.testing.assert_close(get_recipe("edm/rf").w_eps(t), 1 / (1 - t) ** 2)
    torch.testing.assert_close(get_recipe("edm/cos").w_eps(t), get_recipe("v/cos").w_eps(t))
    torch.testing.assert_close(get_recipe("v/cos").w_eps(t), 1 / torch.cos(math.pi * t / 2) ** 2)
    torch.testing.assert_close(get_recipe("eps/linear").w_eps(t), torch.ones_like(t))
    sigma = t / (1 - t)
    torch.testing.assert_close(get_recipe("edm(-1.20, 1.20)").w_eps(t), 1 + sigma**2 / 0.25)


@pytest.mark.parametrize(
    "name, t, w",
    [
        ("rf", 0.5, 4.0),  # 1 / (1 - t)^2
        ("rf/lognorm(0.00, 1.00)", 0.75, 16.0),
        ("eps/linear", 0.5, 1.0),
        ("eps/cos", 0.5, 1.0),
        ("v/cos", 0.5, 2.0),  # 1 / cos^2(pi / 4)
        ("v/cos", 2 / 3, 4.0),  # 1 / cos^2(pi / 3)
        ("v/linear", 1.0, 214.58773826213877),  # 1 / abar_999
        ("v/linear", 499 / 999, 3.60140187577604),  # 1 / abar_499
        ("edm(0.00, 0.60)", 0.5, 5.0),  # sigma = 1: lambda sigma^2 = (1 + 0.25) / 0.25
        ("edm(-1.20, 1.20)", 2 / 3, 17.0),  # sigma = 2: (4 + 0.25) / 0.25
        ("edm/rf", 0.5, 4.0),  # (1 + sigma)^2
        ("edm/cos", 0.5, 2.0),  # 1 + tan^2(pi / 4)
    ],
)
def test_w_eps_pinned_values(name, t, w):
    """The eps-space weight at points where it is a hand-computed number (docs/formulations.md#formulation-families)."""
    got = get_recipe(name).w_eps(torch.tensor([t], dtype=torch.float64)).item()
    assert got == pytest.approx(w, rel=1e-12)


def test_forward_processes_pinned_values():
    """z_t = a_t x0 + b_t eps with the a_t, b_t of docs/formulations.md#forward-process at hand-computed points,
    one per family."""
    x0, eps = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[0.0]], dtype=torch.float64)
    cases = [
        ("rf", 0.25, 0.75, 0.25),
        ("eps/cos", 1 / 3, math.sqrt(3) / 2, 0.5),  # cos(pi / 6), sin(pi / 6)
        ("v/cos", 0.5, math.sqrt(0.5), math.sqrt(0.5)),
        ("eps/linear", 0.0, math.sqrt(0.99915), math.sqrt(0.00085)),  # abar_0 = 1 - beta_0
        ("v/linear", 1.0, math.sqrt(0.004660098513077236), math.sqrt(1 - 0.004660098513077236)),
        ("edm(0.00, 1.20)", 2 / 3, 1.0, 2.0),  # a = 1, b = sigma = t / (1 - t)
        ("edm/rf", 0.5, 1.0, 1.0),
        ("edm/cos", 2 / 3, 1.0, math.sqrt(3)),  # sigma = tan(pi / 3)
    ]
    for name, t, a, b in cases:
        f, tt = get_recipe(name), torch.tensor([t], dtype=torch.float64)
        assert (f.a(tt).item(), f.b(tt).item()) == (pytest.approx(a, rel=1e-12), pytest.approx(b, rel=1e-12)), name
        assert f.add_noise(x0, eps, tt).item() == pytest.approx(a, rel=1e-12), name
        assert f.add_noise(eps, x0, tt).item() == pytest.approx(b, rel=1e-12), name
    # v-prediction's target v = a eps - b x0 and rf's v = eps - x0
    t = torch.tensor([1 / 3], dtype=torch.float64)
    x0, eps = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[3.0]], dtype=torch.float64)
    assert get_recipe("v/cos").target(x0, eps, t).item() == pytest.approx(3 * math.sqrt(3) / 2 - 1, rel=1e-12)
    assert get_recipe("rf").target(x0, eps, t).item() == 1.0


# ---- process ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ONE_PER_FAMILY.values()))
def test_sigma_log_snr_and_rf_time_are_consistent(name):
    f = get_recipe(name)
    t = torch.linspace(f.t_min, f.t_max, 501, dtype=torch.float64)[1:-1]
    a, b = f.a(t), f.b(t)
    torch.testing.assert_close(f.sigma(t), b / a, rtol=1e-12, atol=0)
    torch.testing.assert_close(f.log_snr(t), torch.log(a**2 / b**2), rtol=1e-10, atol=1e-12)
    tau = f.rf_time(t)
    torch.testing.assert_close(tau, f.sigma(t) / (1 + f.sigma(t)), rtol=1e-12, atol=0)
    torch.testing.assert_close(f.t_from_rf_time(tau), t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(ONE_PER_FAMILY.values()))
def test_base_class_defaults_agree_with_each_family(name):
    # a family of its own (docs/formulations.md#adding-a-family) that defines only a and b gets these defaults
    f = get_recipe(name)
    t = torch.linspace(f.t_min, f.t_max, 101, dtype=torch.float64)[1:-1]
    torch.testing.assert_close(Formulation.sigma(f, t), f.sigma(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(Formulation.rf_time(f, t), f.rf_time(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(Formulation.t_from_rf_time(f, f.rf_time(t)), t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(ONE_PER_FAMILY.values()))
def test_t_from_sigma_inverts_sigma(name):
    f = get_recipe(name)
    t = torch.linspace(f.t_min, f.t_max, 2001, dtype=torch.float64)
    if f.t_max == 1.0 and f.family.startswith("rf"):
        t = t[:-1]  # sigma(1) = inf; tested below
    torch.testing.assert_close(f.t_from_sigma(f.sigma(t)), t, rtol=0, atol=1e-10)
    sigma = torch.logspace(-1, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(f.sigma(f.t_from_sigma(sigma)), sigma, rtol=1e-10, atol=0)


def test_rf_ends():
    f = get_recipe("rf")
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert f.t_from_sigma(torch.tensor([0.0, math.inf])).tolist() == [0.0, 1.0]
    assert f.rf_time(ends).tolist() == [0.0, 1.0] and f.b(ends).tolist() == [0.0, 1.0]
    # nothing rf uses is singular at the ends: the sampler can start from z = eps at t = 1
    z = torch.randn(2, 3, dtype=torch.float64)
    x0_hat, eps_hat = f.to_x0_eps(torch.ones(2, 3, dtype=torch.float64), z, ends)
    assert torch.isfinite(x0_hat).all() and torch.equal(eps_hat[1], z[1])


def test_linear_schedule_t_from_sigma_saturates_outside_its_range():
    f = get_recipe("eps/linear")
    assert f.t_from_sigma(torch.tensor([0.0, 1e-6, 1e6, math.inf], dtype=torch.float64)).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("name", RECIPES)
def test_coefficients_keep_float32(name):
    f = get_recipe(name)
    t = f.sample_t(16)
    for fn in (f.a, f.b, f.sigma, f.log_snr, f.rf_time, f.c_in, f.c_noise, f.w_eps):
        assert fn(t).dtype == torch.float32 and torch.isfinite(fn(t)).all(), fn.__name__
    assert f.t_from_sigma(f.sigma(t)).dtype == torch.float32


# ---- training-time distributions --------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_sample_t_range_dtype_and_determinism(name):
    f = get_recipe(name)
    a = f.sample_t(20_000, torch.Generator().manual_seed(3))
    b = f.sample_t(20_000, torch.Generator().manual_seed(3))
    c = f.sample_t(20_000, torch.Generator().manual_seed(4))
    assert a.shape == (20_000,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= f.t_min).all() and (a <= f.t_max).all()
    if f.family.startswith("rf"):
        assert (a > 0).all() and (a < 1).all()
    assert f.sample_t(5).shape == (5,)


def test_rf_training_times_are_clamped_to_the_open_interval():
    # docs/formulations.md#rectified-flow: a density's draws of exactly 0 or 1 become 2^-24 and 1 - 2^-24
    from src.formulations.densities import Uniform
    from src.formulations.rf import RectifiedFlow

    class Ends(Uniform):
        def sample(self, n, generator=None):
            return torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)

    t = RectifiedFlow(Ends()).sample_t(3)
    assert t.dtype == torch.float32 and t.tolist() == [2.0**-24, 1 - 2.0**-24, 0.5]


def test_linear_trains_on_the_discrete_levels():
    t = get_recipe("v/linear").sample_t(100_000, torch.Generator().manual_seed(0)).double()
    levels = t * 999
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    counts = np.bincount(levels.round().long().numpy(), minlength=1000)
    assert len(counts) == 1000 and stats.chisquare(counts).pvalue > 1e-3
    assert counts.min() > 0  # every level is trained on, the first (t = 0) and the last (t = 1) included


@pytest.mark.parametrize("name", ["eps/cos", "edm/rf", "edm/cos"])
def test_uniform_families_sample_uniformly_over_the_clipped_range(name):
    f = get_recipe(name)
    t = f.sample_t(100_000, torch.Generator().manual_seed(0)).double().numpy()
    assert stats.kstest(t, stats.uniform(f.t_min, f.t_max - f.t_min).cdf).pvalue > 1e-3


@pytest.mark.parametrize("name", ["eps/cos", "v/cos", "edm/rf", "edm/cos", "edm(1.20, 1.80)", "edm(-1.20, 1.80)"])
def test_continuous_t_densities_put_no_mass_on_the_ends(name):
    # U(t_min, t_max) and edm's truncated normal are continuous: no atom at t_max or t_min (e.g. from clamping a
    # draw over a wider range: edm(1.20, 1.80) untruncated has 0.08% of its mass above SIGMA_MAX).
    f = get_recipe(name)
    t = f.sample_t(1_000_000, torch.Generator().manual_seed(0))
    assert (t == f.t_max).sum() <= 5 and (t == f.t_min).sum() <= 5


@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.2), (0.0, 0.6), (1.2, 1.8)])
def test_edm_samples_log_normal_sigma(p_mean, p_std):
    f = build("edm", p_mean=p_mean, p_std=p_std)
    t = f.sample_t(100_000, torch.Generator().manual_seed(0)).double()
    ln_sigma = torch.log(f.sigma(t)).numpy()
    lo, hi = (np.log(SIGMA_MIN) - p_mean) / p_std, (np.log(SIGMA_MAX) - p_mean) / p_std
    # float32 times: ln sigma carries ~1e-7 / (t (1 - t)) rounding, far below the KS resolution here.
    assert stats.kstest(ln_sigma, stats.truncnorm(lo, hi, p_mean, p_std).cdf).pvalue > 1e-3
    assert stats.kstest(ln_sigma, stats.norm(p_mean + 0.05, p_std).cdf).pvalue < 1e-6


def test_edm_and_rf_lognorm_visit_the_same_log_snrs():
    edm, rf = get_recipe("edm(0.00, 0.60)"), build("rf_lognorm", m=0.0, s=0.6)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    torch.testing.assert_close(edm.log_snr(t), rf.log_snr(t))
    a = edm.sample_t(50_000, torch.Generator().manual_seed(0)).numpy()
    b = rf.sample_t(50_000, torch.Generator().manual_seed(1)).numpy()
    assert stats.ks_2samp(a, b).pvalue > 1e-3


# ---- schedules ------------------------------------------------------------------------------------


def test_linear_abar_against_independent_float64():
    i = np.arange(1000)
    betas = (np.sqrt(0.00085) + i / 999 * (np.sqrt(0.012) - np.sqrt(0.00085))) ** 2
    abar = np.cumprod(1 - betas)
    f = get_recipe("eps/linear")
    t = torch.from_numpy(i / 999)
    np.testing.assert_allclose((f.a(t) ** 2).numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose((f.b(t) ** 2).numpy(), 1 - abar, rtol=1e-12)
    # between levels: log abar is linear in t
    mid = torch.from_numpy((i[:-1] + 0.25) / 999)
    expected = np.exp(0.75 * np.log(abar[:-1]) + 0.25 * np.log(abar[1:]))
    np.testing.assert_allclose((f.a(mid) ** 2).numpy(), expected, rtol=1e-12)
    assert abar[0] == pytest.approx(0.99915) and abar[-1] == pytest.approx(0.0047, abs=1e-4)


def test_linear_schedule_saturates_outside_the_unit_interval():
    f = get_recipe("eps/linear")
    t = torch.tensor([-0.5, -1e-3, 0.0, 1.0, 1 + 1e-3, 1.5], dtype=torch.float64)
    a = f.a(t)
    assert a[0] == a[1] == a[2] and a[3] == a[4] == a[5]


def test_linear_abar_matches_diffusers_scaled_linear():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.arange(1000, dtype=torch.float64) / 999
    ours = get_recipe("v/linear").a(t) ** 2
    np.testing.assert_allclose(ours.numpy(), sched.alphas_cumprod.double().numpy(), rtol=2e-5)


def test_edm_preconditioning_against_float64_values():
    sd = 0.5
    sigma = np.array([0.002, 0.1, 0.5, 1.0, 7.0, 80.0])
    for name, t in [("edm(-1.20, 1.20)", sigma / (1 + sigma)), ("edm/cos", 2 / np.pi * np.arctan(sigma))]:
        f = get_recipe(name)
        tt = torch.from_numpy(t)
        np.testing.assert_allclose(f.sigma(tt).numpy(), sigma, rtol=1e-12)
        np.testing.assert_allclose(f.c_skip(tt).numpy(), sd**2 / (sigma**2 + sd**2), rtol=1e-12)
        np.testing.assert_allclose(f.c_out(tt).numpy(), sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-12)
        np.testing.assert_allclose(f.c_in(tt).numpy(), 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-12)
        np.testing.assert_allclose(f.c_noise(tt).numpy(), np.log(sigma) / 4, rtol=1e-12, atol=1e-15)
    # at sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt 2, c_in = 1 / (sd sqrt 2), c_noise = ln(0.5) / 4
    f, t = get_recipe("edm/rf"), torch.tensor([1 / 3], dtype=torch.float64)
    assert f.c_skip(t).item() == pytest.approx(0.5)
    assert f.c_out(t).item() == pytest.approx(0.3535533905932738)
    assert f.c_in(t).item() == pytest.approx(1.4142135623730951)
    assert f.c_noise(t).item() == pytest.approx(-0.17328679513998632)


@pytest.mark.parametrize(
    "name, weight",
    [
        ("edm(0.60, 1.20)", lambda s: (s**2 + 0.25) / (s * 0.5) ** 2),
        ("edm/rf", lambda s: (1 + s) ** 2 / s**2),
        ("edm/cos", lambda s: (1 + s**2) / s**2),
    ],
)
def test_edm_loss_is_weighted_denoiser_error(name, weight):
    f = get_recipe(name)
    t, x0, eps, out = random_case(f, seed=2)
    sigma = f.sigma(t)
    z = x0 + sigma[:, None, None, None] * eps
    d = f.c_skip(t)[:, None, None, None] * z + f.c_out(t)[:, None, None, None] * out
    x0_hat, eps_hat = f.to_x0_eps(out, z, t)
    torch.testing.assert_close(x0_hat, d)
    torch.testing.assert_close(eps_hat, (z - d) / sigma[:, None, None, None])
    expected = weight(sigma) * ((d - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(f.loss(out, x0, eps, t), expected, rtol=1e-10, atol=0)


def test_c_noise_decisions():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for name in ("rf", "rf/cosmap", "eps/linear", "v/cos"):
        assert torch.equal(get_recipe(name).c_noise(t), t)
    torch.testing.assert_close(get_recipe("edm/rf").c_noise(t), torch.log(t / (1 - t)) / 4)
    for name in ("rf", "eps/linear", "v/cos"):
        assert torch.equal(get_recipe(name).c_in(t), torch.ones_like(t))


def test_clip_margins():
    for name in ("rf", "rf/lognorm(0.00, 1.00)", "eps/linear", "v/linear"):
        f = get_recipe(name)
        assert (f.t_min, f.t_max) == (0.0, 1.0)
    for name in ("eps/cos", "v/cos", "edm(0.00, 1.20)", "edm/rf", "edm/cos"):
        f = get_recipe(name)
        sigma = f.sigma(torch.tensor([f.t_min, f.t_max], dtype=torch.float64))
        assert sigma[0].item() == pytest.approx(SIGMA_MIN, rel=1e-4) and sigma[1].item() == pytest.approx(SIGMA_MAX, rel=1e-4)
        assert float(np.float32(f.t_min)) == f.t_min and float(np.float32(f.t_max)) == f.t_max
        # rounded inward: sigma stays inside [SIGMA_MIN, SIGMA_MAX], and the next float32 outward would not
        assert sigma[0].item() >= SIGMA_MIN and sigma[1].item() <= SIGMA_MAX, name
        out = torch.tensor([np.nextafter(np.float32(f.t_min), np.float32(0)),
                            np.nextafter(np.float32(f.t_max), np.float32(1))], dtype=torch.float64)
        outside = f.sigma(out)
        assert outside[0].item() < SIGMA_MIN and outside[1].item() > SIGMA_MAX, name


def test_validation_times():
    assert validation_times(get_recipe("rf")).tolist() == pytest.approx([i / 7 for i in range(8)])
    f = get_recipe("edm/cos")
    t = validation_times(f)
    assert t.dtype == torch.float32 and t.shape == (8,)
    assert t[0].item() == f.t_min and t[-1].item() == f.t_max
    assert t[1:-1].tolist() == pytest.approx([i / 7 for i in range(1, 7)])
    assert validation_times(get_recipe("rf"), levels=4).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    with pytest.raises(ValueError, match=r"validation_times: levels=1 is not allowed; levels must be >= 2"):
        validation_times(f, levels=1)


# ---- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build("rf_mode", s=2.0), r"rf_mode: s=2\.0 is outside the allowed range \[-1, 2/\(pi-2\)"),
        (lambda: build("rf_mode", s=-1.5), r"rf_mode: s=-1\.5 is outside the allowed range"),
        (lambda: build("rf_lognorm", m=0.0, s=0.0), r"rf_lognorm: s=0\.0 is not allowed; s must be > 0"),
        (lambda: build("edm", p_mean=0.0, p_std=0.0), r"edm: p_std=0\.0 is not allowed; p_std must be > 0"),
        (lambda: build("edm", p_mean=0.0, p_std=-1), r"edm: p_std=-1 is not allowed; p_std must be > 0"),
        (lambda: build("edm", p_mean=math.inf, p_std=1.0), r"edm: p_mean=inf must be a finite real number"),
        (lambda: build("flow"), r"unknown formulation family 'flow'; valid families: rf, rf_lognorm, .*edm_cos"),
        (lambda: build("rf_lognorm", m=0.5), r"family 'rf_lognorm' takes parameters \(m, s\); got \(m\)"),
        (lambda: build("rf", s=1.0), r"family 'rf' takes parameters \(\); got \(s\)"),
        (lambda: get_recipe("rf/lognorm(0.5, 0.6)"), r"unknown recipe .*did you mean 'rf/lognorm\(0.50, 0.60\)'.*valid recipes: eps/linear, v/linear"),
        (lambda: get_recipe("sd3"), r"unknown recipe 'sd3'; valid recipes: eps/linear, .*edm/cos"),
        (lambda: from_config({"recipe": "rf/mode(9.00)"}), r"unknown recipe 'rf/mode\(9.00\)'"),
        (lambda: from_config({"recipe": "???"}), r"^recipe is not set: loss=recipe .*loss.recipe=.*edm/cos$"),
        (lambda: from_config({"m": 0.5}), r"loss config needs 'family' \(one of rf, .*\) or 'recipe'; got \['m'\]"),
        (lambda: from_config({"recipe": "rf", "family": "rf"}), r"'recipe' cannot be combined with \['family'\]"),
        (lambda: from_config({"family": "edm", "p_mean": 0.0, "p_sd": 1.0}), r"family 'edm' takes parameters \(p_mean, p_std\)"),
    ],
)  # fmt: skip
def test_bad_configuration_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name", RECIPES)
def test_training_shift_lowers_every_log_snr_by_two_log_alpha(name):
    """shift_t: the resolution-dependent shift on RF-equivalent time, for every family alike: log-SNR - 2 log alpha
    (where the result stays inside [t_min, t_max]); the identity at alpha = 1."""
    f = get_recipe(name)
    t = f.sample_t(4096, torch.Generator().manual_seed(0)).double()
    assert torch.equal(f.shift_t(t, 1.0), t)
    shifted = f.shift_t(t, 3.0)
    assert shifted.min() >= f.t_min and shifted.max() <= f.t_max
    inside = (shifted > f.t_min + 1e-6) & (shifted < f.t_max - 1e-6) & (t > f.t_min + 1e-6) & (t < f.t_max - 1e-6)
    assert inside.sum() > 100
    drop = f.log_snr(t[inside]) - f.log_snr(shifted[inside])
    assert torch.allclose(drop, torch.full_like(drop, 2 * math.log(3.0)), atol=1e-6), name
