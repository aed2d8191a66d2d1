"""An example of a training formulation defined outside flowsweep: rf/power(k), rectified flow whose training times
are t = u^(1/k), u ~ U(0, 1), i.e. the timestep density pi(t) = k t^(k - 1) (k > 1 puts more weight near noise).

A loss configuration names its builder by import path (conf/loss/rf_power.yaml here: `family: rf_power:rf_power`);
the module must be importable where the job runs. Run it next to the built-in recipes with

    PYTHONPATH=docs/examples python -m src.run --config-dir docs/examples/conf -m loss=rf_power,rf_lognorm

When it is built, flowsweep checks that it satisfies what every formulation must (src/formulations/checks.py): the
loss identity, the x0/eps seam, reproducible training times, RF-equivalent time (docs/formulations.md#adding-a-family).
"""

import torch

from src.formulations import format_param
from src.formulations.densities import TimestepDensity, check_real
from src.formulations.rf import RectifiedFlow


class Power(TimestepDensity):
    """pi(t) = k t^(k - 1) on [0, 1]: t = u^(1/k)."""

    key = "power"  # RectifiedFlow names the family rf_power and the recipe rf/power(k)

    def __init__(self, k: float):
        self.k = check_real("rf_power", "k", k)
        if self.k <= 0:
            raise ValueError(f"rf_power: k={k!r} is not allowed; k must be > 0")

    @property
    def name(self) -> str:
        return f"power({format_param(self.k)})"

    def params(self) -> dict[str, float]:
        return {"k": self.k}

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)  # the generator: reproducible training
        return u ** (1.0 / self.k)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        inside = (t >= 0) & (t <= 1)
        return torch.where(inside, self.k * t.clamp(0, 1) ** (self.k - 1), torch.zeros_like(t))


def rf_power(k: float) -> RectifiedFlow:
    """The builder: its keyword arguments are the family's parameters (the keys of conf/loss/rf_power.yaml)."""
    return RectifiedFlow(Power(k))
