"""Time grids for the sampler: the resolution-dependent shift and the grid in RF-equivalent time (docs/sampling.md#timestep-shift, docs/sampling.md#the-shared-rf-time-grid)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from src.formulations.base import Formulation


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def check_shift(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"shift must be a finite number > 0 (1.0 = no shift), got {alpha!r}")
    return value


def shift_time(t: Tensor | float, alpha: float) -> Tensor | float:
    """Timestep shift t_m = alpha t / (1 + (alpha - 1) t) (paper section 5.3.2, docs/sampling.md#timestep-shift); identity at alpha = 1."""
    alpha = check_shift(alpha)
    return alpha * t / (1.0 + (alpha - 1.0) * t)


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
