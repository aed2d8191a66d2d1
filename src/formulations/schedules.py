"""Noise schedules sigma(t) = b_t / a_t and their inverses (docs/formulations.md#formulation-families).

- rf axis: a = 1 - t, b = t, sigma = t / (1 - t) (rectified flow; also EDM's time axis here).
- cosine: a = cos(pi t / 2), b = sin(pi t / 2), sigma = tan(pi t / 2).
- linear: the LDM "scaled linear" discrete schedule, abar_i for i = 0..T-1, on continuous t = i / (T - 1)
  by linear interpolation of log(abar) between levels (Decision, so t_from_sigma is an exact inverse).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

#: Decision: where sigma reaches 0 or inf at an end of [0, 1] (cosine, EDM), t is clipped to the times with
#: sigma in [SIGMA_MIN, SIGMA_MAX] (log-SNR within +-13.8). This keeps x0_hat, eps_hat, c_noise and w_eps
#: finite and, for edm(Pm, Ps), cuts off less than 0.1% of ln sigma ~ N(Pm, Ps^2) for every paper setting.
SIGMA_MIN = 1e-3
SIGMA_MAX = 1e3


def float32_inward(t_min: float, t_max: float) -> tuple[float, float]:
    """The float32 values nearest to [t_min, t_max] from inside, so float32 times clip exactly into it."""
    lo, hi = np.float32(t_min), np.float32(t_max)
    lo = lo if float(lo) >= t_min else np.nextafter(lo, np.float32(1))
    hi = hi if float(hi) <= t_max else np.nextafter(hi, np.float32(0))
    return float(lo), float(hi)


#: Clipped time ranges: sigma = t / (1 - t) and sigma = tan(pi t / 2) restricted to [SIGMA_MIN, SIGMA_MAX].
RF_AXIS_RANGE = float32_inward(SIGMA_MIN / (1 + SIGMA_MIN), SIGMA_MAX / (1 + SIGMA_MAX))
COS_RANGE = float32_inward(2 / math.pi * math.atan(SIGMA_MIN), 2 / math.pi * math.atan(SIGMA_MAX))

# ---- rf axis --------------------------------------------------------------------------------------


def rf_sigma(t: Tensor) -> Tensor:
    """sigma = t / (1 - t); inf at t = 1."""
    return t / (1 - t)


def rf_t_from_sigma(sigma: Tensor) -> Tensor:
    """t = sigma / (1 + sigma); 1 at sigma = inf."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


# ---- cosine ---------------------------------------------------------------------------------------


def cos_a(t: Tensor) -> Tensor:
    """a_t = cos(pi t / 2)."""
    return torch.cos(math.pi * t / 2)


def cos_b(t: Tensor) -> Tensor:
    """b_t = sin(pi t / 2)."""
    return torch.sin(math.pi * t / 2)


def cos_sigma(t: Tensor) -> Tensor:
    """sigma = tan(pi t / 2)."""
    return torch.tan(math.pi * t / 2)


def cos_t_from_sigma(sigma: Tensor) -> Tensor:
    """t = (2 / pi) atan(sigma)."""
    return torch.atan(sigma) * (2 / math.pi)


class CosineSchedule:
    """a = cos(pi t / 2), b = sin(pi t / 2) on t in [t_min, t_max] (sigma in [SIGMA_MIN, SIGMA_MAX])."""

    t_min, t_max = COS_RANGE
    a = staticmethod(cos_a)
    b = staticmethod(cos_b)
    sigma = staticmethod(cos_sigma)
    t_from_sigma = staticmethod(cos_t_from_sigma)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U(t_min, t_max), float32."""
        device = generator.device if generator is not None else None
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return (self.t_min + (self.t_max - self.t_min) * u).float().clamp(self.t_min, self.t_max)


# ---- linear ("scaled linear", Stable Diffusion's values) ------------------------------------------

BETA_START = 0.00085
BETA_END = 0.012
NUM_LEVELS = 1000


def scaled_linear_log_abar(
    beta_start: float = BETA_START, beta_end: float = BETA_END, levels: int = NUM_LEVELS
) -> Tensor:
    """log abar_i, i = 0..levels-1, float64: beta_i = (sqrt(b0) + i/(T-1) (sqrt(b1) - sqrt(b0)))^2."""
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), levels, dtype=torch.float64) ** 2
    return torch.cumsum(torch.log1p(-betas), dim=0)


class LinearSchedule:
    """The discrete scaled-linear schedule on continuous t (log abar piecewise linear in t).

    abar stays in [0.0047, 0.9992] on [0, 1], so nothing is singular: t_min = 0, t_max = 1.
    """

    t_min = 0.0
    t_max = 1.0

    def __init__(self, beta_start: float = BETA_START, beta_end: float = BETA_END, levels: int = NUM_LEVELS):
        self.levels = levels
        self.log_abar_table = scaled_linear_log_abar(beta_start, beta_end, levels)
        self._tables: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._tables:
            self._tables[device] = self.log_abar_table.to(device)
        return self._tables[device]

    def log_abar(self, t: Tensor) -> Tensor:
        """log abar at continuous t in [0, 1] (float64), exact at t = i / (T - 1)."""
        table = self._table(t.device)
        x = t.double().clamp(0, 1) * (self.levels - 1)
        i = x.floor().clamp(max=self.levels - 2).long()
        frac = x - i
        return table[i] + frac * (table[i + 1] - table[i])

    def a(self, t: Tensor) -> Tensor:
        """a_t = sqrt(abar_t)."""
        return torch.exp(0.5 * self.log_abar(t)).to(t.dtype)

    def b(self, t: Tensor) -> Tensor:
        """b_t = sqrt(1 - abar_t)."""
        return torch.sqrt(-torch.expm1(self.log_abar(t))).to(t.dtype)

    def sigma(self, t: Tensor) -> Tensor:
        """sigma = sqrt((1 - abar) / abar)."""
        la = self.log_abar(t)
        return torch.sqrt(-torch.expm1(la) / torch.exp(la)).to(t.dtype)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Exact inverse of sigma(t) on [0, 1]; sigma outside the schedule's range maps to t = 0 or 1."""
        table = self._table(sigma.device)
        y = -torch.log1p(sigma.double() ** 2)  # log abar = -log(1 + sigma^2), decreasing in t
        y = y.clamp(table[-1], table[0])
        neg = -table  # increasing
        i = torch.searchsorted(neg, -y, right=True).clamp(1, self.levels - 1) - 1
        frac = (y - table[i]) / (table[i + 1] - table[i])
        return ((i + frac) / (self.levels - 1)).clamp(0, 1).to(sigma.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n times drawn uniformly from the T discrete levels t = i / (T - 1), float32."""
        device = generator.device if generator is not None else None
        i = torch.randint(0, self.levels, (n,), generator=generator, device=device)
        return i.to(torch.float32) / (self.levels - 1)


class RFTimeAxis:
    """Mixin: the time axis of rectified flow, sigma = t / (1 - t), so t is its own RF-equivalent time.

    Shared by rf and by the EDM families placed on that axis (edm(Pm, Ps), edm/rf).
    """

    def sigma(self, t):
        return rf_sigma(t)

    def t_from_sigma(self, sigma):
        return rf_t_from_sigma(sigma)

    def rf_time(self, t):
        return t

    def t_from_rf_time(self, tau):
        return tau
