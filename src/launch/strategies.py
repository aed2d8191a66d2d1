"""Distributed strategies from configuration: a name Lightning knows ("ddp", "ddp_spawn", ...) or a `_target_`."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
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


class FSDPStrategy(_LightningFSDPStrategy):
    """Lightning's FSDPStrategy that also runs on the CPU (gloo), where Lightning refuses it.

    torch's FSDP shards CPU modules when given `device_id=cpu`; Lightning passes the device index (None on the CPU)
    and its accelerator check refuses the CPU for its own class only. On GPUs this is Lightning's strategy
    unchanged; on the CPU it is how the sharded path is tested and debugged on a laptop (tests/test_fsdp.py).
    Full (single-file) checkpoints are read with torch.load(weights_only=True, mmap=True) instead of Lightning's
    lazy unpickler, which accepts any pickled object.
    """

    def _full_state_dict(self, rank0_only: bool):
        """FSDP's full state-dict context. On the CPU without offloading: torch's optimizer-state gather reuses
        one buffer for every state (exp_avg, exp_avg_sq) and relies on the offload's copy to the CPU, which is no
        copy on the CPU, so offloading there would save every state as the last one gathered."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(
            self.model, StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        )

    def optimizer_state(self, optimizer) -> dict:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._full_state_dict(rank0_only=self.world_size > 1):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # keyed by parameter index, as a plain optimizer saves it
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded checkpoint directory: Lightning's loader (torch.distributed.checkpoint)
            return super().load_checkpoint(path, weights_only=True)
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from lightning.pytorch.trainer.states import TrainerFn
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        # mmap: every rank maps the one file instead of holding its own copy of the full weights.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        _load_raw_module_state(checkpoint.pop("state_dict"), module=self.model, world_size=self.world_size,
                               strict=self.lightning_module.strict_loading)
        optimizer_states = checkpoint.get("optimizer_states")
        if optimizer_states is None or self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint
        if len(self.optimizers) != len(optimizer_states):
            raise RuntimeError(f"checkpoint {path} holds {len(optimizer_states)} optimizer states, "
                               f"the module has {len(self.optimizers)} optimizers")
        # Every rank takes its shard of the full optimizer state (rank0_only=False), as Lightning does.
        with self._full_state_dict(rank0_only=False):
            for optimizer, state in zip(self.optimizers, optimizer_states):
                if state["state"] and isinstance(next(iter(state["state"])), int):
                    state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, self.model)
                optimizer.load_state_dict(FSDP.optim_state_dict_to_load(self.model, optimizer, state))
        return checkpoint

    def _setup_model(self, model):
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

        model = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )
        # As Lightning does after wrapping.
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
