"""Backbones (docs/backbone.md#backbone-mm-dit): MM-DiT and the baselines of the paper's architecture comparison.

Every backbone is called as backbone(x, t, context, pooled) -> tensor shaped like x; see backbone.py.
"""

from .backbone import TIME_SCALE, Backbone, count_parameters
from .baselines import DiT, CrossDiT, UViT
from .mmdit import MMDiT, MMDiT3

#: Backbone classes by config name (conf/model/<name>.yaml).
BACKBONES: dict[str, type[Backbone]] = {
    "mmdit": MMDiT,
    "dit": DiT,
    "crossdit": CrossDiT,
    "uvit": UViT,
    "mmdit3": MMDiT3,
}


def build_backbone(name: str, **kwargs) -> Backbone:
    """The backbone registered under name, built with kwargs."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is not registered; allowed: {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


__all__ = [
    "BACKBONES",
    "TIME_SCALE",
    "Backbone",
    "CrossDiT",
    "DiT",
    "MMDiT",
    "MMDiT3",
    "UViT",
    "build_backbone",
    "count_parameters",
]
