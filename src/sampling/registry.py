"""The samplers by name (conf/sampler/<name>.yaml): a solver and a grid, k-diffusion style.

| name      | solver | grid    | network evaluations per sample (x2 batch with CFG) |
|-----------|--------|---------|-----------------------------------------------------|
| rf_time   | Euler  | rf_time | steps (the default; docs/sampling.md#sampler)                         |
| native    | Euler  | native  | steps (Euler/DDIM in each family's own time)        |
| heun      | Heun   | rf_time | 2 steps - 1                                         |

A new sampler is a solver function (denoiser, z) -> x0_hat, or a grid function, plus one line in SAMPLERS; or,
without changing this repository, a Sampler named by its import path, `name: package.module:NAME` in a sampler
configuration, checked against what every sampler must satisfy (checks.py) when it is first looked up.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from src.formulations.base import Formulation
from src.utils.plugins import IMPORT_PATH, import_object, module_digest
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
    """The sampler called `name` (built in, or an import path), or a one-line ValueError naming the setting."""
    if isinstance(name, str) and name in SAMPLERS:
        return SAMPLERS[name]
    if isinstance(name, str) and IMPORT_PATH.fullmatch(name):
        return _imported_sampler(name)
    raise ValueError(f"sampler={name!r} is not allowed; choose one of {', '.join(SAMPLERS)}, or "
                     "'package.module:NAME' for a Sampler defined outside this repository")


#: module name -> (the module as imported here, its code's digest then): a job samples with the code it imported
#: before its training, which the file may no longer be by the time the records are written.
_LOADED: dict[str, tuple[object, str]] = {}


@functools.cache
def _imported_sampler(path: str) -> Sampler:
    """The Sampler an import path names, checked once (checks.check_sampler); a one-line error when unusable."""
    from src.sampling.checks import check_sampler

    module_name = path.split(":", 1)[0]
    code = module_digest(module_name)  # the file about to run (or already imported, from an earlier lookup)
    sampler = import_object(path, "sampler")
    if module_name not in _LOADED or _LOADED[module_name][0] is not sys.modules.get(module_name):
        _LOADED[module_name] = (sys.modules.get(module_name), code)
    check_sampler(sampler, path)
    return Sampler(sampler.solver, sampler.grid, sampler.nfe)


@functools.cache
def check_steps(name: str, steps: tuple[int, ...], shift: float = 1.0) -> None:
    """A sampler from outside at the evaluation's step counts and shift (checks.steps_errors); built-in ones are
    tested."""
    from src.sampling.checks import steps_errors

    sampler = get_sampler(name)
    if name not in SAMPLERS and (errors := steps_errors(sampler, steps, shift)):
        raise ValueError(f"sampler {name!r} at the evaluation's steps {list(steps)}, shift {shift}: "
                         f"{'; '.join(errors)} (docs/sampling.md#adding-a-sampler)")


def sampler_code(name: str) -> str | None:
    """"file.py:<sha256[:12]>" of a sampler from outside this repository (its module file's content, so results of
    an edited sampler are not taken for the current ones), as it was when this process imported it (the code that
    samples here); None for a built-in sampler."""
    if name in SAMPLERS or not IMPORT_PATH.fullmatch(str(name)):
        return None
    module_name = str(name).split(":", 1)[0]
    module, code = _LOADED.get(module_name, (None, None))
    if module is not None and module is sys.modules.get(module_name):  # imported here: the code that samples
        return code
    return module_digest(module_name)


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
