"""Exponential moving average of the backbone's weights (docs/training.md#paper-setup: every 100 steps, decay 0.99)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_copy(backbone: nn.Module) -> nn.Module:
    """A frozen copy of the backbone that holds the averaged weights."""
    ema = copy.deepcopy(backbone)
    ema.requires_grad_(False)
    ema.eval()
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    if len(ema_params) != len(model_params):
        raise ValueError("EMA copy and backbone have different parameter lists")
    torch._foreach_lerp_(ema_params, [p.detach() for p in model_params], 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)
