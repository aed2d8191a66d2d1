"""An example of a sampler defined outside flowsweep: AB2, the two-step Adams-Bashforth method on the probability-flow
ODE, second order at one network evaluation per step (the linear multistep idea behind PLMS and DPM-Solver++(2M)).

A sampler configuration names it by import path (conf/sampler/ab2.yaml here: `name: ab2:AB2`); the module must be
importable where the job runs. Evaluate with it next to the built-in Euler sampler with

    PYTHONPATH=docs/examples python -m src.run --config-dir docs/examples/conf -m loss=rf_lognorm,eps_linear \
        sampler=rf_time,ab2

When it is first looked up, flowsweep checks that it satisfies what every sampler must (src/sampling/checks.py): its
grid, its number of network evaluations, and that it samples Gaussian data with the exact denoiser
(docs/sampling.md#adding-a-sampler).

The step works in RF-equivalent coordinates, tau = b / (a + b) and y = z / (a + b), where every formulation's ODE is
dy / dtau = v_hat = eps_hat - x0_hat (src/sampling/heun.py). With h = tau' - tau and the previous step's h_prev and
v_prev, the variable-step Adams-Bashforth update is y' = y + h (v + h / (2 h_prev) (v - v_prev)); the first step is
Euler's. At the last step (tau' = 0, a' + b' = 1) y' is the sample.
"""

import torch

from src.sampling import GRIDS, Denoiser, Sampler
from src.sampling.denoiser import next_process


def ab2(denoiser: Denoiser, z: torch.Tensor) -> torch.Tensor:
    """Integrate from z at the grid's first time to the data; one network evaluation per step."""
    f, t = denoiser.formulation, denoiser.t
    p, q, r, s = denoiser.coefficients  # x0_hat = p z + q out, eps_hat = r z + s out
    a, b = f.a(t).to(torch.float64), f.b(t).to(torch.float64)
    a_next, b_next = next_process(f, t)
    c, c_next = (a + b).tolist(), (a_next + b_next).tolist()
    h = (b_next / (a_next + b_next) - b / (a + b)).tolist()
    v_prev = None
    for i in range(len(t)):
        out = denoiser.output(z, i)
        v = (r[i] - p[i]).item() * z + (s[i] - q[i]).item() * out  # eps_hat - x0_hat
        # Euler's step first, and after a step of zero length (a grid clipped at t_min repeats its last time)
        slope = v if v_prev is None or h[i - 1] == 0 else v + (h[i] / (2 * h[i - 1])) * (v - v_prev)
        z = c_next[i] * (z / c[i] + h[i] * slope)
        v_prev = v
    return z


#: The sampler: the solver, the shared RF-time grid (eval.shift applies), one network evaluation per step.
AB2 = Sampler(ab2, GRIDS["rf_time"], lambda steps: steps)
