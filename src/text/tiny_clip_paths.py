"""Where the committed tiny CLIP lives: names only, so code that names the feature extractor (the rank report
checking a run's records, src.evaluation.run.feature_extractor_name) or reads its widths (a job's checks before
launching, src.training.prepare.embedded_shapes) does not import open_clip."""

import json
from pathlib import Path

MODEL_NAME = "tiny-clip-16px"
REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_PATH = REPO_ROOT / "assets" / "tiny_clip" / "tiny_clip.pt"
CONFIG_PATH = Path(__file__).parent / "model_configs" / f"{MODEL_NAME}.json"  # open_clip's config of the model


def model_config() -> dict:
    """The tiny CLIP's open_clip config (what tiny_clip registers with open_clip)."""
    return json.loads(CONFIG_PATH.read_text())
