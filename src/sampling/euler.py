"""The one Euler sampler for every formulation, with classifier-free guidance (SPEC 8).

Each step maps the grid's RF-equivalent time tau to the formulation's own t (same log-SNR), converts the
network output to (x0_hat, eps_hat) and moves to z_next = a(t_next) x0_hat + b(t_next) eps_hat. For rf this
is exactly the Euler step of dz = v dt; for the other families it is the Euler step in (sigma, z / a)
coordinates, i.e. DDIM (Song et al. 2021).

Guidance is applied to the raw network output: out = uncond + w (cond - uncond). Every parameterisation
here is affine in the output at fixed (z_t, t) (x0_hat = p(t) z_t + q(t) out, likewise eps_hat), and affine
maps preserve combinations whose weights sum to one, so this equals guiding x0_hat and eps_hat (or
v, eps, D) directly; one conversion per step instead of two.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from src.formulations.base import Formulation
from src.sampling.schedule import rf_time_grid

Backbone = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _check_args(noise: Tensor, context: Tensor, pooled: Tensor, cfg_scale: float) -> None:
    n = noise.shape[0]
    if context.shape[0] != n or pooled.shape[0] != n:
        raise ValueError(
            f"sample: batch sizes differ: noise {n}, context {context.shape[0]}, pooled {pooled.shape[0]}"
        )
    if isinstance(cfg_scale, bool) or not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number (1.0 = no guidance), got {cfg_scale!r}")


def step_times(formulation: Formulation, steps: int, shift: float = 1.0) -> Tensor:
    """The formulation's t at each of the `steps` network evaluations (float64), from t_max down."""
    tau = rf_time_grid(formulation, steps, shift)
    t = torch.empty(steps, dtype=torch.float64)
    t[0] = formulation.t_max  # tau[0] is tau(t_max) by construction; avoids sigma = inf at rf's t = 1
    if steps > 1:
        t[1:] = formulation.clip_t(formulation.t_from_rf_time(tau[1:steps]).to(torch.float64))
    return t


@torch.no_grad()
def sample(
    backbone: Backbone,
    formulation: Formulation,
    noise: Tensor,
    context: Tensor,
    pooled: Tensor,
    steps: int,
    cfg_scale: float,
    shift: float = 1.0,
) -> Tensor:
    """Euler sampling from z = b(t_max) noise to x0 with guidance scale cfg_scale (SPEC 8); returns x0_hat."""
    _check_args(noise, context, pooled, cfg_scale)
    f, dtype, device = formulation, noise.dtype, noise.device
    t64 = step_times(f, steps, shift)
    # All schedule coefficients once, in float64, then one transfer: no host syncs inside the loop.
    t_all = t64.to(device=device, dtype=dtype)
    c_in_all = f.c_in(t64).to(torch.float64).to(device=device, dtype=dtype)
    c_noise_all = f.c_noise(t64).to(torch.float64).to(device=device, dtype=dtype)
    a_next = f.a(t64[1:]).to(device=device, dtype=dtype)
    b_next = f.b(t64[1:]).to(device=device, dtype=dtype)
    b_max = float(f.b(t64[:1])[0])

    guided = cfg_scale != 1.0
    if guided:  # both halves in one batched forward: [cond; uncond], uncond = zeroed text (ARCHITECTURE)
        context = torch.cat([context, torch.zeros_like(context)])
        pooled = torch.cat([pooled, torch.zeros_like(pooled)])

    n = noise.shape[0]
    z = b_max * noise
    for i in range(steps):
        t = t_all[i].expand(n)
        x_in = c_in_all[i] * z
        t_in = c_noise_all[i].expand(n)
        if guided:
            x_in, t_in = torch.cat([x_in, x_in]), torch.cat([t_in, t_in])
        out = backbone(x_in, t_in, context, pooled).to(dtype)
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        x0_hat, eps_hat = f.to_x0_eps(out, z, t)
        if i == steps - 1:  # the next grid point is tau = 0: return the clean estimate
            return x0_hat
        z = a_next[i] * x0_hat + b_next[i] * eps_hat
    raise AssertionError("unreachable")
