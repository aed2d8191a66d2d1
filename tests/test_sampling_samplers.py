"""The samplers by name (src/sampling/registry.py, conf/sampler/): selection, network evaluations, the native grids,
convergence on Gaussian data, and the `sampler` config group (composes, sweeps into its own run directory, leaves the
training fingerprint alone). The diffusers references are in test_samplers_reference.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from src.formulations import get_recipe
from src.sampling import SAMPLERS, initial_noise, native_times, sample, sampler_nfe, sampler_times, step_times
from src.sampling import Denoiser, get_sampler
from tests.test_sampling import _gaussian, _no_text, _nonlinear_backbone, exact_flow, gaussian_denoiser

CONF = Path(__file__).resolve().parents[1] / "conf"
# One recipe per family; the rf densities share rf's sampler path (it never reads the density).
FAMILIES = ["rf", "eps/linear", "v/linear", "eps/cos", "v/cos", "edm(-1.20, 1.20)", "edm/rf", "edm/cos"]


def _inputs(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 2, 2, generator=gen), torch.randn(n, 2, 4, generator=gen), torch.randn(n, 4, generator=gen)


# ---- selection ------------------------------------------------------------------------------------
def test_the_default_is_rf_time():
    f = get_recipe("eps/linear")
    noise, ctx, pooled = _inputs()
    torch.testing.assert_close(sample(_nonlinear_backbone, f, noise, ctx, pooled, 5, 3.0),
                               sample(_nonlinear_backbone, f, noise, ctx, pooled, 5, 3.0, sampler="rf_time"),
                               rtol=0, atol=0)


def test_an_unknown_sampler_is_a_one_line_error_naming_the_allowed_ones():
    noise, ctx, pooled = _inputs()
    for bad in ("natve", None, 3):
        with pytest.raises(ValueError) as err:
            sample(_nonlinear_backbone, get_recipe("rf"), noise, ctx, pooled, 5, 1.0, sampler=bad)
        assert str(err.value) == (f"sampler={bad!r} is not allowed; choose one of rf_time, native, heun, or "
                                  "'package.module:NAME' for a Sampler defined outside this repository")
    with pytest.raises(ValueError, match="sampler='x'"):
        sampler_nfe("x", 5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_network_evaluations_per_sample(sampler, cfg_scale):
    for steps in (1, 2, 5):
        calls = []

        def spy(x, t, context, pooled):
            calls.append(x.shape[0])
            return _nonlinear_backbone(x, t, context, pooled)

        noise, ctx, pooled = _inputs()
        out = sample(spy, get_recipe("edm/cos"), noise, ctx, pooled, steps, cfg_scale, sampler=sampler)
        assert out.shape == noise.shape and bool(out.isfinite().all())
        assert len(calls) == sampler_nfe(sampler, steps) == (2 * steps - 1 if sampler == "heun" else steps)
        assert set(calls) == {6 if cfg_scale != 1.0 else 3}  # with guidance: one doubled batch per evaluation


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_the_denoiser_counts_its_network_evaluations(sampler):
    f, steps = get_recipe("v/cos"), 4
    noise, ctx, pooled = _inputs()
    t = sampler_times(sampler, f, steps)
    denoiser = Denoiser(_nonlinear_backbone, f, t, ctx, pooled, 2.0, noise.dtype, noise.device)
    get_sampler(sampler).solver(denoiser, float(f.b(t[:1])[0]) * noise)
    assert denoiser.calls == sampler_nfe(sampler, steps)


def test_heun_with_one_step_is_euler():
    noise, ctx, pooled = _inputs()
    for name in ("rf", "v/linear", "edm(-1.20, 1.20)"):
        f = get_recipe(name)
        torch.testing.assert_close(sample(_nonlinear_backbone, f, noise, ctx, pooled, 1, 2.0, sampler="heun"),
                                   sample(_nonlinear_backbone, f, noise, ctx, pooled, 1, 2.0), rtol=0, atol=0)


# ---- the native grids -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_native_grids_start_at_t_max_and_decrease_inside_the_range(name, shift):
    f = get_recipe(name)
    for steps in (1, 5, 50):
        t = native_times(f, steps, shift)
        assert t.shape == (steps,) and t.dtype == torch.float64 and t[0] == f.t_max
        assert bool((t[1:] < t[:-1]).all()) and bool((t >= f.t_min).all()), t
        torch.testing.assert_close(sampler_times("native", f, steps, shift), t, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rf", "rf/lognorm(0.00, 1.00)", "rf/mode(1.29)", "edm/rf"])
def test_native_is_rf_time_where_the_own_time_is_rf_time(name):
    f = get_recipe(name)
    for steps, shift in ((5, 1.0), (10, 3.0), (25, 0.5)):
        torch.testing.assert_close(native_times(f, steps, shift), step_times(f, steps, shift), rtol=1e-12, atol=1e-12)


def test_native_grids_by_family():
    lin = get_recipe("eps/linear")
    torch.testing.assert_close(native_times(lin, 5) * 999, torch.tensor([999.0, 799, 599, 399, 199],
                                                                        dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(native_times(lin, 3) * 999, torch.tensor([999.0, 666, 332], dtype=torch.float64),
                               rtol=0, atol=1e-9)  # round(1000 - i 1000 / 3) - 1
    with pytest.raises(ValueError, match="steps=1001 is not allowed"):
        native_times(lin, 1001)
    edm = get_recipe("edm(0.00, 1.20)")
    sigma = edm.sigma(native_times(edm, 4))
    ramp = (sigma ** (1 / 7) - sigma[0] ** (1 / 7)) / (sigma[-1] ** (1 / 7) - sigma[0] ** (1 / 7))
    torch.testing.assert_close(ramp, torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))  # Karras, rho = 7
    assert float(sigma[0]) == pytest.approx(1e3, rel=1e-3) and float(sigma[-1]) == pytest.approx(1e-3, rel=1e-3)
    cos = get_recipe("v/cos")
    torch.testing.assert_close(native_times(cos, 4), cos.t_max * torch.tensor([1, 0.75, 0.5, 0.25],
                                                                              dtype=torch.float64))


@pytest.mark.parametrize("name", ["eps/linear", "v/cos", "edm(-1.20, 1.20)"])
def test_a_shift_moves_native_grids_toward_noise_in_rf_time_keeping_the_ends(name):
    f = get_recipe(name)
    tau = lambda t: f.rf_time(t)  # noqa: E731
    base, shifted = native_times(f, 8), native_times(f, 8, shift=3.0)
    assert shifted[0] == base[0] == f.t_max
    assert bool((tau(shifted[1:]) > tau(base[1:])).all())
    # the map is tau -> shift_time(tau u_max / tau_max, 3), u_max = shift_time(tau_max, 1 / 3): it keeps tau_max
    tau_max = float(tau(base[:1])[0])
    u_max = 1 / 3 * tau_max / (1 + (1 / 3 - 1) * tau_max)
    expected = 3 * (tau(base) * u_max / tau_max) / (1 + 2 * (tau(base) * u_max / tau_max))
    torch.testing.assert_close(tau(shifted[1:]), expected[1:], rtol=1e-9, atol=1e-9)


# ---- convergence on Gaussian data -----------------------------------------------------------------
def _errors(f, sampler, steps_list, n=1000):
    mu, cov = _gaussian()
    noise = initial_noise(n, (3, 1, 1), seed=0, dtype=torch.float64)
    exact = exact_flow(f, mu, cov, noise)
    errors, x0 = [], None
    for steps in steps_list:
        x0 = sample(gaussian_denoiser(f, mu, cov), f, noise, *_no_text(n), steps, 1.0, sampler=sampler).reshape(n, 3)
        errors.append(float((x0 - exact).square().mean().sqrt()))
    return errors, x0, mu, cov


def _assert_moments(f, x0, mu, cov):
    # The data's moments, up to Monte Carlo error (1000 samples) and the bias of starting at b(t_max) noise.
    start_bias = float((exact_flow(f, mu, cov, torch.zeros(1, 3)) - mu).abs().max())
    assert float((x0.mean(0) - mu).abs().max()) < 0.12 + start_bias
    assert float((x0.std(0) - cov.diagonal().sqrt()).abs().max()) < 0.1
    assert float((torch.cov(x0.T) - cov).abs().max()) < 0.15


@pytest.mark.parametrize("name", FAMILIES)
def test_native_converges_to_the_exact_flow_at_first_order(name):
    f = get_recipe(name)
    errors, x0, mu, cov = _errors(f, "native", (5, 25, 200))
    assert errors[0] > errors[1] > 3.5 * errors[2], errors  # first order: 8x more steps, about 8x less error
    assert errors[2] < 0.02, errors
    _assert_moments(f, x0, mu, cov)


@pytest.mark.parametrize("name", FAMILIES)
def test_heun_converges_at_second_order_faster_than_euler(name):
    f = get_recipe(name)
    steps = (5, 10, 20)
    heun, x0, mu, cov = _errors(f, "heun", steps)
    euler, _, _, _ = _errors(f, "rf_time", steps)
    assert all(h < e / 4 for h, e in zip(heun, euler)), (heun, euler)  # the same grid, much closer
    assert heun[0] / heun[2] > 12 and euler[0] / euler[2] < 4.5, (heun, euler)  # 4x steps: ~16x vs ~4x less error
    assert heun[2] < 0.003, heun
    _assert_moments(f, x0, mu, cov)


# ---- the config group -----------------------------------------------------------------------------
def test_every_sampler_has_a_config_file_named_after_it():
    files = {p.stem: yaml.safe_load(p.read_text()) for p in (CONF / "sampler").glob("*.yaml")}
    assert set(files) == set(SAMPLERS)
    assert all(cfg == {"name": stem} for stem, cfg in files.items())


def test_the_sampler_group_composes_and_leaves_the_training_fingerprint_alone():
    from src.config import fingerprint
    from tests.test_config import compose_cfg

    default = compose_cfg()
    assert default.sampler.name == "rf_time"
    for name in SAMPLERS:
        cfg = compose_cfg([f"sampler={name}"])
        assert cfg.sampler.name == name
        assert fingerprint(cfg) == fingerprint(default)


def test_a_sampler_sweep_gives_each_sampler_its_own_run_directory():
    from src import plan
    from tests.test_sweeps import FAKE_SHARDS

    jobs = plan.plan_sweep(["loss=rf,eps_linear", "sampler=rf_time,native", "paths.root_dir=/r", *FAKE_SHARDS]).jobs
    assert sorted(str(j.run_dir) for j in jobs) == sorted(
        f"/r/outputs/multirun/default/fake/{r}/sampler={s}" for r in ("rf", "eps_linear") for s in ("rf_time", "native"))
