"""The seam every solver uses: the guided network at a grid's times and its conversion to (x0_hat, eps_hat).

Every parameterisation of docs/formulations.md#formulation-families (v, eps, EDM's F) is linear in (z_t, output) at fixed t:
x0_hat = p z + q out, eps_hat = r z + s out. The denoiser reads (p, q, r, s) off the formulation's `to_x0_eps`
once per call, in float64 on the CPU (and checks the linearity on a random probe), so a solver step on the device
is the backbone plus a few fused tensor operations: no formulation code and no host syncs inside the loop.

Guidance is applied to the raw network output: out = uncond + w (cond - uncond). Since the conversion is
linear and the weights (1 - w, w) sum to one, this equals guiding x0_hat and eps_hat (or v, eps, D) directly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from src.formulations.base import Formulation

Backbone = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def check_sample_args(noise: Tensor, context: Tensor, pooled: Tensor, cfg_scale: float) -> None:
    n = noise.shape[0]
    if context.shape[0] != n or pooled.shape[0] != n:
        raise ValueError(
            f"sample: batch sizes differ: noise {n}, context {context.shape[0]}, pooled {pooled.shape[0]}"
        )
    if isinstance(cfg_scale, bool) or not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number (1.0 = no guidance), got {cfg_scale!r}")


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


def next_process(formulation: Formulation, t: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) at the point after each grid time (float64): the next grid time, and data (1, 0) after the last."""
    t = t.to(torch.float64)
    a_next = torch.cat([formulation.a(t[1:]).to(torch.float64), torch.ones(1, dtype=torch.float64)])
    b_next = torch.cat([formulation.b(t[1:]).to(torch.float64), torch.zeros(1, dtype=torch.float64)])
    return a_next, b_next


class Denoiser:
    """The backbone with guidance at the grid times t (float64, from t_max down), for one batch.

    `output(z, i)` is the guided raw network output at (z, t[i]); `coefficients` are (p, q, r, s) at t, so that
    x0_hat = p[i] z + q[i] out and eps_hat = r[i] z + s[i] out. `calls` counts network evaluations (NFE).
    """

    def __init__(self, backbone: Backbone, formulation: Formulation, t: Tensor, context: Tensor, pooled: Tensor,
                 cfg_scale: float, dtype: torch.dtype, device: torch.device):
        self.backbone, self.formulation, self.t = backbone, formulation, t.to(torch.float64)
        self.coefficients = conversion_coefficients(formulation, self.t)
        self.cfg_scale, self.dtype, self.calls = cfg_scale, dtype, 0
        self.c_in = formulation.c_in(self.t).to(torch.float64).tolist()
        n = context.shape[0]
        self.guided = cfg_scale != 1.0
        if self.guided:  # both halves in one batched forward: [cond; uncond], uncond = zeroed text (ARCHITECTURE)
            context = torch.cat([context, torch.zeros_like(context)])
            pooled = torch.cat([pooled, torch.zeros_like(pooled)])
        self.context, self.pooled = context, pooled
        c_noise = formulation.c_noise(self.t).to(torch.float64)[:, None].expand(len(self.t), 2 * n if self.guided else n)
        self.c_noise = c_noise.to(device=device, dtype=dtype)  # one transfer for all steps

    def output(self, z: Tensor, i: int) -> Tensor:
        """The guided raw network output at (z, t[i])."""
        self.calls += 1
        x_in = z if self.c_in[i] == 1.0 else z * self.c_in[i]
        if self.guided:
            x_in = torch.cat([x_in, x_in])
        out = self.backbone(x_in, self.c_noise[i], self.context, self.pooled).to(self.dtype)
        if self.guided:
            cond, uncond = out.chunk(2)
            out = torch.lerp(uncond, cond, self.cfg_scale)  # uncond + w (cond - uncond)
        return out
