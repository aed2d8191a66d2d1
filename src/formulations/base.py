"""The interface every training formulation implements (docs/formulations.md#conventions).

A formulation is the forward process z_t = a_t x0 + b_t eps, a training-time density over t, what the
network predicts, and the loss. Everything downstream (the LightningModule, the sampler, the validation
loss, the weighting checks) talks to a formulation only through this class, and mostly through one seam:
`to_x0_eps`, the conversion of the network output into (x0_hat, eps_hat).

Conventions: t in [0, 1], t = 0 is data, t = 1 is noise. Tensors of times have shape (B,); data tensors
have shape (B, ...). Pure torch: no Lightning or Hydra here.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def check_shift(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"shift must be a finite number > 0 (1.0 = no shift), got {alpha!r}")
    return value


def shift_time(t: Tensor | float, alpha: float) -> Tensor | float:
    """Timestep shift t_m = alpha t / (1 + (alpha - 1) t) (paper section 5.3.2, docs/sampling.md#timestep-shift);
    the identity at alpha = 1."""
    alpha = check_shift(alpha)
    return alpha * t / (1.0 + (alpha - 1.0) * t)


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (B,) tensor so it broadcasts against x of shape (B, ...)."""
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension."""
    return x.flatten(1).mean(dim=1)


class Formulation(ABC):
    """One training formulation: process (a_t, b_t), timestep density, parameterisation and loss."""

    #: Times are clipped to [t_min, t_max] where the process is singular at an end (docs/formulations.md#clipping-at-the-ends).
    t_min: float = 0.0
    t_max: float = 1.0

    # ---- identity -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def name(self) -> str:
        """The paper's name, e.g. "rf/lognorm(0.00, 1.00)" or "edm(-1.20, 1.20)"."""

    @property
    @abstractmethod
    def family(self) -> str:
        """The family key, e.g. "rf_lognorm", "edm", "eps_linear" (also the conf/loss file name)."""

    @abstractmethod
    def params(self) -> dict[str, float]:
        """The family parameters that, with `family`, rebuild this formulation."""

    @property
    def slug(self) -> str:
        """Filesystem-safe name: family and two-decimal parameters, e.g. "rf_lognorm_0.50_0.60"."""
        return "_".join([self.family, *(format_param(v) for v in self.params().values())])

    # ---- forward process ------------------------------------------------------------------------
    @abstractmethod
    def a(self, t: Tensor) -> Tensor:
        """Signal coefficient a_t."""

    @abstractmethod
    def b(self, t: Tensor) -> Tensor:
        """Noise coefficient b_t."""

    def sigma(self, t: Tensor) -> Tensor:
        """Noise-to-signal ratio b_t / a_t."""
        return self.b(t) / self.a(t)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda_t = log(a_t^2 / b_t^2)."""
        return -2.0 * torch.log(self.sigma(t))

    @abstractmethod
    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Inverse of sigma(t): the time at which this process has noise-to-signal ratio sigma."""

    def rf_time(self, t: Tensor) -> Tensor:
        """RF-equivalent time tau = sigma / (1 + sigma), the common axis of all formulations."""
        a, b = self.a(t), self.b(t)
        return b / (a + b)  # = sigma / (1 + sigma), finite where a_t = 0

    def t_from_rf_time(self, tau: Tensor) -> Tensor:
        """The time with the same log-SNR as rectified flow at tau."""
        return self.t_from_sigma(tau / (1.0 - tau))

    def shift_t(self, t: Tensor, alpha: float) -> Tensor:
        """Times under the resolution-dependent shift (paper section 5.3.2), for training: the shift acts on
        RF-equivalent time, tau -> alpha tau / (1 + (alpha - 1) tau), which lowers every log-SNR by 2 log alpha, the
        same for every family; the result is kept in [t_min, t_max]. The identity at alpha = 1."""
        if check_shift(alpha) == 1.0:
            return t
        tau = self.rf_time(t.double())
        return self.clip_t(self.t_from_rf_time(shift_time(tau, alpha))).to(t.dtype)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """z_t = a_t x0 + b_t eps."""
        return expand_like(self.a(t), x0) * x0 + expand_like(self.b(t), x0) * eps

    # ---- training-time distribution ---------------------------------------------------------------
    @abstractmethod
    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n training times, a float32 tensor of shape (n,) inside [t_min, t_max]."""

    # ---- network parameterisation -----------------------------------------------------------------
    def c_in(self, t: Tensor) -> Tensor:
        """Scale applied to z_t before the backbone (EDM preconditioning; 1 elsewhere)."""
        return torch.ones_like(t)

    @abstractmethod
    def c_noise(self, t: Tensor) -> Tensor:
        """The backbone's time input, O(1); the backbone embeds 1000 * c_noise (diffusers' convention)."""

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network regresses onto in the native loss (v, eps, or the EDM F target)."""

    @abstractmethod
    def to_x0_eps(self, output: Tensor, z_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Convert the raw backbone output at (z_t, t) into (x0_hat, eps_hat)."""

    # ---- loss -------------------------------------------------------------------------------------
    @abstractmethod
    def loss(self, output: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Per-sample native loss, shape (B,), mean over non-batch dimensions."""

    @abstractmethod
    def w_eps(self, t: Tensor) -> Tensor:
        """Weight with loss == w_eps(t) * mean ||eps_hat - eps||^2 per sample (paper, eq. for L_w)."""

    # ---- helpers ----------------------------------------------------------------------------------
    def clip_t(self, t: Tensor) -> Tensor:
        """Clamp times to [t_min, t_max]."""
        return t.clamp(self.t_min, self.t_max)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def format_param(x: float) -> str:
    """Two decimals, as the paper prints recipe names; -0.00 prints as 0.00."""
    s = f"{x:.2f}"
    return "0.00" if s == "-0.00" else s


def validation_times(formulation: Formulation, levels: int = 8) -> Tensor:
    """docs/evaluation.md#validation-loss: `levels` equally spaced t in [0, 1], clipped to [t_min, t_max], float32."""
    if levels < 2:
        raise ValueError(f"validation_times: levels={levels!r} is not allowed; levels must be >= 2")
    return formulation.clip_t(torch.linspace(0.0, 1.0, levels, dtype=torch.float32))

