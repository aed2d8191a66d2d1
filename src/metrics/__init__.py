"""Evaluation metrics (docs/evaluation.md): Frechet distance, CLIP score, CLIP and Inception features, reference cache.

fid_clip and clip_score are defined precisely in src/metrics/clip.py.
"""

from src.metrics.clip import ClipFeatureExtractor, clip_score
from src.metrics.frechet import feature_statistics, fid_from_features, frechet_distance
from src.metrics.inception import InceptionFeatureExtractor
from src.metrics.reference import ReferenceFeatures, reference_features, reference_path

__all__ = [
    "ClipFeatureExtractor",
    "InceptionFeatureExtractor",
    "ReferenceFeatures",
    "clip_score",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "reference_features",
    "reference_path",
]
