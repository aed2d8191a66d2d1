"""Variance-preserving diffusion: eps- and v-prediction on the linear and cosine schedules (docs/formulations.md#variance-preserving-diffusion).

z_t = a_t x0 + b_t eps with a_t^2 + b_t^2 = 1. eps-prediction (Ho et al. 2020) trains ||eps_hat - eps||^2
(w_eps = 1); v-prediction (Salimans & Ho 2022) predicts v = a eps - b x0 and trains ||v_hat - v||^2, with
eps_hat - eps = a_t (v_hat - v), so w_eps = 1 / a_t^2. Linear: t uniform over the T discrete levels;
cosine: t ~ U(t_min, t_max) (margins in schedules.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Formulation, expand_like, mean_flat
from .schedules import CosineSchedule, LinearSchedule

PREDICTIONS = ("eps", "v")
SCHEDULES = {"linear": LinearSchedule, "cos": CosineSchedule}


class VPDiffusion(Formulation):
    """VP diffusion with `prediction` in {"eps", "v"} on `schedule` in {"linear", "cos"}."""

    def __init__(self, prediction: str, schedule: str):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is not allowed; choose one of {list(PREDICTIONS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not allowed; choose one of {list(SCHEDULES)}")
        self.prediction = prediction
        self.schedule_name = schedule
        self.schedule = SCHEDULES[schedule]()
        self.t_min = self.schedule.t_min
        self.t_max = self.schedule.t_max

    @property
    def name(self) -> str:
        return f"{self.prediction}/{self.schedule_name}"

    @property
    def family(self) -> str:
        return f"{self.prediction}_{self.schedule_name}"

    def params(self) -> dict[str, float]:
        return {}

    # ---- process ----
    def a(self, t: Tensor) -> Tensor:
        return self.schedule.a(t)

    def b(self, t: Tensor) -> Tensor:
        return self.schedule.b(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.schedule.sigma(t)

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        return self.schedule.t_from_sigma(sigma)

    # ---- training-time distribution ----
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.schedule.sample(n, generator)

    # ---- parameterisation ----
    def c_noise(self, t: Tensor) -> Tensor:
        return t  # linear: t = i / (T - 1)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return eps
        a, b = expand_like(self.a(t), x0), expand_like(self.b(t), x0)
        return a * eps - b * x0

    def to_x0_eps(self, output: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        a, b = expand_like(self.a(t), z_t), expand_like(self.b(t), z_t)
        if self.prediction == "eps":
            return (z_t - b * output) / a, output
        return a * z_t - b * output, b * z_t + a * output  # uses a^2 + b^2 = 1

    # ---- loss ----
    def loss(self, output: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return mean_flat((output - self.target(x0, eps, t)) ** 2)

    def w_eps(self, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return torch.ones_like(t)
        return 1 / self.a(t) ** 2


# ---- family builders ----


def eps_linear() -> VPDiffusion:
    """eps/linear: eps-prediction, scaled-linear schedule (LDM)."""
    return VPDiffusion("eps", "linear")


def v_linear() -> VPDiffusion:
    """v/linear: v-prediction, scaled-linear schedule."""
    return VPDiffusion("v", "linear")


def eps_cos() -> VPDiffusion:
    """eps/cos: eps-prediction, cosine schedule."""
    return VPDiffusion("eps", "cos")


def v_cos() -> VPDiffusion:
    """v/cos: v-prediction, cosine schedule."""
    return VPDiffusion("v", "cos")
