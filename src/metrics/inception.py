"""Inception-v3 pool features (2048-d) through torch-fidelity, weights from a local file (docs/evaluation.md#inception-fid, extra metric)."""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from src.metrics.clip import require_file
from src.metrics.images import to_uint8
from src.utils.io import weights_sha256


class InceptionFeatureExtractor:
    """torch-fidelity's InceptionV3 (the FID network of Heusel et al.) with its state dict from a local file.

    The file is torch-fidelity's Inception state dict (weights-inception-2015-12-05-6726825d.pth). It is first
    read here with weights_only=True, which rejects anything but tensors, and only then handed to
    torch-fidelity's own loader. Inputs are rounded to uint8 as torch-fidelity expects (as a saved PNG would be)
    and resized by torch-fidelity to 299 x 299 the way TF1 did.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None,
        device: str | torch.device = "cpu",
        config_key: str = "eval.inception.weights_path",
    ):
        path = require_file(weights_path, config_key)
        self.weights_sha256 = weights_sha256(path)  # before the weights are read: the id names this content
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"{config_key}: {path} is not a state dict of tensors (torch-fidelity's Inception file)")
        del state
        self.weights_path, self.device = path, torch.device(device)
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        self.model.to(self.device)

    @property
    def id(self) -> str:
        """Identifies the features for the reference-statistics cache: by the weights' content, not the file name."""
        return f"inception-v3-2048:{self.weights_sha256[:16]}"

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """2048-d pool features (B, 2048), float32 on CPU, of (B, 1 or 3, H, W) images in [-1, 1]; NaN rows for
        images that are not finite (a diverged sample): NaN has no uint8 value (the cast gives 0, i.e. finite
        features of a black image), and the FID of such samples is null, as CLIP's is."""
        (features,) = self.model(to_uint8(images).to(self.device))
        features = features.float().cpu()
        features[~torch.isfinite(images.detach()).flatten(1).all(1).cpu()] = float("nan")
        return features
