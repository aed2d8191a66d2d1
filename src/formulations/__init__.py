"""The training formulations of the study (docs/formulations.md): rf with timestep densities, eps/v diffusion,
EDM; the 61 paper recipes and construction from configuration."""

from .base import Formulation, expand_like, format_param, mean_flat, validation_times
from .ddpm import VPDiffusion
from .densities import CosMap, LogitNormal, Mode, TimestepDensity, Uniform
from .edm import EDM, EDMCos, EDMRF
from .registry import (
    FAMILIES,
    RECIPE_SPECS,
    RECIPES,
    build,
    family_params,
    from_config,
    get_recipe,
    register_family,
)
from .rf import RectifiedFlow

__all__ = [
    "EDM",
    "EDMCos",
    "EDMRF",
    "FAMILIES",
    "RECIPES",
    "RECIPE_SPECS",
    "CosMap",
    "Formulation",
    "LogitNormal",
    "Mode",
    "RectifiedFlow",
    "TimestepDensity",
    "Uniform",
    "VPDiffusion",
    "build",
    "expand_like",
    "family_params",
    "format_param",
    "from_config",
    "get_recipe",
    "mean_flat",
    "register_family",
    "validation_times",
]
