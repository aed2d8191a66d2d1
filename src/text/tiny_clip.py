"""The tiny CLIP: an open_clip CLIP for 16x16 images trained on the embedded datasets (docs/data.md#tiny-clip).

It plays the roles CLIP L/14 plays in the paper: text encoder for the backbone and feature extractor for the
evaluation. The architecture is a small open_clip config (model_configs/tiny-clip-16px.json) registered with
open_clip.add_model_config; the weights are committed in assets/tiny_clip/ with their sha256.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from src.utils.io import atomic_write_bytes, atomic_write_json
from src.text.checkpoints import load_open_clip, sha256_file
from src.text.tiny_clip_paths import CONFIG_PATH, MODEL_NAME, WEIGHTS_PATH, model_config  # noqa: F401
# ToTensor's [0, 1] normalised by mean = std = 0.5 is [-1, 1], the project's pixel range: tensors in [-1, 1] are
# already the model's normalised input.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def register() -> None:
    """Register the tiny CLIP config with open_clip (idempotent)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


register()


def create_tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny CLIP (for training and tests)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return open_clip.create_model(MODEL_NAME, force_preprocess_cfg={"mean": IMAGE_MEAN, "std": IMAGE_STD})


def load_tiny_clip(weights_path: str | Path = WEIGHTS_PATH, sha256: str | None = None,
                   device: str = "cpu") -> tuple[torch.nn.Module, object]:
    """The trained tiny CLIP through open_clip's loading path, checksum verified first; returns (model, tokenizer)."""
    return load_open_clip(MODEL_NAME, weights_path, sha256=sha256, device=device,
                          image_mean=IMAGE_MEAN, image_std=IMAGE_STD)  # also when a sidecar lacks them


def save_tiny_clip(model: torch.nn.Module, weights_path: str | Path, info: dict,
                   dtype: torch.dtype = torch.float16) -> str:
    """Write the state dict (as dtype) and its sidecar JSON (config, sha256, info) atomically; returns the sha256."""
    weights_path = Path(weights_path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(weights_path, buf.getvalue())
    sha = sha256_file(weights_path)
    meta = {"model_name": MODEL_NAME, "config": model_config(), "weights_file": weights_path.name,
            "dtype": str(dtype).removeprefix("torch."), "sha256": sha,
            "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), **info}
    atomic_write_json(weights_path.with_suffix(".json"), meta, sort_keys=True)
    return sha


def update_tiny_clip_meta(weights_path: str | Path, info: dict) -> None:
    """Add entries (e.g. accuracies) to a saved tiny CLIP's sidecar JSON, atomically."""
    meta_path = Path(weights_path).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update(info)
    atomic_write_json(meta_path, meta, sort_keys=True)


def clip_pixels(images: torch.Tensor, image_size: int = 16) -> torch.Tensor:
    """Pixels (B, 1 or 3, H, W) -> the tiny CLIP's input (B, 3, size, size): clamped to [-1, 1], grey repeated."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(images.shape)} are not allowed; need (B, 1 or 3, H, W)")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False)
    return images.float().clamp(-1.0, 1.0)


def encode_images(model: torch.nn.Module, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """CLIP image embeddings of pixels in [-1, 1] (L2-normalised by default)."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return model.encode_image(clip_pixels(images, size), normalize=normalize)


def encode_texts(model: torch.nn.Module, tokenizer, captions: list[str], normalize: bool = True) -> torch.Tensor:
    """CLIP text embeddings of captions (L2-normalised by default)."""
    device = next(model.parameters()).device
    return model.encode_text(tokenizer(list(captions)).to(device), normalize=normalize)
