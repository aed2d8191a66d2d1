"""What every formulation must satisfy, checked on a built one (docs/formulations.md#adding-a-family).

The test suite checks these properties for the 61 recipes; a family defined outside this repository
(`family: module:builder`, registry.py) is checked with the same function when it is first built, so a sign error
or a missing weight is a one-line configuration error before any training, not a silently wrong entry in a ranking.
Small float64 tensors, milliseconds. Pure torch: no Lightning or Hydra here.
"""

from __future__ import annotations

import re

import torch

from .base import Formulation

#: Relative tolerance of the identities in float64 (the built-in families meet them to ~1e-12).
RTOL = 1e-6


def _close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float = 1.0) -> float:
    """Largest |a - b| relative to max(scale, 1): 0 when equal, inf when not finite."""
    diff = (a - b).abs().max()
    return float(diff / max(float(torch.as_tensor(scale).abs().max()), 1.0)) if torch.isfinite(diff) else float("inf")


def formulation_errors(f: Formulation, n: int = 64) -> list[str]:
    """The properties `f` breaks, each as a short phrase (empty when it satisfies all):
    - its identity: a name, a family key usable in file names, params() that are numbers;
    - sample_t: n float32 times in [t_min, t_max], the same for the same generator seed;
    - coefficients finite on those times (a, b, sigma, c_in, c_noise, w_eps);
    - the true target gives back x0 and eps through to_x0_eps (the seam the sampler and validation use);
    - the loss identity: loss(output) = w_eps(t) * mean (eps_hat - eps)^2 for any output;
    - RF-equivalent time: rf_time = sigma / (1 + sigma), and t_from_rf_time inverts it.
    """
    errors = []
    name, family = getattr(f, "name", None), getattr(f, "family", None)
    if not isinstance(name, str) or not name:
        errors.append(f"name is {name!r}, not a non-empty string")
    elif " [" in name:  # the report reads "rf/x [seed=1]" as seed 1 of rf/x, "edm(0.00, 1.20) [a]" as edm
        errors.append(f"name is {name!r}: ' [' opens the rank report's qualifiers (rf [sampler=heun, seed=1]), as "
                      "which it would read the part in brackets")
    if not isinstance(family, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", family):
        errors.append(f"family is {family!r}, not a key of letters, digits and '_' (it names run directories)")
    params = f.params()
    if not isinstance(params, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in params.values()):
        errors.append(f"params() is {params!r}, not a dict of numbers")
    t = f.sample_t(n, torch.Generator().manual_seed(0))
    if not (isinstance(t, torch.Tensor) and t.shape == (n,) and t.dtype == torch.float32):
        return errors + [f"sample_t({n}) gives {type(t).__name__} {getattr(t, 'shape', '')} "
                         f"{getattr(t, 'dtype', '')}, not a float32 tensor of shape ({n},)"]
    if not torch.equal(t, f.sample_t(n, torch.Generator().manual_seed(0))):
        errors.append("sample_t gives other times for the same generator seed (training would not be reproducible)")
    if not (torch.isfinite(t).all() and (t >= f.t_min).all() and (t <= f.t_max).all()):
        errors.append(f"sample_t gives times outside [t_min, t_max] = [{f.t_min}, {f.t_max}]: "
                      f"{float(t.min()):.4g} to {float(t.max()):.4g}")
        return errors
    for fn in (f.a, f.b, f.sigma, f.c_in, f.c_noise, f.w_eps):
        if not torch.isfinite(fn(t)).all():
            errors.append(f"{fn.__name__}(t) is not finite at some sampled t")
    if errors:
        return errors
    g = torch.Generator().manual_seed(1)
    t = t.double()
    x0, eps, out = (torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    z = f.add_noise(x0, eps, t)
    x0_hat, eps_hat = f.to_x0_eps(f.target(x0, eps, t), z, t)
    recovered = max(_close(x0_hat, x0), _close(eps_hat, eps))
    if not recovered <= RTOL:
        errors.append(f"to_x0_eps(target(x0, eps, t)) does not give back x0 and eps (off by {recovered:.3g}): "
                      "target, to_x0_eps and add_noise disagree")
    _, eps_hat = f.to_x0_eps(out, z, t)
    expected = f.w_eps(t) * ((eps_hat - eps) ** 2).flatten(1).mean(1)
    loss = f.loss(out, x0, eps, t)
    if loss.shape != expected.shape:
        errors.append(f"loss gives shape {tuple(loss.shape)}, not ({n},): one value per sample")
    elif not (off := _close(loss, expected, expected)) <= RTOL:
        errors.append(f"loss is not w_eps(t) * mean (eps_hat - eps)^2 (relative difference {off:.3g}): the loss or "
                      "w_eps is wrong")
    interior = t[(t > f.t_min) & (t < f.t_max)]
    if not len(interior):
        return errors + [f"sample_t gives only the ends t_min, t_max = {f.t_min}, {f.t_max} in {n} draws"]
    sigma = f.sigma(interior)
    tau = f.rf_time(interior)
    off = max(_close(tau, sigma / (1 + sigma)), _close(f.t_from_rf_time(tau), interior),
              _close(f.t_from_sigma(sigma), interior))
    if not off <= RTOL:
        errors.append(f"rf_time is not sigma / (1 + sigma), or t_from_rf_time or t_from_sigma does not invert it "
                      f"(off by {off:.3g}): the sampler's time grid would be wrong")
    return errors


def check_formulation(f: Formulation, where: str = "") -> None:
    """ValueError in one line naming the formulation and every property it breaks (formulation_errors)."""
    errors = formulation_errors(f)
    if errors:
        label = f"{getattr(f, 'name', f)!s}" + (f" ({where})" if where else "")
        raise ValueError(f"formulation {label} breaks what every formulation must satisfy: {'; '.join(errors)} "
                         "(docs/formulations.md#adding-a-family)")
