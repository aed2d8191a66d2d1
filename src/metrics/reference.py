"""Reference feature statistics of an evaluation set, computed once per (feature extractor, set) and cached."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np
import torch
from torch import Tensor

from src.utils.io import load_npz, remove_abandoned_temp_files, save_npz
from src.metrics.frechet import feature_statistics

Images = Union[Tensor, Iterable[Tensor], Callable[[], Iterable[Tensor]]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceFeatures:
    """Features (m, d) of the evaluation images, their float64 Gaussian fit, and the cache file."""

    extractor_id: str
    dataset_id: str
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    path: Path

    @property
    def n(self) -> int:
        return int(self.features.shape[0])


def _slug(text: str) -> str:
    """A file-name-safe form of an id; a short hash keeps distinct ids distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def reference_path(extractor_id: str, dataset_id: str, cache_dir: str | os.PathLike) -> Path:
    """The cache file of one (feature extractor, evaluation set) pair."""
    return Path(cache_dir) / f"{_slug(extractor_id)}__{_slug(dataset_id)}.npz"


def _batches(images: Images, batch_size: int = 256) -> Iterable[Tensor]:
    if callable(images) and not isinstance(images, Tensor):
        images = images()
    if isinstance(images, Tensor):
        return images.split(batch_size)
    return images


_CACHE_KEYS = ("features", "mu", "sigma", "extractor_id", "dataset_id")


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """A cache entry's arrays, or None (with a one-line warning) when it cannot be read: truncated or damaged by
    something else (this project writes it atomically), it is computed again and replaced."""
    try:
        data = load_npz(path)
        absent = [k for k in _CACHE_KEYS if k not in data]
        if absent:
            raise KeyError(f"no {', '.join(absent)}")
        return data
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log.warning("reference cache %s is unreadable (%s: %s); computing it again", path, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return None


def reference_features(
    extractor_id: str,
    dataset_id: str,
    images: Images,
    extractor,
    cache_dir: str | os.PathLike,
) -> ReferenceFeatures:
    """Load the cached reference features for (extractor_id, dataset_id), or compute and cache them (atomic npz).

    images: a (m, C, H, W) tensor in [-1, 1], an iterable of such batches, or a zero-argument callable returning
    one (called only on a cache miss). extractor: an object with `.image_features(images)` or such a callable.
    """
    path = reference_path(extractor_id, dataset_id, cache_dir)
    remove_abandoned_temp_files(path.parent)  # what kills during earlier writes left (features of a large set)
    if path.is_file():
        data = _read_cache(path)
        if data is not None:
            if str(data["extractor_id"]) != extractor_id or str(data["dataset_id"]) != dataset_id:
                raise ValueError(f"reference cache {path} holds ({data['extractor_id']}, {data['dataset_id']}), "
                                 f"expected ({extractor_id}, {dataset_id})")
            return ReferenceFeatures(extractor_id, dataset_id, data["features"], data["mu"], data["sigma"], path)
    extract = getattr(extractor, "image_features", extractor)
    with torch.no_grad():
        chunks = [extract(batch).detach().float().cpu() for batch in _batches(images)]
    if not chunks:
        raise ValueError(f"reference_features: no images for dataset {dataset_id!r}")
    features = torch.cat(chunks).numpy()
    mu, sigma = feature_statistics(features)
    save_npz(path, features=features, mu=mu, sigma=sigma, extractor_id=np.array(extractor_id),
             dataset_id=np.array(dataset_id))
    return ReferenceFeatures(extractor_id, dataset_id, features, mu, sigma, path)
