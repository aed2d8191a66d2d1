"""The Euler step on any grid (docs/sampling.md#sampler): z_next = a(t_next) x0_hat + b(t_next) eps_hat.

For rf this is exactly the Euler step of dz = v dt; for the other families it is the Euler step in
(sigma, z / a) coordinates, i.e. DDIM (Song et al. 2021), and equally the Euler step of the RF-equivalent ODE in
(tau, z / (a + b)). With x0_hat and eps_hat linear in (z, out) a step is z_next = A z + B out with
A = a' p + b' r, B = a' q + b' s. At the last step (a', b') = (1, 0): it returns x0_hat. One network evaluation
per step.
"""

from __future__ import annotations

from torch import Tensor

import torch

from src.sampling.denoiser import Denoiser, next_process


def euler(denoiser: Denoiser, z: Tensor) -> Tensor:
    """Integrate from z at t[0] over the denoiser's grid to the data; returns x0_hat (steps evaluations)."""
    p, q, r, s = denoiser.coefficients
    a_next, b_next = next_process(denoiser.formulation, denoiser.t)
    coef_z, coef_out = (a_next * p + b_next * r).tolist(), (a_next * q + b_next * s).tolist()
    for i in range(len(denoiser.t)):
        z = torch.add(z * coef_z[i], denoiser.output(z, i), alpha=coef_out[i])
    return z
