"""Timestep densities pi(t) for rectified flow (paper section 3.1, docs/formulations.md#timestep-densities-for-rf).

Each density draws training times with an optional torch.Generator and evaluates pi(t) on [0, 1].
Samples and densities are computed in float64. t = 0 is data, t = 1 is noise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .base import format_param

#: mode(s) is a valid (monotone) map for -1 <= s <= 2 / (pi - 2) (paper eq. 20).
MODE_S_MIN = -1.0
MODE_S_MAX = 2.0 / (math.pi - 2.0)


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else None
    return torch.rand(n, generator=generator, dtype=torch.float64, device=device)


def _inside(t: Tensor) -> Tensor:
    return (t >= 0) & (t <= 1)


def check_real(family: str, name: str, value: object) -> float:
    """A finite real parameter, else ValueError naming family, parameter and value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{family}: {name}={value!r} must be a finite real number")
    return float(value)


class TimestepDensity(ABC):
    """A density pi(t) over [0, 1] with a sampler."""

    #: Short key ("uniform", "lognorm", "mode", "cosmap"), used in family keys rf_<key>.
    key: str

    @property
    @abstractmethod
    def name(self) -> str:
        """Paper notation, e.g. "lognorm(0.00, 1.00)"."""

    def params(self) -> dict[str, float]:
        """Keyword parameters that rebuild this density."""
        return {}

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n float64 samples in [0, 1]."""

    @abstractmethod
    def density(self, t: Tensor) -> Tensor:
        """pi(t), zero outside [0, 1]."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Uniform(TimestepDensity):
    """t ~ U(0, 1), the plain rectified-flow density (= mode(0))."""

    key = "uniform"

    @property
    def name(self) -> str:
        return "uniform"

    def sample(self, n, generator=None):
        return _uniform(n, generator)

    def density(self, t):
        return torch.where(_inside(t), torch.ones_like(t), torch.zeros_like(t))


class LogitNormal(TimestepDensity):
    """Logit-normal: u ~ N(m, s^2), t = sigmoid(u) (paper eq. 19)."""

    key = "lognorm"

    def __init__(self, m: float, s: float):
        self.m = check_real("rf_lognorm", "m", m)
        self.s = check_real("rf_lognorm", "s", s)
        if self.s <= 0:
            raise ValueError(f"rf_lognorm: s={s!r} is not allowed; s must be > 0")

    @property
    def name(self):
        return f"lognorm({format_param(self.m)}, {format_param(self.s)})"

    def params(self):
        return {"m": self.m, "s": self.s}

    def sample(self, n, generator=None):
        device = generator.device if generator is not None else None
        u = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
        return torch.sigmoid(self.m + self.s * u)

    def density(self, t):
        t64 = t.double().clamp(1e-300, 1 - 1e-16)
        logit = torch.log(t64) - torch.log1p(-t64)
        p = torch.exp(-((logit - self.m) ** 2) / (2 * self.s**2)) / (
            self.s * math.sqrt(2 * math.pi) * t64 * (1 - t64)
        )
        inner = (t > 0) & (t < 1)
        return torch.where(inner, p, torch.zeros_like(p)).to(t.dtype)


class Mode(TimestepDensity):
    """Mode sampling with heavy tails: t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U (paper eq. 20)."""

    key = "mode"

    def __init__(self, s: float):
        self.s = check_real("rf_mode", "s", s)
        if not MODE_S_MIN <= self.s <= MODE_S_MAX:
            raise ValueError(
                f"rf_mode: s={s!r} is outside the allowed range [-1, 2/(pi-2) = {MODE_S_MAX:.4f}]"
            )

    @property
    def name(self):
        return f"mode({format_param(self.s)})"

    def params(self):
        return {"s": self.s}

    def f(self, u: Tensor) -> Tensor:
        """The monotone decreasing map u -> t, f(0) = 1, f(1) = 0."""
        return 1 - u - self.s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)

    def df(self, u: Tensor) -> Tensor:
        """f'(u) = -(1 + s) + s (pi / 2) sin(pi u), <= 0 on [0, 1] for valid s.

        sin(pi u) is evaluated as sin(pi min(u, 1 - u)), exactly 0 at both ends (sin(pi) in floating point is 1e-16):
        mode(-1)'s density, 1 / |f'|, is then +inf at t = 0 as at t = 1, not 5e15."""
        return -(1 + self.s) + self.s * (math.pi / 2) * torch.sin(math.pi * torch.minimum(u, 1 - u))

    def f_inverse(self, t: Tensor, tol: float = 1e-12) -> Tensor:
        """u with f(u) = t (no closed form): Newton safeguarded by bisection; t in [0, 1], float64.

        Stops once every step is below tol; the quadratic convergence leaves an error far below tol.
        """
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        u = 1 - t  # exact for s = 0
        for _ in range(200):
            r = self.f(u) - t
            right = r > 0  # f decreasing: the root lies right of u
            lo, hi = torch.where(right, u, lo), torch.where(right, hi, u)
            newton = torch.where(r == 0, u, u - r / self.df(u))
            inside = (newton >= lo) & (newton <= hi)  # false for the nan/inf steps where f' = 0
            u_next = torch.where(inside, newton, 0.5 * (lo + hi))
            done = bool(((u_next - u).abs() <= tol).all())
            u = u_next
            if done:
                break
        return u

    def sample(self, n, generator=None):
        return self.f(_uniform(n, generator)).clamp(0.0, 1.0)

    def density(self, t):
        t64 = t.double()
        u = self.f_inverse(t64.clamp(0.0, 1.0))
        p = 1.0 / self.df(u).abs()  # change of variables: pi(t) = |d f^-1(t) / dt|
        return torch.where(_inside(t64), p, torch.zeros_like(p)).to(t.dtype)


class CosMap(TimestepDensity):
    """CosMap: t = 1 - 1 / (tan(pi u / 2) + 1), u ~ U, density 2 / (pi (1 - 2t + 2t^2)) (paper eq. 21)."""

    key = "cosmap"

    @property
    def name(self):
        return "cosmap"

    def sample(self, n, generator=None):
        u = _uniform(n, generator)
        # 1 - 1/(tan + 1) = sin / (sin + cos): no overflow at u -> 1.
        s, c = torch.sin(math.pi * u / 2), torch.cos(math.pi * u / 2)
        return s / (s + c)

    def density(self, t):
        p = 2.0 / (math.pi * (1 - 2 * t + 2 * t**2))
        return torch.where(_inside(t), p, torch.zeros_like(p))
