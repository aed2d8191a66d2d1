"""The samplers by name (conf/sampler/<name>.yaml): a solver and a grid, k-diffusion style.

| name      | solver | grid    | network evaluations per sample (x2 batch with CFG) |
|-----------|--------|---------|-----------------------------------------------------|
| rf_time   | Euler  | rf_time | steps (the default; docs/sampling.md#sampler)                         |
| native    | Euler  | native  | steps (Euler/DDIM in each family's own time)        |
| heun      | Heun   | rf_time | 2 steps - 1                                         |

A new sampler is a solver function (denoiser, z) -> x0_hat, or a grid function, plus one line in SAMPLERS.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from src.formulations.base import Formulation
from src.sampling.denoiser import Backbone, Denoiser, check_sample_args
from src.sampling.euler import euler
from src.sampling.grids import GRIDS, Grid
from src.sampling.heun import heun

Solver = Callable[[Denoiser, Tensor], Tensor]


class Sampler(NamedTuple):
    solver: Solver
    grid: Grid
    nfe: Callable[[int], int]  # network evaluations per sample for `steps` steps


SAMPLERS: dict[str, Sampler] = {
    "rf_time": Sampler(euler, GRIDS["rf_time"], lambda steps: steps),
    "native": Sampler(euler, GRIDS["native"], lambda steps: steps),
    "heun": Sampler(heun, GRIDS["rf_time"], lambda steps: 2 * steps - 1),
}


def get_sampler(name: str) -> Sampler:
    """The sampler called `name`, or a one-line ValueError naming the setting and the allowed names."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"sampler={name!r} is not allowed; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_nfe(name: str, steps: int) -> int:
    """Network evaluations per sample (per guided pair with CFG) of sampler `name` at `steps` steps."""
    return get_sampler(name).nfe(steps)


def sampler_times(name: str, formulation: Formulation, steps: int, shift: float = 1.0) -> Tensor:
    """The formulation's t at each grid point of sampler `name` (float64, from t_max down; then the data)."""
    return get_sampler(name).grid(formulation, steps, shift)


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
    sampler: str = "rf_time",
) -> Tensor:
    """Sample from z = b(t_max) noise to the data with guidance scale cfg_scale; returns x0_hat.

    `sampler` names a solver and a grid (SAMPLERS); the default is the shared Euler sampler (docs/sampling.md#sampler).
    """
    solver, grid, _ = get_sampler(sampler)
    check_sample_args(noise, context, pooled, cfg_scale)
    t = grid(formulation, steps, shift)
    denoiser = Denoiser(backbone, formulation, t, context, pooled, cfg_scale, noise.dtype, noise.device)
    z = float(formulation.b(t[:1])[0]) * noise
    return solver(denoiser, z)
