"""CLIP score and CLIP image/text features from any open_clip model loaded from a local file (docs/evaluation.md#clip-score).

Definitions used throughout the project:
- clip_score: per sample, the raw cosine similarity of the CLIP image embedding of the sample and the CLIP
  text embedding of its prompt (no 100x scale, no clipping at 0; the paper's values are about 0.25). The cosine
  normalises both embeddings itself, so it does not matter whether they arrive normalised.
- fid_clip: the Frechet distance (float64, unbiased covariances) between Gaussian fits of the raw, un-normalised
  CLIP image embeddings (the output of `encode_image` after the visual projection, `normalize=False`) of the
  samples and of the evaluation images, as the paper computes it (its Table 2 values, 44 to 148 with CLIP L/14,
  are those of raw embeddings; unit vectors would bound FID by 8). Images are mapped from [-1, 1] to [0, 1], grey
  repeated to RGB, resized (shorter side, bicubic, antialiased) and centre-cropped to the model's image size, and
  normalised with the model's mean and std. Records name this definition `fid_features = "clip_raw"`
  (FID_FEATURES); records written before it (FID on L2-normalised embeddings) have no such field and are read as
  "clip_l2norm" (src.results.LEGACY_FID_FEATURES). The rank report refuses to rank a sweep that mixes the two.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from src.metrics.images import resize_center_crop, to_rgb01
from src.utils.io import weights_sha256
# The feature definition of fid_clip (recorded as `fid_features`, part of the reference cache key): one definition.
from src.results import FID_FEATURES

#: The CLIP models of the paper, named in the error for an unknown model (open_clip knows a few hundred).
KNOWN_MODELS = ("ViT-L-14", "ViT-L-14-quickgelu", "ViT-bigG-14")


def model_name_error(model_name: str, config_key: str = "eval.clip.model_name") -> str | None:
    """The one-line error for a model name open_clip has no config for (after the tiny CLIP is registered), or None."""
    from src.text import tiny_clip  # registers the tiny CLIP's config

    models = open_clip.list_models()
    if str(model_name).replace("/", "-") in models:  # create_model accepts "ViT-L/14" for "ViT-L-14"
        return None
    import difflib

    close = difflib.get_close_matches(str(model_name), models, n=3, cutoff=0.75)
    allowed = list(dict.fromkeys([tiny_clip.MODEL_NAME, *close, *(m for m in KNOWN_MODELS if m in models)]))
    return (f"{config_key}={model_name}: not an open_clip model; allowed: {', '.join(allowed)}, ... "
            f"(open_clip.list_models(), {len(models)} models)")


def clip_score(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Per-sample raw cosine similarity of paired (n, d) image and text embeddings, shape (n,)."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"clip_score: image and text features must both be (n, d), got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)


def require_file(path: str | os.PathLike | None, config_key: str) -> Path:
    """The path as a Path if it is an existing file; else a FileNotFoundError naming the config key."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"{config_key}: weights file not found: {path!s} (set {config_key} to a local file; "
            f"nothing is downloaded)"
        )
    return Path(path).resolve()


class ClipFeatureExtractor:
    """Image and text embeddings of an open_clip model whose weights come from a local file.

    OpenAI's CLIP weights were trained with QuickGELU: load them with the "-quickgelu" model name (e.g.
    "ViT-L-14-quickgelu") or force_quick_gelu=True, and keep the default OpenAI mean/std, or the features
    are silently wrong (a local file bypasses open_clip's per-weight settings). The file must be a state
    dict (.pt/.bin/.safetensors); it is read with weights_only=True.
    """

    def __init__(
        self,
        model_name: str,
        weights_path: str | os.PathLike | None,
        device: str | torch.device = "cpu",
        force_quick_gelu: bool = False,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        config_key: str = "eval.clip.weights_path",
    ):
        path = require_file(weights_path, config_key)
        error = model_name_error(model_name, config_key.rsplit(".", 1)[0] + ".model_name")
        if error is not None:
            raise ValueError(error)
        override = {k: tuple(v) for k, v in (("mean", image_mean), ("std", image_std)) if v is not None}
        self.model_name, self.weights_path, self.device = model_name, path, torch.device(device)
        self.force_quick_gelu = bool(force_quick_gelu)
        # Hashed before the weights are read: the id names the file's content (cached per file version).
        self.weights_sha256 = weights_sha256(path)
        self.model = open_clip.create_model(
            model_name,
            pretrained=str(path),
            device=self.device,
            force_quick_gelu=force_quick_gelu,
            force_preprocess_cfg=override or None,
            weights_only=True,
        ).eval()
        self.model.requires_grad_(False)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(model_name)

    @property
    def id(self) -> str:
        """Identifies the features for the reference-statistics cache: the model, the weights' content (sha256: not
        the file's name, which other weights may share), QuickGELU, the image mean and std, and the feature
        definition (raw embeddings), so statistics cached from the former L2-normalised features are never reused."""
        stats = ",".join(f"{v:g}" for v in (*self.mean.flatten().tolist(), *self.std.flatten().tolist()))
        gelu = ",quickgelu" if self.force_quick_gelu else ""
        return f"clip:{self.model_name}:{self.weights_sha256[:16]}{gelu},mean_std={stats}:{FID_FEATURES}"

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """Raw (un-normalised) image embeddings (B, d), float32 on CPU, of (B, 1 or 3, H, W) images in [-1, 1].

        FID is computed on these as they are (FID_FEATURES); clip_score normalises them itself (cosine).
        """
        x = resize_center_crop(to_rgb01(images.to(self.device)), self.image_size)
        x = (x - self.mean) / self.std
        return self.model.encode_image(x, normalize=False).float().cpu()

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings (n, d), float32 on CPU."""
        if isinstance(captions, str):
            raise ValueError("text_features: captions must be a sequence of strings, got one string")
        tokens = self.tokenizer(list(captions)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()
