"""Evaluation metrics (docs/evaluation.md): Frechet distance, CLIP score, CLIP and Inception features, reference cache.

fid_clip and clip_score are defined precisely in src/metrics/clip.py. The names below are imported lazily
(PEP 562), so that `src.metrics.frechet`, which is numpy only, can be imported by the rank report without
pulling in torch and open_clip through this package's __init__.
"""

from importlib import import_module

_WHERE = {
    "ClipFeatureExtractor": "clip",
    "clip_score": "clip",
    "FID_FEATURES": "clip",
    "InceptionFeatureExtractor": "inception",
    "ReferenceFeatures": "reference",
    "reference_features": "reference",
    "reference_path": "reference",
    "feature_statistics": "frechet",
    "fid_from_features": "frechet",
    "frechet_distance": "frechet",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'src.metrics' has no attribute {name!r}")
    return getattr(import_module(f"src.metrics.{_WHERE[name]}"), name)
