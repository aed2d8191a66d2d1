"""Time grids for the sampler: the grid in RF-equivalent time (docs/sampling.md#the-shared-rf-time-grid) and the
resolution-dependent shift (docs/sampling.md#timestep-shift; defined with the formulations, which shift training
times too)."""

from __future__ import annotations

import torch
from torch import Tensor

from src.formulations.base import Formulation, check_shift, shift_time  # noqa: F401 (re-exported)


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def rf_time_grid(formulation: Formulation, steps: int, shift: float = 1.0) -> Tensor:
    """steps + 1 RF-equivalent times tau, float64, from tau(t_max) down to 0: uniform, then shifted (docs/sampling.md#the-shared-rf-time-grid).

    The uniform grid lives in unshifted time and starts at shift_time(tau_max, 1 / shift), so that after the
    shift the first point is exactly the formulation's largest noise level tau_max (the shift never asks for
    more noise than the formulation trains on). For rf (tau_max = 1) this is the paper's shifted grid.
    """
    check_steps(steps)
    shift = check_shift(shift)
    t_max = torch.tensor([formulation.t_max], dtype=torch.float64)
    a, b = formulation.a(t_max), formulation.b(t_max)
    tau_max = float((b / (a + b))[0])  # = sigma / (1 + sigma), finite also where a_t = 0 (rf at t = 1)
    if not 0.0 < tau_max <= 1.0:
        raise ValueError(f"{formulation.name}: tau(t_max={formulation.t_max}) = {tau_max}, expected in (0, 1]")
    u_max = shift_time(tau_max, 1.0 / shift)  # the inverse of shift_time(., alpha) is shift_time(., 1 / alpha)
    tau = shift_time(torch.linspace(u_max, 0.0, steps + 1, dtype=torch.float64), shift)
    tau[0] = tau_max
    return tau
