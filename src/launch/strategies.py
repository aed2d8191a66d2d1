"""Distributed strategies from configuration: a name Lightning knows ("ddp", "ddp_spawn", ...) or a `_target_`."""

from __future__ import annotations

from omegaconf import DictConfig


def build_strategy(strategy):
    """The Trainer's `strategy` argument: strings pass through, a config with `_target_` is instantiated."""
    if isinstance(strategy, (dict, DictConfig)):
        import hydra

        return hydra.utils.instantiate(strategy, _convert_="all")
    return strategy


def backbone_wrap_policy():
    """FSDP auto-wrap policy: every backbone (the trained one and its EMA copy) and each of its blocks is a unit.

    Identical units give the backbone and its EMA copy the same local shard layout, so the EMA update can run on
    the sharded parameters. Blocks are the elements of a backbone's top-level ModuleLists (MM-DiT's joint blocks,
    DiT/UViT/CrossDiT blocks), never their inner stream blocks, whose methods MM-DiT calls outside forward.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    from src.models.backbone import Backbone

    units: set[int] = set()

    def policy(module) -> bool:
        if isinstance(module, Backbone):
            for child in module.children():
                if type(child).__name__ == "ModuleList":
                    units.update(id(block) for block in child)
            return True
        return id(module) in units

    return CustomPolicy(policy)
