"""What every sampler must satisfy, checked on one defined outside this repository (docs/sampling.md#adding-a-sampler).

A sampler named by import path (`sampler.name: package.module:NAME`, registry.py) is checked once, when it is first
looked up (before any training of the job that evaluates with it), so that a sign error or a miscounted network
evaluation is a one-line configuration error, not a silently wrong column of the ranking:
- its grid gives `steps` float64 times, decreasing (repeating t_min at the end is allowed), inside [t_min, t_max];
- its solver returns samples of the noise's shape and dtype (float64, and float32 as the evaluation samples),
  finite, after exactly nfe(steps) network evaluations (the plan counts the evaluation's FLOPs from nfe);
- with the exact denoiser of Gaussian data, started from the data's exact distribution at the grid's first time, it
  samples that Gaussian: mean and standard deviation within 5% of the data's after 256 steps, for rf, eps/linear,
  v/cos and EDM (a distribution check, so a stochastic sampler passes too).
Small tensors, a few hundred milliseconds. Pure torch: no Lightning or Hydra here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from src.formulations import get_recipe
from src.formulations.base import Formulation

#: One recipe per kind of time axis and parameterisation: t in [0, 1] with v, discrete eps levels, cosine v, EDM's F.
CHECK_RECIPES = ("rf", "eps/linear", "v/cos", "edm(-1.20, 1.20)")
MU, STD = (0.5, -1.0), (1.0, 0.5)  # the Gaussian data of the distribution check, two independent coordinates
# Standardised initial noise: an ODE sampler's mean and std then carry no sampling error, only its own; at 256 steps
# first-order Euler/DDIM shrinks the std by 0.6% (rf_time) to 1.7% (native, EDM's grid), Heun by at most 0.2%.
SAMPLES, STEPS, TOLERANCE = 4000, 256, 0.05


def gaussian_backbone(f: Formulation, t: Tensor, calls: list[int]):
    """A backbone giving f's output for the exact E[x0 | z_t] of x0 ~ N(MU, diag STD^2), at the grid times t.

    A solver evaluates the network only at its grid's times (Denoiser.output), so the time is the grid time whose
    c_noise is nearest to the one passed. `calls` counts the evaluations.
    """
    t = t.to(torch.float64)
    c_noise, c_in = f.c_noise(t).to(torch.float64), f.c_in(t).to(torch.float64)
    a, b = f.a(t).to(torch.float64), f.b(t).to(torch.float64)
    one, zero = torch.ones(len(t), 1, dtype=torch.float64), torch.zeros(len(t), 1, dtype=torch.float64)
    to_x0, to_eps = f.target(one, zero, t)[:, 0], f.target(zero, one, t)[:, 0]  # the target is linear in (x0, eps)
    mu, var = torch.tensor(MU, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64) ** 2

    def backbone(x: Tensor, noise_level: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        calls.append(x.shape[0])
        i = int((c_noise - float(noise_level.reshape(-1)[0])).abs().argmin())
        z = x.to(torch.float64).reshape(x.shape[0], len(MU)) / c_in[i]
        x0 = mu + a[i] * var / (a[i] ** 2 * var + b[i] ** 2) * (z - a[i] * mu)
        eps = (z - a[i] * x0) / b[i]
        return (to_x0[i] * x0 + to_eps[i] * eps).reshape(x.shape).to(x.dtype)

    return backbone


def _grid_errors(sampler, f: Formulation) -> list[str]:
    for steps in (1, 2, 5):
        t = sampler.grid(f, steps, 1.0)
        if not (isinstance(t, Tensor) and t.shape == (steps,) and t.dtype == torch.float64):
            return [f"its grid gives {type(t).__name__} {tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', '')} "
                    f"for {f.name} at {steps} steps, not float64 times of shape ({steps},)"]
        # Non-increasing: a grid mapped onto a discrete schedule may repeat t_min at its end (rf_time, eps/linear)
        if not (bool(torch.isfinite(t).all()) and bool((t[1:] <= t[:-1]).all()) and bool((t[1:] < t[0]).all())
                and bool((t >= f.t_min).all()) and bool((t <= f.t_max).all())):
            return [f"its grid for {f.name} at {steps} steps is not decreasing inside [t_min, t_max] = "
                    f"[{f.t_min}, {f.t_max}]: {[round(v, 4) for v in t.tolist()]}"]
    return []


def start(f: Formulation, t: Tensor, noise: Tensor) -> Tensor:
    """z at the grid's first time drawn from the data's exact marginal a x0 + b eps (the evaluation starts from
    b(t_max) eps alone, which for a schedule with signal left at t_max, eps/linear's, biases the mean by ~7%)."""
    a, b = float(f.a(t[:1])[0]), float(f.b(t[:1])[0])
    mu = torch.tensor(MU, dtype=torch.float64).reshape(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).reshape(1, -1, 1, 1)
    return a * mu + (a * a * std**2 + b * b).sqrt() * noise


def _run(sampler, f: Formulation, steps: int, n: int, cfg_scale: float = 1.0,
         dtype: torch.dtype = torch.float64) -> tuple[Tensor, int]:
    """(samples, network evaluations) of the sampler on the Gaussian's exact denoiser, with noise of `dtype`."""
    from src.sampling.denoiser import Denoiser

    t = sampler.grid(f, steps, 1.0)
    calls: list[int] = []
    noise = torch.randn(n, len(MU), 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if n > 1:
        noise = (noise - noise.mean(0)) / noise.std(0)
    context, pooled = torch.zeros(n, 1, 1, dtype=dtype), torch.zeros(n, 1, dtype=dtype)
    denoiser = Denoiser(gaussian_backbone(f, t, calls), f, t, context, pooled, cfg_scale, dtype, noise.device)
    with torch.random.fork_rng(devices=[]):  # a stochastic solver's draws leave the caller's generator alone
        torch.manual_seed(0)
        out = sampler.solver(denoiser, start(f, t, noise).to(dtype))
    return out, len(calls)


def sampler_errors(sampler) -> list[str]:
    """The properties `sampler` (a src.sampling.Sampler: solver, grid, nfe) breaks, each as a short phrase."""
    try:
        return _errors(sampler)
    except Exception as e:  # noqa: BLE001 -- the sampler's own code failed on a check's input: that is the finding
        return [f"it raises {type(e).__name__}: {e}".splitlines()[0]]


def _errors(sampler) -> list[str]:
    parts = [getattr(sampler, k, None) for k in ("solver", "grid", "nfe")]
    if not all(callable(p) for p in parts):
        return [f"it is a {type(sampler).__name__}, not a src.sampling.Sampler(solver, grid, nfe) of three functions"]
    for steps in (1, 2, 5):
        nfe = sampler.nfe(steps)
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            return [f"nfe({steps}) is {nfe!r}, not a number of network evaluations >= 1"]
    for name in CHECK_RECIPES:
        f = get_recipe(name)
        if errors := _grid_errors(sampler, f):
            return errors
        for steps in (1, 2, 5):
            # float64 as in the distribution check, and float32 as the evaluation samples
            for cfg_scale, dtype in ((1.0, torch.float64), (3.0, torch.float64), (1.0, torch.float32),
                                     (3.0, torch.float32)):
                out, calls = _run(sampler, f, steps, 3, cfg_scale, dtype)
                if not (isinstance(out, Tensor) and out.shape == (3, len(MU), 1, 1)):
                    return [f"its solver returns {type(out).__name__} {tuple(getattr(out, 'shape', ()))}, not "
                            "samples of the noise's shape (3, 2, 1, 1)"]
                if out.dtype != dtype:
                    return [f"its solver returns {out.dtype} samples for {dtype} noise, not the noise's dtype (the "
                            "evaluation samples in float32)"]
                if not bool(torch.isfinite(out).all()):
                    return [f"its solver returns non-finite samples for {f.name} at {steps} steps"]
                if calls != sampler.nfe(steps):
                    return [f"its solver evaluates the network {calls} times for {f.name} at {steps} steps, but "
                            f"nfe({steps}) = {sampler.nfe(steps)} (the plan counts the evaluation's FLOPs from nfe)"]
        out, _ = _run(sampler, f, STEPS, SAMPLES)
        flat = out.reshape(SAMPLES, len(MU))
        mu, std = torch.tensor(MU, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
        off = max(float(((flat.mean(0) - mu).abs() / std).max()), float((flat.std(0) / std - 1).abs().max()))
        if not off <= TOLERANCE:  # the first recipe it fails is enough to name
            return [f"with the exact denoiser of Gaussian data it does not sample that Gaussian for {f.name} "
                          f"at {STEPS} steps (mean or std off by {off:.0%} of the data's std; at most "
                     f"{TOLERANCE:.0%}): a sign, a coefficient or the step to the data is wrong"]
    return []


def steps_errors(sampler, steps, shift: float = 1.0) -> list[str]:
    """At the step counts an evaluation asks for (sampler_errors tries 1, 2 and 5): nfe(steps) is a number of network
    evaluations and the solver evaluates the network that many times; one sample on rf's Gaussian denoiser each. With
    a shift, the grid of 2 steps or more must move (a grid ignoring it would be recorded as shifted)."""
    f = get_recipe("rf")
    try:
        for n in sorted({int(k) for k in steps}):
            if shift != 1.0 and n >= 2 and torch.equal(sampler.grid(f, n, shift), sampler.grid(f, n, 1.0)):
                return [f"its grid at {n} steps is the same with shift {shift} as without (its records would say "
                        "shifted): it must apply `shift` as the built-in grids do (src/sampling/grids.py)"]
            nfe = sampler.nfe(n)
            if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
                return [f"nfe({n}) is {nfe!r}, not a number of network evaluations >= 1"]
            if (calls := _run(sampler, f, n, 1)[1]) != nfe:
                return [f"its solver evaluates the network {calls} times at {n} steps, but nfe({n}) = {nfe} (the plan "
                        "counts the evaluation's FLOPs from nfe)"]
    except Exception as e:  # noqa: BLE001 -- as in sampler_errors: the sampler's own code failed
        return [f"it raises {type(e).__name__}: {e}".splitlines()[0]]
    return []


def check_sampler(sampler, where: str) -> None:
    """ValueError in one line naming the sampler and every property it breaks (sampler_errors)."""
    errors = sampler_errors(sampler)
    if errors:
        raise ValueError(f"sampler {where!r} breaks what every sampler must satisfy: {'; '.join(errors)} "
                         "(docs/sampling.md#adding-a-sampler)")
