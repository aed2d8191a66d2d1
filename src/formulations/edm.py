"""EDM (Karras et al. 2022): z = x0 + sigma eps, preconditioned denoiser D, weighted ||D - x0||^2 (docs/formulations.md#edm-preconditioning).

D(z; sigma) = c_skip z + c_out F(c_in z; c_noise) with sigma_data = 0.5. The loss weight lambda(sigma) on
||D - x0||^2 is per family; since D - x0 = -sigma (eps_hat - eps), w_eps = lambda sigma^2.
Decision: EDM lives on a time axis t in [0, 1] with sigma(t) = t / (1 - t) (edm, edm/rf, the RF-equivalent
time) or tan(pi t / 2) (edm/cos), clipped to sigma in [SIGMA_MIN, SIGMA_MAX] (schedules.py).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import Tensor

from .base import Formulation, expand_like, format_param, mean_flat
from .densities import check_real
from .schedules import (
    COS_RANGE,
    RF_AXIS_RANGE,
    SIGMA_MAX,
    SIGMA_MIN,
    cos_sigma,
    cos_t_from_sigma,
    RFTimeAxis,
)

SIGMA_DATA = 0.5


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


class EDMBase(Formulation):
    """EDM process and preconditioning; subclasses choose sigma(t), the t-density and lambda(sigma)."""

    sigma_data = SIGMA_DATA

    # ---- process: a = 1, b = sigma ----
    def a(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def b(self, t: Tensor) -> Tensor:
        return self.sigma(t)

    def _uniform_t(self, n: int, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else None
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        return self.clip_t((self.t_min + (self.t_max - self.t_min) * u).float())

    # ---- preconditioning (Karras et al. 2022, Table 1) ----
    def c_skip(self, t: Tensor) -> Tensor:
        """c_skip = sd^2 / (sigma^2 + sd^2)."""
        return self.sigma_data**2 / (self.sigma(t) ** 2 + self.sigma_data**2)

    def c_out(self, t: Tensor) -> Tensor:
        """c_out = sigma sd / sqrt(sigma^2 + sd^2)."""
        s = self.sigma(t)
        return s * self.sigma_data / torch.sqrt(s**2 + self.sigma_data**2)

    def c_in(self, t: Tensor) -> Tensor:
        """c_in = 1 / sqrt(sigma^2 + sd^2)."""
        return 1 / torch.sqrt(self.sigma(t) ** 2 + self.sigma_data**2)

    def c_noise(self, t: Tensor) -> Tensor:
        """c_noise = ln(sigma) / 4."""
        return torch.log(self.sigma(t)) / 4

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """F target = (x0 - c_skip z) / c_out, so that D = x0."""
        z = x0 + expand_like(self.sigma(t), x0) * eps
        return (x0 - expand_like(self.c_skip(t), x0) * z) / expand_like(self.c_out(t), x0)

    def to_x0_eps(self, output: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s = expand_like(self.sigma(t), z_t)
        d = self.sigma_data
        x0_hat = expand_like(self.c_skip(t), z_t) * z_t + expand_like(self.c_out(t), z_t) * output
        # eps_hat = (z - D) / sigma, written without the cancellation of z - D at small sigma.
        eps_hat = s * z_t / (s**2 + d**2) - d * output / torch.sqrt(s**2 + d**2)
        return x0_hat, eps_hat

    # ---- loss ----
    @abstractmethod
    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma), the weight on ||D - x0||^2."""

    def loss(self, output: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        # lambda ||D - x0||^2 = lambda c_out^2 ||F - F_target||^2 (bounded factor, no cancellation).
        weight = self.loss_weight(self.sigma(t)) * self.c_out(t) ** 2
        return weight * mean_flat((output - self.target(x0, eps, t)) ** 2)

    def w_eps(self, t: Tensor) -> Tensor:
        s = self.sigma(t)
        return self.loss_weight(s) * s**2


class EDMRFAxis(RFTimeAxis, EDMBase):
    """EDM with sigma(t) = t / (1 - t), t clipped to sigma in [SIGMA_MIN, SIGMA_MAX]."""

    t_min, t_max = RF_AXIS_RANGE


class EDM(EDMRFAxis):
    """edm(Pm, Ps): ln sigma ~ N(Pm, Ps^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022)."""

    family = "edm"

    def __init__(self, p_mean: float, p_std: float):
        self.p_mean = check_real("edm", "p_mean", p_mean)
        self.p_std = check_real("edm", "p_std", p_std)
        if self.p_std <= 0:
            raise ValueError(f"edm: p_std={p_std!r} is not allowed; p_std must be > 0")

    @property
    def name(self) -> str:
        return f"edm({format_param(self.p_mean)}, {format_param(self.p_std)})"

    def params(self) -> dict[str, float]:
        return {"p_mean": self.p_mean, "p_std": self.p_std}

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """ln sigma ~ N(Pm, Ps^2) truncated to [ln SIGMA_MIN, ln SIGMA_MAX] (inverse CDF), t = sigmoid(ln sigma)."""
        device = generator.device if generator is not None else None
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        lo, hi = (_normal_cdf((math.log(s) - self.p_mean) / self.p_std) for s in (SIGMA_MIN, SIGMA_MAX))
        ln_sigma = self.p_mean + self.p_std * torch.special.ndtri(lo + (hi - lo) * u)
        return self.clip_t(torch.sigmoid(ln_sigma).float())

    def loss_weight(self, sigma: Tensor) -> Tensor:
        d = self.sigma_data
        return (sigma**2 + d**2) / (sigma * d) ** 2


class EDMRF(EDMRFAxis):
    """edm/rf: sigma = t / (1 - t), t ~ U, lambda = (1 + sigma)^2 / sigma^2 (w_eps equals rf's)."""

    family = "edm_rf"
    name = "edm/rf"

    def params(self) -> dict[str, float]:
        return {}

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self._uniform_t(n, generator)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return (1 + sigma) ** 2 / sigma**2


class EDMCos(EDMBase):
    """edm/cos: sigma = tan(pi t / 2), t ~ U, lambda = (1 + sigma^2) / sigma^2 (w_eps equals v/cos's)."""

    family = "edm_cos"
    name = "edm/cos"
    t_min, t_max = COS_RANGE

    def params(self) -> dict[str, float]:
        return {}

    def sigma(self, t: Tensor) -> Tensor:
        return cos_sigma(t)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return cos_t_from_sigma(sigma)

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self._uniform_t(n, generator)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        return (1 + sigma**2) / sigma**2


# ---- family builders ----


def edm(p_mean: float, p_std: float) -> EDM:
    """edm(Pm, Ps): EDM with log-normal noise levels."""
    return EDM(p_mean, p_std)


def edm_rf() -> EDMRF:
    """edm/rf: EDM matching rf's log-SNR weighting."""
    return EDMRF()


def edm_cos() -> EDMCos:
    """edm/cos: EDM matching v/cos's log-SNR weighting."""
    return EDMCos()
