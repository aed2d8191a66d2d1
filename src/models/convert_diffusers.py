"""State-dict conversion between our MMDiT and diffusers' SD3Transformer2DModel, both ways.

Pure mapping of tensors: diffusers is not imported here. Differences handled (docs/pitfalls.md):
- diffusers splits the fused QKV projection into to_q/to_k/to_v (image) and add_q/k/v_proj (text);
- its output head (norm_out) and the last block's text modulation (norm1_context, an AdaLayerNormContinuous)
  order their modulation as (scale, shift); ours, like the reference MM-DiT, as (shift, scale);
- its positional grid is a persistent buffer pos_embed.pos_embed (copied as is, so outputs match exactly;
  `mmdit_kwargs` picks pos_grid="diffusers" so a fresh model built from a diffusers config has the same grid);
- it is called with timestep = 1000 t where ours takes t (both embed 1000 t).
SD3.5's dual-attention layers (attn2) have no counterpart here and are rejected.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

COPY, SWAP, QKV = "copy", "swap", "qkv"  # SWAP: exchange the two halves (shift, scale) <-> (scale, shift)

_STREAMS = {
    "x_block": {
        "adaLN_modulation.1": "norm1.linear",
        "attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "attn.ln_q": "attn.norm_q",
        "attn.ln_k": "attn.norm_k",
        "attn.proj": "attn.to_out.0",
        "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2",
    },
    "context_blocks.0": {
        "adaLN_modulation.1": "norm1_context.linear",
        "attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "attn.ln_q": "attn.norm_added_q",
        "attn.ln_k": "attn.norm_added_k",
        "attn.proj": "attn.to_add_out",
        "mlp.fc1": "ff_context.net.0.proj",
        "mlp.fc2": "ff_context.net.2",
    },
}
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
_PRE_ONLY_DROPPED = ("attn.proj", "mlp.fc1", "mlp.fc2")  # absent from the last block's text stream


def _entries(depth: int, qk_norm: bool) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """(our key, diffusers keys, operation) for every tensor of an MMDiT state dict of this depth."""
    yield "pos_embed", ("pos_embed.pos_embed",), COPY
    modules = [(ours, (theirs,), COPY) for ours, theirs in _TOP.items()]
    modules.append(("final_layer.adaLN_modulation.1", ("norm_out.linear",), SWAP))
    for i in range(depth):
        last = i == depth - 1
        for stream, table in _STREAMS.items():
            pre_only = last and stream != "x_block"
            for ours, theirs in table.items():
                if (pre_only and ours in _PRE_ONLY_DROPPED) or (not qk_norm and ours.startswith("attn.ln_")):
                    continue
                op = QKV if ours == "attn.qkv" else SWAP if pre_only and ours.startswith("adaLN") else COPY
                theirs = theirs if isinstance(theirs, tuple) else (theirs,)
                modules.append((f"joint_blocks.{i}.{stream}.{ours}", tuple(f"transformer_blocks.{i}.{t}" for t in theirs), op))
    for ours, theirs, op in modules:
        suffixes = ("weight",) if ours.startswith("joint_blocks") and ".ln_" in ours else ("weight", "bias")
        for s in suffixes:
            yield f"{ours}.{s}", tuple(f"{t}.{s}" for t in theirs), op


def _swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _depth(keys, prefix: str, name: str) -> int:
    indices = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if not indices or indices != set(range(max(indices) + 1)):
        raise ValueError(f"{name} state dict has blocks {sorted(indices)}; allowed: blocks 0..n-1, n >= 1")
    return max(indices) + 1


def _check_keys(state_dict: Mapping[str, Tensor], expected: set[str], name: str) -> None:
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{name} state dict does not match the MM-DiT layout: missing {missing[:8]}, unexpected {unexpected[:8]}"
            " (SD3.5 dual attention, MMDiT3 and compiled '_orig_mod.' keys are not supported)"
        )


def to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our MMDiT state dict -> SD3Transformer2DModel state dict (tensors shared where no change is needed)."""
    depth = _depth(state_dict, "joint_blocks.", "MMDiT")
    entries = list(_entries(depth, qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in state_dict))
    _check_keys(state_dict, {ours for ours, _, _ in entries}, "MMDiT")
    out = {}
    for ours, theirs, op in entries:
        x = state_dict[ours]
        if op == QKV:
            out.update(zip(theirs, x.chunk(3, dim=0)))
        else:
            out[theirs[0]] = _swap_halves(x) if op == SWAP else x
    return out


def from_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """SD3Transformer2DModel state dict -> our MMDiT state dict."""
    depth = _depth(state_dict, "transformer_blocks.", "SD3Transformer2DModel")
    entries = list(_entries(depth, qk_norm="transformer_blocks.0.attn.norm_q.weight" in state_dict))
    _check_keys(state_dict, {t for _, theirs, _ in entries for t in theirs}, "SD3Transformer2DModel")
    out = {}
    for ours, theirs, op in entries:
        if op == QKV:
            out[ours] = torch.cat([state_dict[t] for t in theirs], dim=0)
        else:
            x = state_dict[theirs[0]]
            out[ours] = _swap_halves(x) if op == SWAP else x
    return out


def diffusers_config(model) -> dict:
    """SD3Transformer2DModel(**config) arguments for the architecture of our MMDiT `model`."""
    if getattr(model, "num_context_streams", 1) != 1:
        raise ValueError(f"{type(model).__name__} has no diffusers counterpart; allowed: MMDiT")
    return dict(
        sample_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        num_layers=model.depth,
        attention_head_dim=model.hidden_size // model.num_heads,
        num_attention_heads=model.num_heads,
        joint_attention_dim=model.context_dim,
        caption_projection_dim=model.hidden_size,
        pooled_projection_dim=model.pooled_dim,
        out_channels=model.in_channels,
        pos_embed_max_size=model.pos_embed_max_size,
        qk_norm=model.qk_norm,
    )


def diffusers_model(model):
    """diffusers' SD3Transformer2DModel on our MMDiT's device holding the same weights (diffusers is imported here:
    it is a test and benchmark dependency, not a runtime one)."""
    from diffusers import SD3Transformer2DModel

    with torch.device(model.pos_embed.device):
        theirs = SD3Transformer2DModel(**diffusers_config(model))
    theirs.load_state_dict(to_diffusers(model.state_dict()))
    return theirs


def mmdit_kwargs(config: Mapping) -> dict:
    """MMDiT(**kwargs) arguments for an SD3Transformer2DModel config (a mapping, e.g. model.config)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    checks = {  # setting: (value, allowed values)
        "caption_projection_dim": (config.get("caption_projection_dim", hidden), (hidden,)),
        "out_channels": (config.get("out_channels") or config["in_channels"], (config["in_channels"],)),
        "dual_attention_layers": (tuple(config.get("dual_attention_layers") or ()), ((),)),
        "qk_norm": (config.get("qk_norm"), (None, "rms_norm")),
    }
    for name, (value, allowed) in checks.items():
        if value not in allowed:
            raise ValueError(f"diffusers config {name}={value!r} is not supported; allowed: {allowed}")
    return dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        depth=config["num_layers"],
        hidden_size=hidden,
        num_heads=config["num_attention_heads"],
        context_dim=config["joint_attention_dim"],
        pooled_dim=config["pooled_projection_dim"],
        pos_embed_max_size=config["pos_embed_max_size"],
        pos_grid="diffusers",
        qk_norm=config.get("qk_norm"),
    )
