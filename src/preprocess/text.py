"""Text encoders from local files and their SD3 combination (docs/backbone.md#text-encoders), with the token/channel
map `text_groups`.

CLIP encoders are src.text.encoder.ClipTextEncoder (open_clip, penultimate hidden states + projected pooled).
T5 is transformers' T5EncoderModel (final hidden states, padded to a fixed length without an attention mask, as
diffusers' SD3 pipeline encodes prompts). SD3's combination: pooled vectors concatenated; CLIP sequences
concatenated along channels and zero-padded to the common width, then concatenated with the T5 sequence along
tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import cached_property
from pathlib import Path
from typing import Sequence

import open_clip
import torch

from src.text.checkpoints import sidecar_create_kwargs
from src.text.encoder import ClipTextEncoder
from src.utils.io import files_digest, folder_files

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPEN_CLIP_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def check_clip_spec(model: str, weights: str | Path) -> None:
    """Fail before any work when a CLIP weight file or its model config is missing."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"clip weights={str(weights)!r} for model {model!r} is not a file; need a local "
                                f"weights file of that open_clip model")
    from src.utils.io import weights_file_error

    error = weights_file_error(weights)
    if error is not None:
        raise ValueError(f"clip weights={str(weights)!r} for model {model!r}: not a weights file "
                         f"torch.load(weights_only=True) reads ({error})")
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"clip model config={model!r} is not a file; need an open_clip model name or "
                                    f"a model config .json")
    elif model not in open_clip.list_models():
        raise ValueError(f"clip model={model!r} is not an open_clip model name; use one of open_clip.list_models() "
                         f"(OpenAI weights need the -quickgelu name) or a path to a model config .json")


def clip_digest(model: str, weights: str | Path, cache_dir: str | Path | None = None,
                quick_gelu: bool = True) -> str:
    """sha256[:12] of a CLIP's weights file (and its model config .json where it has one): OpenAI and LAION weights
    of one open_clip model name are told apart. The files by role, not name: a renamed copy is the same encoder.
    cache_dir: where the files' checksums are remembered (src.utils.io.weights_sha256).
    QuickGELU from the weights' sidecar JSON (src.text.checkpoints) is another encoder of the same files: it is
    part of the digest when on, so a sidecar changed since a resume or between the training and evaluation folders
    is found (off, the digest is the files' alone, as written before). quick_gelu=False: the files' alone whatever
    the sidecar says, as folders written before recorded every CLIP (meta.json without encoder_files_sha256)."""
    files = {"weights": Path(weights), **({"config": Path(model)} if model.endswith(".json") else {})}
    digest = files_digest(files, cache_dir)
    if quick_gelu and sidecar_create_kwargs(weights).get("force_quick_gelu"):
        digest = hashlib.sha256(f"{digest},quickgelu".encode()).hexdigest()[:12]
    return digest


def load_clip(model: str, weights: str | Path, device: str, precision: str = "float32",
              cache_dir: str | Path | None = None) -> ClipTextEncoder:
    """An open_clip text encoder; `model` is a registered name or a path to a model config JSON (registered here).
    Its `content_sha256` is clip_digest's (the weights were just hashed for its fingerprint: no second read)."""
    check_clip_spec(model, weights)
    spec = model
    if model.endswith(".json"):
        open_clip.add_model_config(model)
        model = Path(model).stem
    encoder = ClipTextEncoder(model, weights, device=device, cache_dir=cache_dir,
                              precision=OPEN_CLIP_PRECISION[precision])
    encoder.content_sha256 = clip_digest(spec, weights, cache_dir)
    encoder.files_sha256 = clip_digest(spec, weights, cache_dir, quick_gelu=False)  # (checksums remembered)
    return encoder


def check_t5_folder(path: str | Path) -> None:
    """Fail before any work when the T5 folder is missing, or holds only a sentencepiece tokenizer (spiece.model,
    as google/t5-v1_1-xxl ships it) and the sentencepiece package that reads it is not installed."""
    import importlib.util

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"t5={str(path)!r} is not a transformers model folder (no config.json); need a "
                                f"T5 encoder folder saved with save_pretrained, with its tokenizer")
    if (path / "spiece.model").is_file() and not (path / "tokenizer.json").is_file() \
            and importlib.util.find_spec("sentencepiece") is None:
        raise ValueError(f"t5={str(path)!r} has only a sentencepiece tokenizer (spiece.model, no tokenizer.json); "
                         "need the sentencepiece package: pip install -e '.[preprocess]'")


class T5TextEncoder:
    """T5 encoder (transformers, local folder with tokenizer): final hidden states (B, max_length, d_model)."""

    pooled_dim = 0

    def __init__(self, path: str | Path, device: str = "cpu", precision: str = "float32", max_length: int = 77,
                 cache_dir: str | Path | None = None):
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path)
        check_t5_folder(path)
        if max_length < 1:
            raise ValueError(f"t5_length={max_length} is not allowed; need >= 1")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(path, dtype=PRECISIONS[precision], local_files_only=True)
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.path, self.name = path, path.name
        self.cache_dir = cache_dir  # where its files' checksums are remembered (content_sha256)
        self.context_length = max_length
        self.context_dim = int(self.model.config.d_model)

    @cached_property
    def content_sha256(self) -> str:
        """sha256[:12] of the folder's files (weights, config, tokenizer): two folders called `t5` are told apart.
        Once per file version: T5-XXL's weights are 10-20 GB, and every --part of a job would read them again."""
        return files_digest(folder_files(self.path), self.cache_dir)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (context (B, max_length, d_model), empty pooled (B, 0)), float32."""
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.context_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        context = self.model(input_ids=ids).last_hidden_state.float()
        return context, context.new_zeros(len(captions), 0)


class CombinedTextEncoder:
    """SD3's combination of CLIP encoders (and optionally one T5) into one (context, pooled) pair
    (docs/backbone.md#text-encoders)."""

    def __init__(self, clips: Sequence, t5=None):
        if not clips:
            raise ValueError("clip: at least one CLIP encoder is needed (it gives the pooled vector)")
        lengths = {c.context_length for c in clips}
        if len(lengths) != 1:
            raise ValueError(f"clip encoders have context lengths {sorted(lengths)}; they must be equal to stack them")
        self.clips, self.t5 = list(clips), t5
        self.clip_length = lengths.pop()
        clip_width = sum(c.context_dim for c in clips)
        self.context_dim = max(clip_width, t5.context_dim if t5 else 0)
        self.context_length = self.clip_length + (t5.context_length if t5 else 0)
        self.pooled_dim = sum(c.pooled_dim for c in clips)
        self.names = [f"clip:{c.name}" for c in clips] + ([f"t5:{t5.name}"] if t5 else [])
        self.groups = self._groups()

    @property
    def sha256(self) -> list[str]:
        """Each encoder's content_sha256 in `names` order (computed once, on the encoder): meta.json's
        encoder_sha256, as names alone call OpenAI and LAION CLIP L/14 weights, or two T5 folders `t5`, the same."""
        return [e.content_sha256 for e in [*self.clips, *([self.t5] if self.t5 else [])]]

    @property
    def files_sha256(self) -> list[str]:
        """As sha256, of the files alone (a CLIP's QuickGELU sidecar not named): meta.json's encoder_files_sha256, to
        compare with the encoder_sha256 of folders written before it named QuickGELU."""
        return [getattr(e, "files_sha256", e.content_sha256) for e in [*self.clips, *([self.t5] if self.t5 else [])]]

    def _groups(self) -> list[dict]:
        groups, channel, pooled = [], 0, 0
        for clip, name in zip(self.clips, self.names):
            groups.append({"name": name, "context_tokens": [0, self.clip_length],
                           "context_channels": [channel, channel + clip.context_dim],
                           "pooled_channels": [pooled, pooled + clip.pooled_dim]})
            channel += clip.context_dim
            pooled += clip.pooled_dim
        if self.t5:
            groups.append({"name": self.names[-1], "context_tokens": [self.clip_length, self.context_length],
                           "context_channels": [0, self.t5.context_dim],
                           "pooled_channels": [self.pooled_dim, self.pooled_dim]})
        return groups

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (context (B, context_length, context_dim), pooled (B, pooled_dim)), float32 on the encoders'
        device (the first CLIP's)."""
        outputs = [clip(captions) for clip in self.clips]
        device = outputs[0][0].device
        clip_context = torch.cat([o[0].float().to(device) for o in outputs], dim=-1)
        pooled = torch.cat([o[1].float().to(device) for o in outputs], dim=-1)
        parts = [pad_channels(clip_context, self.context_dim)]
        if self.t5:
            parts.append(pad_channels(self.t5(captions)[0].float().to(device), self.context_dim))
        return torch.cat(parts, dim=1), pooled


def pad_channels(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension of x to `width`."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


class CachedTextEncoder:
    """Memoises an encoder's outputs per caption (LRU, float16 on the CPU): ImageNet has a few thousand captions."""

    def __init__(self, encoder, max_entries: int = 2048):
        if max_entries < 0:
            raise ValueError(f"text_cache={max_entries} is not allowed; need >= 0 (0 disables the cache)")
        self.encoder, self.max_entries = encoder, max_entries
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    def rows(self, captions: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Captions -> per-caption context and pooled rows, float16 CPU tensors (not stacked: no batch copy)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.cache))
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        fresh = {}
        if missing:
            context, pooled = self.encoder(missing)
            context, pooled = context.half().cpu(), pooled.half().cpu()  # convert on the device: half the copy
            # clones: a cached view would keep its whole batch alive
            fresh = {c: (context[i].clone(), pooled[i].clone()) for i, c in enumerate(missing)}
        rows = []
        for c in captions:
            row = fresh.get(c) or self.cache[c]
            rows.append(row)
            if self.max_entries:
                self.cache[c] = row
                self.cache.move_to_end(c)
        while len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)
        return [r[0] for r in rows], [r[1] for r in rows]

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (context, pooled) as float16 CPU tensors; only unseen distinct captions are encoded."""
        context, pooled = self.rows(captions)
        return torch.stack(context), torch.stack(pooled)
