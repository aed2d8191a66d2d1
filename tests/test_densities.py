"""Timestep densities (docs/formulations.md#timestep-densities-for-rf): normalisation, sampler/density agreement, shapes, bad parameters."""

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from src.formulations import RECIPES, get_recipe
from src.formulations.densities import MODE_S_MAX, CosMap, LogitNormal, Mode, Uniform


RF_DENSITIES = {name: get_recipe(name).timestep_density for name in RECIPES if name.startswith("rf")}


def integrate(density, n=50_000):
    """Cumulative integral of a density on [0, 1]: edges and CDF at the edges.

    Midpoint rule in v on each half of [0, 1] with t = a + (1 - cos(pi v)) / 4, which clusters points at 0,
    1/2 and 1, where mode(s) has its (integrable) singularities or sharp peaks.
    """
    v_mid = (np.arange(n) + 0.5) / n
    half_mid = 0.25 * (1 - np.cos(np.pi * v_mid))
    half_w = 0.25 * np.pi * np.sin(np.pi * v_mid) / n
    half_edges = 0.25 * (1 - np.cos(np.pi * np.arange(n + 1) / n))
    mids = np.concatenate([half_mid, 0.5 + half_mid])
    weights = np.concatenate([half_w, half_w])
    edges = np.concatenate([half_edges, 0.5 + half_edges[1:]])
    mass = density(torch.from_numpy(mids)).numpy() * weights
    return edges, np.concatenate([[0.0], np.cumsum(mass)])


def ks_pvalue(samples: torch.Tensor, density) -> float:
    edges, cdf = integrate(density)
    return stats.kstest(samples.numpy(), lambda x: np.interp(x, edges, cdf)).pvalue


@pytest.mark.parametrize("name", list(RF_DENSITIES))
def test_density_integrates_to_one(name):
    _, cdf = integrate(RF_DENSITIES[name].density)
    assert cdf[-1] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", list(RF_DENSITIES))
def test_sampler_matches_density(name):
    d = RF_DENSITIES[name]
    samples = d.sample(100_000, torch.Generator().manual_seed(1234))
    assert samples.dtype == torch.float64 and samples.shape == (100_000,)
    assert ks_pvalue(samples, d.density) > 1e-3


@pytest.mark.parametrize(
    "sampled, claimed",
    [(LogitNormal(0.0, 1.0), LogitNormal(0.0, 1.05)), (Mode(1.29), Mode(1.2)), (CosMap(), Uniform())],
)
def test_ks_check_detects_a_wrong_density(sampled, claimed):
    samples = sampled.sample(100_000, torch.Generator().manual_seed(1234))
    assert ks_pvalue(samples, claimed.density) < 1e-6


def test_mode_zero_is_uniform():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    torch.testing.assert_close(Mode(0.0).density(t), torch.ones_like(t))
    u = Uniform().sample(1000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(Mode(0.0).sample(1000, torch.Generator().manual_seed(0)), 1 - u)


@pytest.mark.parametrize("s", [-1.0, -0.54, 0.38, 1.29, 1.75])
def test_mode_is_symmetric_about_one_half(s):
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    torch.testing.assert_close(Mode(s).density(t), Mode(s).density(1 - t), rtol=1e-9, atol=0)
    assert Mode(s).sample(100_000, torch.Generator().manual_seed(0)).mean().item() == pytest.approx(0.5, abs=0.005)


def test_mode_minus_one_is_the_arcsine_density():
    # s = -1: t = cos^2(pi u / 2), so pi(t) = 1 / (pi sqrt(t (1 - t))).
    t = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    torch.testing.assert_close(Mode(-1.0).density(t), 1 / (math.pi * torch.sqrt(t * (1 - t))), rtol=1e-9, atol=0)


def test_mode_mass_moves_to_the_middle_as_s_grows():
    t = torch.tensor([0.5], dtype=torch.float64)
    peaks = [Mode(s).density(t).item() for s in (-1.0, -0.54, 0.0, 0.38, 0.83, 1.29, 1.75)]
    assert peaks == sorted(peaks) and peaks[-1] > 100


@pytest.mark.parametrize("m", [0.5, 1.0])
def test_positive_lognorm_location_moves_mass_toward_noise(m):
    gen = torch.Generator().manual_seed(0)
    centred = LogitNormal(0.0, 1.0).sample(100_000, gen).mean().item()
    shifted = LogitNormal(m, 1.0).sample(100_000, gen).mean().item()
    assert centred == pytest.approx(0.5, abs=0.005) and shifted > centred + 0.05
    edges, cdf = integrate(LogitNormal(m, 1.0).density)
    # P(t < 1/2) = Phi(-m / s) < 1/2: more mass on the noise side.
    assert np.interp(0.5, edges, cdf) == pytest.approx(stats.norm.cdf(-m), abs=1e-6)


def test_lognorm_density_matches_scipy():
    t = np.linspace(0.001, 0.999, 999)
    for m, s in [(-1.0, 0.2), (0.0, 1.0), (0.5, 2.2)]:
        expected = stats.norm.pdf(special.logit(t), m, s) / (t * (1 - t))
        np.testing.assert_allclose(LogitNormal(m, s).density(torch.from_numpy(t)).numpy(), expected, rtol=1e-10)


def test_an_rf_recipe_exposes_its_timestep_density():
    t = np.linspace(0.001, 0.999, 99)
    got = get_recipe("rf/lognorm(0.50, 0.60)").density(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(got, stats.norm.pdf(special.logit(t), 0.5, 0.6) / (t * (1 - t)), rtol=1e-10)


def test_cosmap_density_is_the_derivative_of_its_inverse_map():
    # u(t) = (2 / pi) atan(t / (1 - t)) inverts t = 1 - 1 / (tan(pi u / 2) + 1); pi(t) = u'(t).
    t = np.linspace(0.01, 0.99, 99)
    h = 1e-6
    inverse = lambda x: 2 / np.pi * np.arctan(x / (1 - x))  # noqa: E731
    numeric = (inverse(t + h) - inverse(t - h)) / (2 * h)
    formula = 2 / (np.pi * (1 - 2 * t + 2 * t**2))
    got = CosMap().density(torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(got, formula, rtol=1e-12)
    np.testing.assert_allclose(got, numeric, rtol=1e-6)


@pytest.mark.parametrize("density", [Uniform(), LogitNormal(0.0, 1.0), Mode(1.29), CosMap()])
def test_density_is_zero_outside_the_unit_interval_and_keeps_dtype(density):
    t = torch.tensor([-0.5, -1e-9, 1 + 1e-6, 2.0], dtype=torch.float32)
    p = density.density(t)
    assert p.dtype == torch.float32 and (p == 0).all()


@pytest.mark.parametrize("m, s", [(0.0, 1.0), (1.0, 2.2), (0.0, 10.0)])
def test_lognorm_density_is_zero_at_the_ends(m, s):
    # pi(t) -> 0 at t = 0 and t = 1 for every s (exp(-logit^2 / 2 s^2) beats 1 / (t (1 - t))); at the ends themselves
    # it is 0, not the formula at a clamped t (which for a wide s is ~1e11 at t = 1 - 1e-16).
    p = LogitNormal(m, s).density(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert p.tolist() == [0.0, 0.0]


def test_samplers_are_deterministic_given_a_generator():
    for d in (Uniform(), LogitNormal(0.5, 0.6), Mode(1.29), CosMap()):
        a = d.sample(64, torch.Generator().manual_seed(7))
        b = d.sample(64, torch.Generator().manual_seed(7))
        c = d.sample(64, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert ((a >= 0) & (a <= 1)).all()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Mode(-1.01), r"rf_mode: s=-1\.01 is outside the allowed range \[-1, 2/\(pi-2\)"),
        (lambda: Mode(1.76), r"rf_mode: s=1\.76 is outside the allowed range \[-1, 2/\(pi-2\) = 1\.7519\]"),
        (lambda: LogitNormal(0.0, 0.0), r"rf_lognorm: s=0\.0 is not allowed; s must be > 0"),
        (lambda: LogitNormal(0.0, -1.0), r"rf_lognorm: s=-1\.0 is not allowed; s must be > 0"),
        (lambda: LogitNormal(float("nan"), 1.0), r"rf_lognorm: m=nan must be a finite real number"),
        (lambda: LogitNormal("0.5", 1.0), r"rf_lognorm: m='0.5' must be a finite real number"),
        (lambda: Mode(True), r"rf_mode: s=True must be a finite real number"),
    ],
)
def test_bad_density_parameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_mode_accepts_the_ends_of_its_range():
    assert Mode(-1.0).s == -1.0 and Mode(MODE_S_MAX).s == MODE_S_MAX


@pytest.mark.parametrize("s", [-1.0, -0.08, 1.29, 1.75, MODE_S_MAX])
def test_mode_numeric_inverse_inverts_f(s):
    t = torch.cat([torch.rand(10_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                   torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)])  # fmt: skip
    u = Mode(s).f_inverse(t)
    assert ((u >= 0) & (u <= 1)).all()
    torch.testing.assert_close(Mode(s).f(u), t, rtol=0, atol=1e-14)


PAPER_MODE_SCALES = [-1.0, -0.54, -0.08, 0.38, 0.83, 1.0, 1.29, 1.75]


@pytest.mark.parametrize("s", PAPER_MODE_SCALES)
def test_mode_density_pinned_at_points_of_the_forward_map(s):
    """pi(t) = |d f^-1 / dt| = 1 / |f'(u)| at t = f(u), from the paper's f and its derivative by hand,
    f'(u) = -(1 + s) + s (pi / 2) sin(pi u): no inverse needed. At u = 1/2, t = 1/2 for every s."""
    u = np.array([0.1, 1 / 3, 0.5, 0.8, 0.95])
    t = 1 - u - s * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
    expected = 1 / np.abs(-(1 + s) + s * np.pi / 2 * np.sin(np.pi * u))
    assert t[2] == pytest.approx(0.5, abs=1e-15)
    np.testing.assert_allclose(Mode(s).density(torch.from_numpy(t)).numpy(), expected, rtol=1e-9)
    assert Mode(s).density(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(
        1 / (1 + s - s * math.pi / 2), rel=1e-9)


def test_mode_density_values_at_the_paper_settings():
    # Hand-computed: pi(1/2) = 1 / (1 + s - s pi / 2); s = 1.29: 1 / (2.29 - 2.02632726) = 3.79258...
    t = torch.tensor([0.5], dtype=torch.float64)
    assert Mode(1.29).density(t).item() == pytest.approx(3.792580, rel=1e-6)
    assert Mode(1.75).density(t).item() == pytest.approx(903.8093, rel=1e-6)
    assert Mode(-1.0).density(t).item() == pytest.approx(2 / math.pi, rel=1e-12)


@pytest.mark.parametrize("s", PAPER_MODE_SCALES)
def test_mode_density_at_the_ends(s):
    # t = 1 at u = 0 and t = 0 at u = 1, where f'(u) = -(1 + s): pi = 1 / (1 + s), +inf for s = -1 (the arcsine
    # density's integrable singularities), the same at both ends as the density is symmetric about 1/2.
    p = Mode(s).density(torch.tensor([0.0, 1.0], dtype=torch.float64))
    expected = math.inf if s == -1.0 else 1 / (1 + s)
    assert p.tolist() == pytest.approx([expected, expected], rel=1e-12)


def test_cosmap_and_lognorm_density_pinned_values():
    # cosmap: pi(t) = 2 / (pi (1 - 2t + 2t^2)): 2 / pi at the ends, 4 / pi at 1/2; lognorm(0, 1) at 1/2: 4 / sqrt(2 pi).
    t = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64)
    np.testing.assert_allclose(CosMap().density(t).numpy(), [2 / math.pi, 4 / math.pi, 2 / math.pi, 1.0185916357881302],
                               rtol=1e-12)
    half = torch.tensor([0.5, 0.25], dtype=torch.float64)
    # lognorm(0.5, 0.6) at 1/4: logit = -ln 3, exp(-(ln 3 + 0.5)^2 / 0.72) / (0.6 sqrt(2 pi) 3/16)
    np.testing.assert_allclose(LogitNormal(0.0, 1.0).density(half)[0].item(), 1.5957691216057308, rtol=1e-12)
    np.testing.assert_allclose(LogitNormal(0.5, 0.6).density(half)[1].item(), 0.1019240756, rtol=1e-8)
