"""Documented sweep commands end to end from an empty directory: the launcher builds the embedded data itself.

Slow (each builds its datasets and trains several jobs on two cores): `make test-slow`.
"""
import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests import warm

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = warm.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                    timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def ranked(report_dir: Path) -> dict[str, dict]:
    with open(report_dir / "ranks.csv") as f:
        return {row["recipe"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_smoke_sweep_and_its_report(tmp_path):
    """README: `python -m src.run +sweep=smoke` (3 recipes x {digits, shapes}), then its report: the commands of
    `make sweep-smoke` and `make rank-report SWEEP=outputs/multirun/smoke`."""
    from tests.test_documented_commands import make_commands

    [sweep] = make_commands("sweep-smoke")
    [report] = make_commands("rank-report", "SWEEP=outputs/multirun/smoke")
    assert sweep == ["-m", "src.run", "+sweep=smoke"]
    assert report == ["-m", "src.ranking.report", "outputs/multirun/smoke"]
    start = time.monotonic()
    run(sweep[1:], tmp_path)
    print(f"smoke sweep from an empty directory: {time.monotonic() - start:.0f} s")
    runs = tmp_path / "outputs/multirun/smoke"
    done = sorted(p.parent.relative_to(runs).as_posix() for p in runs.glob("*/*/results.json"))
    assert done == [f"{d}/{r}" for d in ("digits", "shapes")
                    for r in ("edm_-1.20_1.20", "eps_linear", "rf_lognorm_0.00_1.00")]
    for path in runs.glob("*/*/results.json"):
        assert len(json.loads(path.read_text())) == 4  # two sampler settings, EMA and raw
    console = run(report[1:], tmp_path)
    assert "Sweep smoke: 6 run directories (6 done)" in console
    assert set(ranked(tmp_path / "reports/smoke")) == {"rf/lognorm(0.00, 1.00)", "eps/linear", "edm(-1.20, 1.20)"}


@pytest.mark.slow
def test_seed_sweep_at_32px_pools_the_seeds(tmp_path):
    """README's matched pairs at 32x32, shortened: data=shapes data.image_size=32, two seeds, two recipes."""
    short = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16",
             "data.val_samples=32", "train.max_steps=8", "train.val_every=4", "train.ckpt_every=4",
             "eval.n_samples=8", "eval.batch_size=8", "eval.settings=[{steps: 2, cfg: 5.0}]", "torch_threads=1"]
    run(["src.run", "-m", "data=shapes", "data.image_size=32", "seed=0,1", "loss=paper/rf,paper/edm_rf",
         "sweep_name=pairs32", *short], tmp_path)
    sweep = tmp_path / "outputs/multirun/pairs32"
    runs = sorted(p.parent.relative_to(sweep).as_posix() for p in sweep.rglob("results.json"))
    assert runs == [f"shapes/{r}/seed={s}" for r in ("edm_rf", "rf") for s in (0, 1)], runs
    for path in sweep.rglob("results.json"):
        assert all(r["dataset"] == "shapes" for r in json.loads(path.read_text()))
    assert list((tmp_path / ".cache/data").glob("shapes-32px-*")), "the 32px shapes were not built"
    run(["src.ranking.report", "outputs/multirun/pairs32", "--bootstrap", "20"], tmp_path)
    rows = ranked(tmp_path / "reports/pairs32")
    assert set(rows) == {"rf", "edm/rf"} and {row["seeds"] for row in rows.values()} == {"2"}
