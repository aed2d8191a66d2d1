"""Time grids for the solvers: which times t the network is evaluated at (one function per grid).

A grid function takes (formulation, steps, shift) and returns the `steps` evaluation times in the formulation's own
t, float64, from t_max down; after the last one every solver steps to the data (a, b) = (1, 0) and returns x0_hat.

- `rf_time` (the default, docs/sampling.md#sampler): uniform in RF-equivalent time tau = sigma / (1 + sigma), shifted, mapped to each
  formulation's t with the same log-SNR. One grid for every family.
- `native`: each family's own sampling grid, as its own codebase samples it:
  eps/linear, v/linear: DDIM's "trailing" timesteps over the T = 1000 discrete levels (diffusers' DDIMScheduler
  with timestep_spacing="trailing": levels round(T - i T / steps) - 1); edm(Pm, Ps): the EDM paper's Karras
  schedule, rho = 7, between the formulation's sigma_min and sigma_max (what EDM samples with); every other family
  (rf and its densities, eps/cos, v/cos, edm/rf, edm/cos): uniform in its own t from t_max to 0. For rf and edm/rf
  the own t is the RF-equivalent time, so `native` is `rf_time` there.
  A shift != 1 acts on RF-equivalent time as in `rf_time`: tau -> shift_time(tau u_max / tau_max, shift), the map
  that keeps tau_max and 0 fixed (for a uniform grid it is exactly `rf_time`'s shifted grid); the linear
  schedule's times then fall between its discrete levels.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from src.formulations.base import Formulation
from src.sampling.schedule import check_shift, check_steps, rf_time_grid, shift_time

Grid = Callable[[Formulation, int, float], Tensor]

#: The exponent of the Karras et al. (2022) noise schedule, as EDM samples with.
KARRAS_RHO = 7.0


def _t_max(formulation: Formulation) -> Tensor:
    return torch.tensor([formulation.t_max], dtype=torch.float64)


def step_times(formulation: Formulation, steps: int, shift: float = 1.0) -> Tensor:
    """The `rf_time` grid: the formulation's t at each of the `steps` evaluations, uniform in (shifted) tau."""
    tau = rf_time_grid(formulation, steps, shift)
    t = torch.empty(steps, dtype=torch.float64)
    t[0] = formulation.t_max  # tau[0] is tau(t_max) by construction; avoids sigma = inf at rf's t = 1
    if steps > 1:
        t[1:] = formulation.clip_t(formulation.t_from_rf_time(tau[1:steps]).to(torch.float64))
    return t


# ---- the native grids, before any shift -----------------------------------------------------------
def uniform_times(formulation: Formulation, steps: int) -> Tensor:
    """Uniform in the formulation's own t: t_max (1 - i / steps), i = 0 .. steps - 1."""
    t = torch.linspace(formulation.t_max, 0.0, steps + 1, dtype=torch.float64)[:steps]
    t[0] = formulation.t_max
    return formulation.clip_t(t)


def trailing_times(formulation: Formulation, steps: int) -> Tensor:
    """DDIM "trailing" timesteps over the T discrete levels, on t = level / (T - 1): level round(T - i T / steps) - 1.

    The first is level T - 1 (the most noise trained on), the last T / steps - 1; the step after it returns x0_hat
    (diffusers: set_alpha_to_one=True).
    """
    levels = formulation.schedule.levels
    if steps > levels:
        raise ValueError(f"sampler=native: {formulation.name} has {levels} discrete levels; steps={steps} is "
                         f"not allowed, use steps <= {levels}")
    i = torch.arange(steps, dtype=torch.float64)
    level = torch.round(levels - i * (levels / steps)) - 1  # the index form of diffusers' arange, no float drift
    return level / (levels - 1)


def karras_times(formulation: Formulation, steps: int, rho: float = KARRAS_RHO) -> Tensor:
    """Karras et al. (2022), eq. 5: sigma_i = (smax^(1/rho) + i / (steps - 1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    ends = torch.tensor([formulation.t_min, formulation.t_max], dtype=torch.float64)
    sigma_min, sigma_max = (float(s) for s in formulation.sigma(ends))
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigma = (hi + ramp * (lo - hi)) ** rho
    t = formulation.clip_t(formulation.t_from_sigma(sigma).to(torch.float64))
    t[0] = formulation.t_max
    return t


#: Family key -> native grid; families not listed are sampled uniformly in their own t.
NATIVE_GRIDS: dict[str, Callable[[Formulation, int], Tensor]] = {
    "eps_linear": trailing_times,
    "v_linear": trailing_times,
    "edm": karras_times,
}


def shift_times(formulation: Formulation, t: Tensor, shift: float) -> Tensor:
    """Shift a grid in RF-equivalent time, keeping its ends: tau -> shift_time(tau u_max / tau_max, shift)."""
    shift = check_shift(shift)
    if shift == 1.0:
        return t
    tau_max = float(formulation.rf_time(_t_max(formulation))[0])
    u_max = shift_time(tau_max, 1.0 / shift)
    tau = shift_time(formulation.rf_time(t.to(torch.float64)) * (u_max / tau_max), shift)
    out = formulation.clip_t(formulation.t_from_rf_time(tau).to(torch.float64))
    out[0] = formulation.t_max
    return out


def native_times(formulation: Formulation, steps: int, shift: float = 1.0) -> Tensor:
    """The `native` grid: the family's own grid (see the module docstring), shifted in RF-equivalent time."""
    check_steps(steps)
    check_shift(shift)
    grid = NATIVE_GRIDS.get(formulation.family, uniform_times)
    return shift_times(formulation, grid(formulation, steps), shift)


GRIDS: dict[str, Grid] = {"rf_time": step_times, "native": native_times}
