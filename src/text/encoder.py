"""Frozen text encoders: captions -> (context token sequence, pooled vector), as SD3 conditions (docs/backbone.md#text-encoders).

SD3 concatenates CLIP L/14, OpenCLIP bigG/14 and T5-XXL; each encoder here is one such member, so a future
concatenating encoder only needs `__call__`, `context_dim`, `pooled_dim` and `name` from each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from src.text import tiny_clip
from src.text.checkpoints import load_open_clip, sidecar_create_kwargs
from src.utils.io import weights_sha256


@runtime_checkable
class TextEncoder(Protocol):
    """Captions -> (context (B, L, context_dim), pooled (B, pooled_dim)), both float32; frozen."""

    name: str
    context_dim: int
    pooled_dim: int
    context_length: int

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class ClipTextEncoder:
    """An open_clip CLIP's text tower: penultimate hidden states as context, the projected embedding as pooled.

    As SD3 (and diffusers' SD3 pipeline) does: context = hidden states after the second-to-last transformer
    block, before the final LayerNorm (every position, padding included); pooled = the text projection of the
    end-of-text token, not normalised.
    """

    def __init__(self, model_name: str, weights_path: str | Path, sha256: str | None = None, device: str = "cpu",
                 cache_dir: str | Path | None = None, **create_kwargs):
        self.model, self.tokenizer = load_open_clip(model_name, weights_path, sha256=sha256, device=device,
                                                    **create_kwargs)
        self.name = model_name
        # weights_sha256: hashed once per file version in a process, and remembered under cache_dir where one is
        # given (preprocessing names it by this hash too). QuickGELU (given, else the sidecar's) is another encoder
        # of the same file: named when on (the embedded datasets' cache key), the file's alone when off, as before.
        quick = create_kwargs.get("force_quick_gelu") if "force_quick_gelu" in create_kwargs else \
            sidecar_create_kwargs(weights_path).get("force_quick_gelu")
        self.fingerprint = f"{model_name}@{weights_sha256(weights_path, cache_dir)[:16]}" + ",quickgelu" * bool(quick)
        self.device = torch.device(device)
        layers = len(self.model.transformer.resblocks)
        if layers < 2:
            raise ValueError(f"model_name={model_name!r} has {layers} text layer(s); a penultimate layer needs >= 2")
        self.penultimate = layers - 2
        self.context_length = int(self.model.context_length)
        self.context_dim = int(self.model.transformer.width)
        self.pooled_dim = int(self.model.text_projection.shape[-1] if isinstance(self.model.text_projection,
                                                                                  torch.Tensor)
                              else self.model.text_projection.out_features)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (context (B, context_length, context_dim), pooled (B, pooled_dim)), float32."""
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings, not one string")
        tokens = self.tokenizer(list(captions)).to(self.device)
        out = self.model.forward_intermediates(text=tokens, text_indices=[self.penultimate], normalize=False)
        return out["text_intermediates"][0].float(), out["text_features"].float()


def load_tiny_clip_text_encoder(weights_path: str | Path = tiny_clip.WEIGHTS_PATH, sha256: str | None = None,
                                device: str = "cpu") -> ClipTextEncoder:
    """The committed tiny CLIP's text encoder (checksum verified)."""
    return ClipTextEncoder(tiny_clip.MODEL_NAME, weights_path, sha256=sha256, device=device,
                           image_mean=tiny_clip.IMAGE_MEAN, image_std=tiny_clip.IMAGE_STD)
