"""The embedded default learns something a user can see (issue: sampling and evaluation, 'must show').

Both commands as the README gives them: `python -m src.run` at the defaults (only its evaluation trimmed), then
`python -m src.evaluation.learning_check RUN_DIR`.
"""

import json
import os
import sys
from pathlib import Path

import pytest

from tests import warm

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_rf_lognorm_run_beats_its_initialisation(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        proc = warm.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=1200)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout

    run("src.run", "logger=csv", "eval.n_samples=16", "eval.batch_size=16", "eval.ema=[true]",
        "eval.settings=[{steps: 5, cfg: 5.0}]")
    run_dir = tmp_path / "outputs/runs/digits/rf_lognorm_0.00_1.00"
    out = json.loads(run("src.evaluation.learning_check", str(run_dir), "--n", "100"))
    assert out["trained_fid_clip"] < 0.25 * out["untrained_fid_clip"], out
    assert out["trained_zero_shot_accuracy"] >= 0.7, out  # chance is 0.1
    assert out["untrained_zero_shot_accuracy"] <= 0.3, out
    assert json.loads((run_dir / "learning_check.json").read_text()) == out


@pytest.mark.parametrize("args, message", [(["--n", "0"], "argument --n: 0: must be an integer >= 2"),
                                           (["--n", "1"], "argument --n: 1: must be an integer >= 2"),
                                           (["--steps", "0"], "argument --steps: 0: must be an integer >= 1"),
                                           (["--cfg", "-1"], "argument --cfg: -1: must be a number >= 0.0")])
def test_bad_options_are_one_line_errors_before_any_work(tmp_path, capsys, args, message):
    """(--n 0 failed in a reshape traceback after loading the run, --n 1 in FID without naming the option.)"""
    from src.evaluation.learning_check import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
