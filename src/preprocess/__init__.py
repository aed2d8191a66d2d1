"""Preprocessing real data (ImageNet, CC12M, COCO-2014) into shards of latents and text embeddings (issue 8).

`python -m src.preprocess {imagenet,cc12m,coco} ...`; in code: build a source, then `preprocess(source, config)`.
"""

from src.preprocess.pipeline import PreprocessConfig, preprocess
from src.preprocess.sources import CocoSource, ImageNetSource, TarSource, TsvSource, read_class_names

__all__ = ["CocoSource", "ImageNetSource", "PreprocessConfig", "TarSource", "TsvSource", "preprocess",
           "read_class_names"]
