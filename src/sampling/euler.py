"""The one Euler sampler for every formulation, with classifier-free guidance (docs/sampling.md#sampler).

Each step maps the grid's RF-equivalent time tau to the formulation's own t (same log-SNR), converts the
network output to (x0_hat, eps_hat) with the formulation's `to_x0_eps` and moves to
z_next = a(t_next) x0_hat + b(t_next) eps_hat. For rf this is exactly the Euler step of dz = v dt; for the
other families it is the Euler step in (sigma, z / a) coordinates, i.e. DDIM (Song et al. 2021).

Every parameterisation of docs/formulations.md#formulation-families (v, eps, EDM's F) is linear in (z_t, output) at fixed t:
x0_hat = p z + q out, eps_hat = r z + s out. The sampler reads (p, q, r, s) off `to_x0_eps` once per call,
in float64 on the CPU (and checks the linearity on a random probe), so a step on the device is the backbone
plus z_next = A z + B out with A = a' p + b' r, B = a' q + b' s: no formulation code, no host syncs and
few kernel launches inside the loop.

Guidance is applied to the raw network output: out = uncond + w (cond - uncond). Since the conversion is
linear and the weights (1 - w, w) sum to one, this equals guiding x0_hat and eps_hat (or v, eps, D) directly.
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


def conversion_coefficients(formulation: Formulation, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(p, q, r, s), each (k,), with x0_hat = p z + q out and eps_hat = r z + s out at the k times t."""
    t = t.to(torch.float64)
    one, zero = torch.ones(len(t), 1, dtype=torch.float64), torch.zeros(len(t), 1, dtype=torch.float64)
    p, r = formulation.to_x0_eps(zero, one, t)  # to_x0_eps(output, z_t, t)
    q, s = formulation.to_x0_eps(one, zero, t)
    gen = torch.Generator().manual_seed(0)
    z, out = torch.randn(2, len(t), 3, generator=gen, dtype=torch.float64)
    x0, eps = formulation.to_x0_eps(out, z, t)
    for got, a, b in ((x0, p, q), (eps, r, s)):
        expected = a * z + b * out
        if not bool(((got - expected).abs() <= 1e-7 * ((a * z).abs() + (b * out).abs()) + 1e-12).all()):
            raise ValueError(f"{formulation.name}: to_x0_eps is not linear in (z_t, output); the sampler needs "
                             "x0_hat and eps_hat linear in them at fixed t")
    return p[:, 0], q[:, 0], r[:, 0], s[:, 0]


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
    """Euler sampling from z = b(t_max) noise to x0 with guidance scale cfg_scale (docs/sampling.md#sampler); returns x0_hat."""
    _check_args(noise, context, pooled, cfg_scale)
    f, n, dtype, device = formulation, noise.shape[0], noise.dtype, noise.device
    t = step_times(f, steps, shift)
    p, q, r, s = conversion_coefficients(f, t)
    a_next = torch.cat([f.a(t[1:]).to(torch.float64), torch.ones(1, dtype=torch.float64)])
    b_next = torch.cat([f.b(t[1:]).to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    # z_next = A z + B out; at the last step (a', b') = (1, 0), so it returns x0_hat = p z + q out.
    coef_z, coef_out = (a_next * p + b_next * r).tolist(), (a_next * q + b_next * s).tolist()
    c_in = f.c_in(t).to(torch.float64).tolist()

    guided = cfg_scale != 1.0
    if guided:  # both halves in one batched forward: [cond; uncond], uncond = zeroed text (ARCHITECTURE)
        context = torch.cat([context, torch.zeros_like(context)])
        pooled = torch.cat([pooled, torch.zeros_like(pooled)])
    c_noise = f.c_noise(t).to(torch.float64)[:, None].expand(steps, 2 * n if guided else n)
    c_noise = c_noise.to(device=device, dtype=dtype)  # one transfer for all steps

    z = float(f.b(t[:1])[0]) * noise
    for i in range(steps):
        x_in = z if c_in[i] == 1.0 else z * c_in[i]
        if guided:
            x_in = torch.cat([x_in, x_in])
        out = backbone(x_in, c_noise[i], context, pooled).to(dtype)
        if guided:
            cond, uncond = out.chunk(2)
            out = torch.lerp(uncond, cond, cfg_scale)  # uncond + w (cond - uncond)
        z = torch.add(z * coef_z[i], out, alpha=coef_out[i])
    return z
