"""Where the committed tiny CLIP lives: names only, so code that names the feature extractor (the rank report
checking a run's records, src.evaluation.run.feature_extractor_name) does not import open_clip."""

from pathlib import Path

MODEL_NAME = "tiny-clip-16px"
REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_PATH = REPO_ROOT / "assets" / "tiny_clip" / "tiny_clip.pt"
