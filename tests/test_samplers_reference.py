"""Each sampler's steps against an independent reference on the same grid: diffusers' schedulers (a test-only
dependency) driven by the same fake network, the exact denoiser of Gaussian data (closed form), so what is compared
is the sampler, not a model.

- native, eps/linear and v/linear: DDIMScheduler, SD's scaled-linear betas, timestep_spacing="trailing",
  set_alpha_to_one=True (the last step returns x0_hat), prediction_type epsilon / v_prediction.
- native and rf_time, rf: FlowMatchEulerDiscreteScheduler with the shift.
- native, edm(Pm, Ps): EDMEulerScheduler (Karras sigmas, rho = 7, EDM's F-prediction, c_in, c_noise = ln(sigma) / 4).
- native and rf_time on the cosine and linear VP families: EulerDiscreteScheduler in k-diffusion's (sigma, z / a)
  coordinates with the grid's sigmas; edm/cos: EDMEulerScheduler on the grid's sigmas.
- heun: FlowMatchHeunDiscreteScheduler (rf directly; the other families through their exact RF-equivalent
  velocity eps - x0 in y = z / (a + b), computed in closed form from the Gaussian posterior).
"""

from __future__ import annotations


import pytest
import torch

from src.formulations import get_recipe
from src.sampling import native_times, rf_time_grid, sample, step_times
from tests.test_sampling import _gaussian, _no_text, gaussian_denoiser

diffusers = pytest.importorskip("diffusers")

N = 16  # samples; 3-dimensional Gaussian data


def _setup(name: str):
    f = get_recipe(name)
    mu, cov = _gaussian()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(N, 3, 1, 1, generator=gen, dtype=torch.float64)
    return f, mu, cov, noise, gaussian_denoiser(f, mu, cov)


def _ours(f, net, noise, steps, sampler, shift=1.0):
    return sample(net, f, noise, *_no_text(N), steps, 1.0, shift=shift, sampler=sampler)


def _close(ours, ref):
    torch.testing.assert_close(ours.double(), ref.double().reshape(ours.shape), rtol=1e-4, atol=2e-4)


def _t(value: float) -> torch.Tensor:
    return torch.full((N,), float(value), dtype=torch.float64)


# ---- Euler/DDIM in each family's own time -----------------------------------------------------------
@pytest.mark.parametrize("name,prediction", [("eps/linear", "epsilon"), ("v/linear", "v_prediction")])
@pytest.mark.parametrize("steps", [5, 10, 50])
def test_native_linear_is_ddim_with_trailing_spacing(name, prediction, steps):
    f, mu, cov, noise, net = _setup(name)
    ddim = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, prediction_type=prediction,
    )
    ddim.set_timesteps(steps)
    torch.testing.assert_close(native_times(f, steps) * 999, ddim.timesteps.double(), rtol=0, atol=1e-9)
    z = float(f.b(_t(1.0))[0]) * noise  # both start from the same z = b(t_max) noise
    ctx, pooled = _no_text(N)
    for level in ddim.timesteps:
        out = net(z, _t(int(level) / 999), ctx, pooled)  # c_noise = t = level / (T - 1)
        z = ddim.step(out, level, z).prev_sample.double()
    _close(_ours(f, net, noise, steps, "native"), z)


@pytest.mark.parametrize("name", ["rf", "rf/lognorm(0.00, 1.00)"])
@pytest.mark.parametrize("sampler", ["rf_time", "native"])
@pytest.mark.parametrize("steps,shift", [(5, 1.0), (10, 3.0), (25, 1.0)])
def test_rf_is_flow_match_euler(name, sampler, steps, shift):
    f, mu, cov, noise, net = _setup(name)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1].tolist())  # shifts them
    z, (ctx, pooled) = noise.clone(), _no_text(N)
    for t in sched.timesteps:
        z = sched.step(net(z, _t(float(t) / 1000), ctx, pooled), t, z).prev_sample.double()  # c_noise = t
    _close(_ours(f, net, noise, steps, sampler, shift), z)


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_native_edm_is_edm_euler_on_the_karras_schedule(steps):
    f, mu, cov, noise, net = _setup("edm(-1.20, 1.20)")
    ends = f.sigma(torch.tensor([f.t_min, f.t_max], dtype=torch.float64))
    sched = diffusers.EDMEulerScheduler(sigma_min=float(ends[0]), sigma_max=float(ends[1]), sigma_data=0.5,
                                        sigma_schedule="karras", rho=7.0, prediction_type="epsilon")
    sched.set_timesteps(steps)
    torch.testing.assert_close(f.sigma(native_times(f, steps)), sched.sigmas[:-1].double(), rtol=1e-5, atol=0)
    z, (ctx, pooled) = float(ends[1]) * noise, _no_text(N)
    for c_noise in sched.timesteps:
        out = net(sched.scale_model_input(z, c_noise).double(), _t(c_noise), ctx, pooled)
        z = sched.step(out, c_noise, z).prev_sample.double()
    _close(_ours(f, net, noise, steps, "native"), z)


def _k_diffusion_euler(f, net, noise, t, prediction):
    """EulerDiscreteScheduler on the grid's sigmas: sample = z / a = x0 + sigma eps, network input z."""
    sigma = f.sigma(t)
    sched = diffusers.EulerDiscreteScheduler(prediction_type=prediction)
    sched.set_timesteps(sigmas=sigma.tolist() + [0.0])
    sched.set_begin_index(0)
    y, (ctx, pooled) = float(sigma[0]) * noise, _no_text(N)  # z = b(t_max) noise, y = z / a
    for i, timestep in enumerate(sched.timesteps):
        out = net(sched.scale_model_input(y, timestep).double(), _t(f.c_noise(t[i : i + 1])[0]), ctx, pooled)
        y = sched.step(out, timestep, y).prev_sample.double()
    return y  # at sigma = 0, y = x0


@pytest.mark.parametrize("name,prediction", [("eps/cos", "epsilon"), ("v/cos", "v_prediction")])
@pytest.mark.parametrize("steps", [5, 10])
def test_native_cos_is_euler_in_sigma_uniform_in_own_time(name, prediction, steps):
    f, mu, cov, noise, net = _setup(name)
    t = f.clip_t(f.t_max * (1 - torch.arange(steps, dtype=torch.float64) / steps))  # uniform in the own t
    torch.testing.assert_close(native_times(f, steps), t, rtol=0, atol=1e-12)
    _close(_ours(f, net, noise, steps, "native"), _k_diffusion_euler(f, net, noise, t, prediction))


@pytest.mark.parametrize("name,prediction", [("eps/linear", "epsilon"), ("v/linear", "v_prediction"),
                                             ("v/cos", "v_prediction")])
def test_rf_time_on_vp_families_is_euler_in_sigma_on_the_rf_time_grid(name, prediction):
    f, mu, cov, noise, net = _setup(name)
    t = step_times(f, 10)
    _close(_ours(f, net, noise, 10, "rf_time"), _k_diffusion_euler(f, net, noise, t, prediction))


@pytest.mark.parametrize("name,grid", [("edm/cos", native_times), ("edm/rf", step_times)])
def test_edm_families_are_edm_euler_on_their_grid(name, grid):
    f, mu, cov, noise, net = _setup(name)
    t = grid(f, 10)
    sigma = f.sigma(t)
    sched = diffusers.EDMEulerScheduler(sigma_data=0.5, prediction_type="epsilon")
    sched.set_timesteps(10)
    sched.sigmas = torch.cat([sigma.float(), torch.zeros(1)])  # custom sigmas: set_timesteps would Karras-map them
    sched.timesteps = sched.precondition_noise(sigma.float())
    z, (ctx, pooled) = float(sigma[0]) * noise, _no_text(N)
    for c_noise in sched.timesteps:
        out = net(sched.scale_model_input(z, c_noise).double(), _t(c_noise), ctx, pooled)
        z = sched.step(out, c_noise, z).prev_sample.double()
    sampler = "native" if grid is native_times else "rf_time"
    _close(_ours(f, net, noise, 10, sampler), z)


# ---- Heun --------------------------------------------------------------------------------------------
def _flow_match_heun(taus, velocity, y):
    """FlowMatchHeunDiscreteScheduler on the RF-time grid taus (steps values from tau_max down); returns (y, NFE)."""
    sched = diffusers.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(len(taus))
    sigmas = torch.tensor(taus, dtype=torch.float32)  # the scheduler's own grid ends at 1 / T; ours at 0
    ts = sigmas * 1000
    sched.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    sched.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    for timestep in sched.timesteps:
        y = sched.step(velocity(y, float(timestep) / 1000), timestep, y).prev_sample.double()
    return y, len(sched.timesteps)


def _counting(net):
    calls = []

    def wrapped(x, t, context, pooled):
        calls.append(1)
        return net(x, t, context, pooled)

    return wrapped, calls


@pytest.mark.parametrize("steps,shift", [(5, 1.0), (10, 3.0)])
def test_heun_on_rf_is_flow_match_heun(steps, shift):
    f, mu, cov, noise, net = _setup("rf")
    taus = rf_time_grid(f, steps, shift)[:-1].tolist()
    ctx, pooled = _no_text(N)
    ref, nfe = _flow_match_heun(taus, lambda y, tau: net(y, _t(tau), ctx, pooled), noise.clone())
    counted, calls = _counting(net)
    ours = sample(counted, f, noise, ctx, pooled, steps, 1.0, shift=shift, sampler="heun")
    _close(ours, ref)
    assert len(calls) == nfe == 2 * steps - 1


def _posterior_mean(mu, cov, z, a, b):
    """E[x0 | z], z = a x0 + b eps, x0 ~ N(mu, cov): closed form, independent of any parameterisation."""
    flat = z.reshape(z.shape[0], -1)
    gain = a * cov @ torch.linalg.inv(a * a * cov + b * b * torch.eye(len(mu), dtype=torch.float64))
    return mu + (flat - a * mu) @ gain.T


@pytest.mark.parametrize("name", ["eps/linear", "v/cos", "edm(-1.20, 1.20)", "edm/cos"])
def test_heun_is_flow_match_heun_on_the_rf_equivalent_velocity(name):
    f, mu, cov, noise, net = _setup(name)
    steps = 6
    t = step_times(f, steps)
    tau_max = float(f.rf_time(t[:1])[0])
    taus = torch.linspace(tau_max, 0, steps + 1, dtype=torch.float64)[:-1].tolist()  # uniform in tau

    def velocity(y, tau):  # y = z / (a + b) = (1 - tau) x0 + tau eps, so dy / dtau = eps - x0
        x0 = _posterior_mean(mu, cov, y.double(), 1 - tau, tau).reshape(y.shape)
        return (y - (1 - tau) * x0) / tau - x0

    ref, nfe = _flow_match_heun(taus, velocity, tau_max * noise)  # y(t_max) = b(t_max) noise / (a + b)
    _close(_ours(f, net, noise, steps, "heun"), ref)
    assert nfe == 2 * steps - 1
