"""The embedded default learns something a user can see (issue: sampling and evaluation, 'must show')."""

import pytest
from hydra import compose, initialize_config_module

from src.config import register_resolvers
from src.evaluation.learning_check import learning_check
from src.training.job import run_job

register_resolvers()


@pytest.mark.slow
def test_default_rf_lognorm_run_beats_its_initialisation(tmp_path):
    # The default configuration, trimmed only in its evaluation (one setting, few samples).
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"paths.root_dir={tmp_path}", "logger=csv", "trainer.enable_progress_bar=false",
            "eval.n_samples=16", "eval.batch_size=16", "eval.ema=[true]", "eval.settings=[{steps: 5, cfg: 5.0}]",
        ])
    run_dir = tmp_path / "run"
    run_job(cfg, run_dir)
    out = learning_check(run_dir, n=100, steps=25, cfg_scale=5.0)
    assert out["trained_fid_clip"] < 0.25 * out["untrained_fid_clip"], out
    assert out["trained_zero_shot_accuracy"] >= 0.7, out  # chance is 0.1
    assert out["untrained_zero_shot_accuracy"] <= 0.3, out
    assert (run_dir / "learning_check.json").exists()
