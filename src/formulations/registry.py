"""Family registry, the 61 paper recipes (docs/formulations.md#the-61-recipes) and construction from configuration.

A family is a key (also the conf/loss/<key>.yaml name) and a builder whose keyword arguments are the
family's parameters. A new family is one module plus one `register_family` line here, or, without changing this
repository, a builder named by its import path, `family: mypackage.module:builder` in a loss configuration; such a
family is checked against what every formulation must satisfy (checks.py) when it is built.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from src.utils.plugins import IMPORT_PATH, import_object

from . import ddpm, edm, rf
from .base import Formulation

FAMILIES: dict[str, Callable[..., Formulation]] = {}


def register_family(key: str, builder: Callable[..., Formulation]) -> None:
    """Register a family key with a builder taking the family's parameters as keyword arguments."""
    if key in FAMILIES:
        raise ValueError(f"family {key!r} is already registered")
    FAMILIES[key] = builder


register_family("rf", rf.rf)
register_family("rf_lognorm", rf.rf_lognorm)
register_family("rf_mode", rf.rf_mode)
register_family("rf_cosmap", rf.rf_cosmap)
register_family("eps_linear", ddpm.eps_linear)
register_family("v_linear", ddpm.v_linear)
register_family("eps_cos", ddpm.eps_cos)
register_family("v_cos", ddpm.v_cos)
register_family("edm", edm.edm)
register_family("edm_rf", edm.edm_rf)
register_family("edm_cos", edm.edm_cos)


def family_params(family: str) -> list[str]:
    """The parameter names of a family, in order."""
    return list(inspect.signature(_builder(family)).parameters)


#: The names the built-in families give, for any parameters (and "rf/uniform", which the report reads as "rf").
BUILTIN_NAME = re.compile(r"rf(/(uniform|cosmap|lognorm\(.*\)|mode\(.*\)))?|(eps|v)/(linear|cos)|edm(/(rf|cos)|\(.*\))")



def _builder(family: str) -> Callable[..., Formulation]:
    if family in FAMILIES:
        return FAMILIES[family]
    if isinstance(family, str) and IMPORT_PATH.fullmatch(family):
        return _imported_builder(family)
    raise ValueError(f"unknown formulation family {family!r}; valid families: {', '.join(FAMILIES)}, or "
                     "'package.module:builder' for one defined outside this repository")


@functools.cache
def _imported_builder(path: str) -> Callable[..., Formulation]:
    """The builder a family's import path names; a one-line error when it cannot be imported."""
    builder = import_object(path, "family")
    if not callable(builder):
        raise ValueError(f"family {path!r}: {path.split(':')[1]} is a {type(builder).__name__}, not a builder (a "
                         "function or class whose keyword arguments are the family's parameters)")
    return builder


def build(family: str, **params: Any) -> Formulation:
    """Build a formulation from its family key and parameters, e.g. build("rf_lognorm", m=0.0, s=1.0), or from a
    builder's import path ("package.module:builder"), whose formulation is checked (checks.check_formulation)."""
    expected = family_params(family)
    if set(params) != set(expected):
        got = ", ".join(sorted(params)) or "none"
        raise ValueError(f"family {family!r} takes parameters ({', '.join(expected)}); got ({got})")
    if family in FAMILIES:
        return FAMILIES[family](**params)
    formulation = _outside(family, "the builder", lambda: _builder(family)(**params))
    _check_imported(family, formulation, params)
    return formulation


def _outside(path: str, what: str, call: Callable[[], Any]) -> Any:
    """call(), running code from outside: its ValueError is its own one-line message (a parameter out of range);
    any other exception (a bug, an assert) is one line naming the family, not a traceback or a bare "boom"."""
    try:
        return call()
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever the outside code raises
        raise ValueError(f"family {path!r}: {what} raised {type(e).__name__}: {e}") from None


def _check_imported(path: str, formulation: Any, params: Mapping[str, Any]) -> None:
    """A family from outside: a Formulation, with a key of its own, that satisfies what every formulation must, and
    whose params() are the parameters it was built with: run directories (its slug) and the rank report (its name)
    tell formulations apart by them, so one that forgot a parameter would share both with its other values."""
    from .checks import check_formulation

    if not isinstance(formulation, Formulation):
        raise ValueError(f"family {path!r}: the builder returned a {type(formulation).__name__}, not a Formulation "
                         "(src.formulations.Formulation)")
    if formulation.family in FAMILIES:
        raise ValueError(f"family {path!r}: its formulations call their family {formulation.family!r}, the key of a "
                         "built-in family, whose runs and records they would be taken for; give it a key of its own")
    if BUILTIN_NAME.fullmatch(formulation.name):
        raise ValueError(f"family {path!r}: its formulation is named {formulation.name!r}, a name the built-in "
                         "families give, as which the rank report would take it; give it a name of its own")
    _outside(path, "checking its formulation", lambda: check_formulation(formulation, path))
    built = formulation.params()
    if not _same_params(built, params):
        raise ValueError(f"family {path!r}: its formulation's params() gives {built}, not the parameters it was built "
                         f"with, {dict(params)}; formulations built with other values would share its run directory "
                         "and its name in the rank report")


def _same_params(built: Mapping[str, Any], given: Mapping[str, Any]) -> bool:
    """The same keys and values, numbers up to float32 round-off (a parameter kept as a float32 tensor gives
    0.6000000238418579 for 0.6: the same formulation, whose name and slug give two decimals)."""
    def same(a, b) -> bool:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) if numbers else a == b

    return set(built) == set(given) and all(same(built[k], given[k]) for k in given)


# ---- the 61 recipes (names as printed in the paper) ---------------------------------------------

#: linspace(-1, 1.75, 7) to two decimals as printed (Decision: the printed value is the parameter), plus 1.00.
MODE_SCALES = (-1.00, -0.54, -0.08, 0.38, 0.83, 1.29, 1.75, 1.00)
LOGNORM_M = (-1.0, -0.5, 0.0, 0.5, 1.0)
LOGNORM_S = (0.2, 0.6, 1.0, 1.4, 1.8, 2.2)
EDM_P_MEAN = (-1.2, -0.6, 0.0, 0.6, 1.2)
EDM_P_STD = (0.6, 1.2, 1.8)


def _paper_specs() -> dict[str, tuple[str, dict[str, float]]]:
    specs: list[tuple[str, dict[str, float]]] = [(k, {}) for k in ("eps_linear", "v_linear", "eps_cos", "v_cos")]
    specs += [("rf_mode", {"s": s}) for s in MODE_SCALES]
    specs += [("rf", {})]
    specs += [("rf_lognorm", {"m": m, "s": s}) for m in LOGNORM_M for s in LOGNORM_S]
    specs += [("rf_cosmap", {})]
    specs += [("edm", {"p_mean": pm, "p_std": ps}) for pm in EDM_P_MEAN for ps in EDM_P_STD]
    specs += [("edm_rf", {}), ("edm_cos", {})]
    return {build(family, **params).name: (family, params) for family, params in specs}


#: name -> (family, params) for the paper's 61 recipes.
RECIPE_SPECS: dict[str, tuple[str, dict[str, float]]] = _paper_specs()
RECIPES: list[str] = list(RECIPE_SPECS)


def get_recipe(name: str) -> Formulation:
    """The formulation for one of the paper's 61 recipe names, e.g. "rf/lognorm(0.00, 1.00)"."""
    if name not in RECIPE_SPECS:
        close = difflib.get_close_matches(str(name), RECIPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; valid recipes: {', '.join(RECIPES)}")
    family, params = RECIPE_SPECS[name]
    return build(family, **params)


def from_config(cfg: Mapping) -> Formulation:
    """Build from {"family": key, **params} or {"recipe": paper name}; keys starting with "_" are ignored."""
    keys = {k: cfg[k] for k in cfg if not str(k).startswith("_")}
    if "recipe" in keys:
        extra = sorted(set(keys) - {"recipe"})
        if extra:
            raise ValueError(f"loss config: 'recipe' cannot be combined with {extra}; give a recipe or a family")
        if keys["recipe"] in (None, "???"):  # conf/loss/recipe.yaml without a name
            names = ", ".join(RECIPES)
            raise ValueError(f"recipe is not set: loss=recipe \"loss.recipe='<name>'\" with one of: {names}")
        return get_recipe(keys["recipe"])
    if "family" not in keys:
        raise ValueError(f"loss config needs 'family' (one of {', '.join(FAMILIES)}) or 'recipe'; got {sorted(keys)}")
    family = keys.pop("family")
    return build(family, **keys)

