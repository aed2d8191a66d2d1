"""Heun's method (second order, as in EDM's sampler) on any grid, in RF-equivalent coordinates.

The probability-flow ODE written in tau = b / (a + b) and y = z / (a + b) is rectified flow's:
dy / dtau = v_hat = eps_hat - x0_hat, for every formulation (y = (1 - tau) x0 + tau eps). A step from tau to tau'
is Euler's (the predictor, identical to the Euler sampler's step) followed, except at the last step, by the
trapezoidal corrector y_next = y + (tau' - tau) (v_hat(y, tau) + v_hat(y_pred, tau')) / 2. Network evaluations:
2 steps - 1. For rf this is diffusers' FlowMatchHeunDiscreteScheduler.

Why these coordinates rather than EDM's (sigma, z / a): rf and every rf density start at t = 1, where sigma and
z / a are infinite; there the (sigma, z / a) corrector is undefined, while (tau, y) is finite on the whole path.
Both coordinates give the same first-order (Euler/DDIM) step; only the corrector differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from src.sampling.denoiser import Denoiser, next_process


def heun(denoiser: Denoiser, z: Tensor) -> Tensor:
    """Integrate from z at t[0] over the denoiser's grid to the data; returns x0_hat (2 steps - 1 evaluations)."""
    f, t = denoiser.formulation, denoiser.t
    p, q, r, s = denoiser.coefficients
    a, b = f.a(t).to(torch.float64), f.b(t).to(torch.float64)
    a_next, b_next = next_process(f, t)
    tau, tau_next, c_next = b / (a + b), b_next / (a_next + b_next), a_next + b_next
    coef_z, coef_out = (a_next * p + b_next * r).tolist(), (a_next * q + b_next * s).tolist()  # the Euler step
    v_z, v_out = (r - p).tolist(), (s - q).tolist()  # v_hat = eps_hat - x0_hat = v_z z + v_out out
    # In z: z_next = z_pred + c' (tau' - tau) / 2 (v_hat(z_pred, t') - v_hat(z, t)), with c' = a' + b'.
    half = (c_next * (tau_next - tau) / 2).tolist()
    steps = len(t)
    for i in range(steps):
        out = denoiser.output(z, i)
        z_pred = torch.add(z * coef_z[i], out, alpha=coef_out[i])
        if i == steps - 1:
            return z_pred  # the last step goes to the data (sigma = 0): Euler, x0_hat
        v = torch.add(z * v_z[i], out, alpha=v_out[i])
        v_pred = torch.add(z_pred * v_z[i + 1], denoiser.output(z_pred, i + 1), alpha=v_out[i + 1])
        z = torch.add(z_pred, v_pred - v, alpha=half[i])
    return z
