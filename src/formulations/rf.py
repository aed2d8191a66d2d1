"""Rectified flow: z_t = (1 - t) x0 + t eps, velocity prediction v = eps - x0 (paper section 2, eq. 1-3).

The loss is ||v_hat - v||^2 with t drawn from a timestep density (densities.py). Since
eps_hat - eps = (1 - t) (v_hat - v), the eps-space weight is w_eps = 1 / (1 - t)^2.
Nothing rf uses is singular at t = 1 (x0_hat = z - v_hat, eps_hat = z), so t_max = 1 and the sampler starts
from pure noise as in the paper; only w_eps(1) and log_snr are infinite there, their true limits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Formulation, expand_like, mean_flat
from .densities import CosMap, LogitNormal, Mode, TimestepDensity, Uniform
from .schedules import RFTimeAxis

#: Training times are kept in the open interval (0, 1) (docs/design.md#public-names): the float32 spacing below 1.
_OPEN = 2.0**-24


class RectifiedFlow(RFTimeAxis, Formulation):
    """Rectified flow with velocity prediction and a timestep density pi(t)."""

    t_min = 0.0
    t_max = 1.0

    def __init__(self, timestep_density: TimestepDensity):
        self.timestep_density = timestep_density

    @property
    def name(self) -> str:
        d = self.timestep_density
        return "rf" if isinstance(d, Uniform) else f"rf/{d.name}"

    @property
    def family(self) -> str:
        d = self.timestep_density
        return "rf" if isinstance(d, Uniform) else f"rf_{d.key}"

    def params(self) -> dict[str, float]:
        return self.timestep_density.params()

    # ---- process ----
    def a(self, t: Tensor) -> Tensor:
        return 1 - t

    def b(self, t: Tensor) -> Tensor:
        return t

    # ---- training-time distribution ----
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.timestep_density.sample(n, generator).float().clamp(_OPEN, 1 - _OPEN)

    def density(self, t: Tensor) -> Tensor:
        """The timestep density pi(t)."""
        return self.timestep_density.density(t)

    # ---- parameterisation ----
    def c_noise(self, t: Tensor) -> Tensor:
        return t

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def to_x0_eps(self, output: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = expand_like(t, z_t)
        return z_t - t * output, z_t + (1 - t) * output

    # ---- loss ----
    def loss(self, output: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return mean_flat((output - (eps - x0)) ** 2)

    def w_eps(self, t: Tensor) -> Tensor:
        return 1 / (1 - t) ** 2


# ---- family builders (keyword names == conf/loss/<family>.yaml keys) ----


def rf() -> RectifiedFlow:
    """rf: uniform timestep density."""
    return RectifiedFlow(Uniform())


def rf_lognorm(m: float, s: float) -> RectifiedFlow:
    """rf/lognorm(m, s): logit-normal timestep density."""
    return RectifiedFlow(LogitNormal(m, s))


def rf_mode(s: float) -> RectifiedFlow:
    """rf/mode(s): mode sampling with heavy tails."""
    return RectifiedFlow(Mode(s))


def rf_cosmap() -> RectifiedFlow:
    """rf/cosmap: the cosine schedule's log-SNR mapped onto rf."""
    return RectifiedFlow(CosMap())
