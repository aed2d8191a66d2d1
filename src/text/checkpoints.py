"""Checksummed local weight files and loading open_clip models through open_clip's own path (docs/data.md#tiny-clip)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from src.utils.io import sha256_file

SIDECAR_CREATE_KWARGS = ("image_mean", "image_std", "force_quick_gelu")


def sidecar_path(weights_path: str | Path) -> Path:
    """The JSON next to a weight file that records its checksum (tiny_clip.pt -> tiny_clip.json)."""
    return Path(weights_path).with_suffix(".json")


def read_sidecar(weights_path: str | Path) -> dict:
    """The weight file's sidecar JSON; raises FileNotFoundError naming it when absent."""
    path = sidecar_path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"checksum file {path} for weights {weights_path} is missing")
    return json.loads(path.read_text())


def sidecar_create_kwargs(weights_path: str | Path, given=()) -> dict:
    """The open_clip settings a weight file's sidecar records (SIDECAR_CREATE_KWARGS); {} without a sidecar.
    given: the settings the caller sets itself, not read (a damaged value there is overridden, as its message says)."""
    if not sidecar_path(weights_path).is_file():
        return {}
    sidecar = read_sidecar(weights_path)
    if not isinstance(sidecar, dict):
        raise ValueError(f"checksum file {sidecar_path(weights_path)} is not a JSON object")
    kwargs = {key: sidecar[key] for key in SIDECAR_CREATE_KWARGS if key in sidecar and key not in given}
    if not isinstance(kwargs.get("force_quick_gelu", False), bool):
        raise ValueError(f"checksum file {sidecar_path(weights_path)}: force_quick_gelu={kwargs['force_quick_gelu']!r} "
                         "is not true or false")
    return kwargs


def verify_checksum(weights_path: str | Path, sha256: str) -> None:
    """Raise a one-line error naming the file when it is absent or its sha256 differs from the expected one."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    actual = sha256_file(path)
    if actual != sha256:
        raise ValueError(f"weights file {path} has sha256 {actual}, expected {sha256}: corrupted or replaced")


def load_open_clip(model_name: str, weights_path: str | Path, sha256: str | None = None, device: str = "cpu",
                   **create_kwargs) -> tuple[torch.nn.Module, object]:
    """Verify a local checkpoint and load it with open_clip.create_model_and_transforms; returns (model, tokenizer).

    sha256: expected checksum; None reads it from the sidecar JSON if there is one, else only checks the file
    exists. create_kwargs go to open_clip (e.g. force_quick_gelu=True for OpenAI weights, docs/pitfalls.md); the
    sidecar's image_mean, image_std and force_quick_gelu are the defaults.
    The model is returned frozen in eval mode.
    """
    path = Path(weights_path)
    if sidecar_path(path).is_file():
        sha256 = read_sidecar(path).get("sha256") if sha256 is None else sha256
        # A local path bypasses open_clip's per-weight settings (docs/pitfalls.md): the sidecar carries them.
        create_kwargs.update(sidecar_create_kwargs(path, given=create_kwargs))
    if sha256 is not None:
        verify_checksum(path, sha256)
    elif not path.is_file():
        raise FileNotFoundError(f"weights file {path} for model {model_name} does not exist")
    if model_name not in open_clip.list_models():
        raise ValueError(f"model_name={model_name!r} is not a registered open_clip config; "
                         f"register it with open_clip.add_model_config first")
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device,
                                                        **create_kwargs)
    model.eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(model_name)
