"""Classifier-free guidance dropout of the text conditioning (docs/backbone.md#classifier-free-guidance-dropout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


#: The share of training samples without any text conditioning (the paper: ~10%), which train.cond_dropout=auto
#: gives whatever the number of text encoders.
UNCONDITIONAL = 0.1


def per_encoder_dropout(n_groups: int) -> float:
    """The probability of dropping each of n_groups encoders independently that drops all of them for UNCONDITIONAL of
    the samples: 0.1 for one encoder, 0.464 for the paper's three. (0.1 with three gave 0.1% unconditional samples,
    too few for the unconditional model classifier-free guidance samples from.)"""
    return UNCONDITIONAL ** (1.0 / n_groups)


def draw_drops(n: int, n_groups: int, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """(n, n_groups) booleans: which encoder's output to zero for which sample, each with probability prob."""
    return torch.rand(n, n_groups, generator=generator) < prob


def drop_conditioning(context: Tensor, pooled: Tensor, drop: Tensor, groups: Sequence[dict] | None = None) -> tuple[Tensor, Tensor]:
    """Zero each text encoder's output for the samples where `drop` (B, len(groups)) is true.

    `groups` describes which part of the conditioning belongs to which encoder, as dicts with
    `context_tokens: [start, end]`, optionally `context_channels: [start, end]` (SD3's two CLIPs share tokens
    and split channels), and `pooled_channels: [start, end]`; None means one encoder owning all.
    With the paper's three encoders each dropped with probability 0.464, about 10% of samples lose all
    conditioning.
    """
    if groups is None:
        groups = [{"context_tokens": [0, context.shape[1]], "pooled_channels": [0, pooled.shape[1]]}]
    if drop.shape != (context.shape[0], len(groups)):
        raise ValueError(f"drop has shape {tuple(drop.shape)}; expected ({context.shape[0]}, {len(groups)})")
    if not drop.any():
        return context, pooled
    keep = (~drop).to(device=context.device, dtype=context.dtype)
    context, pooled = context.clone(), pooled.clone()
    for g, group in enumerate(groups):
        c0, c1 = group["context_tokens"]
        d0, d1 = group.get("context_channels") or (0, context.shape[2])
        p0, p1 = group["pooled_channels"]
        context[:, c0:c1, d0:d1] *= keep[:, g, None, None]
        pooled[:, p0:p1] *= keep[:, g, None]
    return context, pooled
