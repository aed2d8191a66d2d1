"""`make run` as a user runs it: the Makefile's two commands, from a fresh directory, with the default logger.

The commands are read from `make -n run`, so the test follows the Makefile. Only the size of the job is shortened
(a smaller model, fewer steps and samples): the launcher, the embedded data on webdataset shards, W&B offline (the
default logger; no test elsewhere trains with it), the evaluation and the report are the user's.
"""

import csv
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORTER = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "train.max_steps=8", "train.val_every=4", "train.ckpt_every=4", "eval.n_samples=4", "eval.batch_size=4",
    "torch_threads=1",
]
SECRET = "local-" + "5ecre7" * 6 + "0123"  # a credential in the environment must reach no file


def make_run_commands() -> list[list[str]]:
    """The `python -m ...` commands of `make run`, as argument lists (the interpreter left out)."""
    out = subprocess.run(["make", "-n", "run", "PY=python"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [shlex.split(line)[1:] for line in out.stdout.splitlines() if line.startswith("python -m src.")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from src.data.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("cache")
    prepare_embedded("digits", cache / "data")
    return cache


def test_make_run_trains_evaluates_and_ranks_with_wandb_offline(tmp_path, cache_dir):
    train, report = make_run_commands()
    assert train == ["-m", "src.run", "-m", "loss=rf_lognorm,edm,eps_linear"]
    assert report == ["-m", "src.ranking.report"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the configuration decides: offline
    env.update(WANDB_API_KEY=SECRET, HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))

    def run(args):
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    console = run([*train, *SHORTER, f"paths.cache_dir={cache_dir}"])
    assert "job 3/3: digits/eps_linear" in console and "wandb" not in console.lower()
    runs = tmp_path / "outputs/multirun/default/digits"
    names = sorted(p.name for p in runs.iterdir())
    assert names == ["edm_-1.20_1.20", "eps_linear", "rf_lognorm_0.00_1.00"]
    for name in names:
        assert (runs / name / "results.json").is_file() and (runs / name / "checkpoints/best.ckpt").is_file()
        offline = list((runs / name / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1, f"{name}: one offline W&B run expected, found {offline}"
        data = offline[0].read_bytes()  # protobuf records: the run's name, config and metric keys appear verbatim
        assert name.encode() in data and b"val_ema/loss_mean" in data and b"eval/ema/50steps_cfg5/fid_clip" in data

    console = run(report)
    assert "Sweep default: 3 run directories (3 done)" in console
    with open(tmp_path / "reports/default/ranks.csv") as f:
        recipes = {row["recipe"] for row in csv.DictReader(f)}
    assert recipes == {"rf/lognorm(0.00, 1.00)", "edm(-1.20, 1.20)", "eps/linear"}
    assert (tmp_path / "reports/default/report.html").is_file()

    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the W&B credential was written to {leaked}"

    # README, Evaluation: relaunching with another evaluation setting evaluates without training.
    checkpoints = {p.name: p.read_bytes() for p in (runs / "rf_lognorm_0.00_1.00/checkpoints").glob("*.ckpt")}
    console = run(["-m", "src.run", "-m", "loss=rf_lognorm", "eval.checkpoint=last", *SHORTER,
                   f"paths.cache_dir={cache_dir}"])
    assert "results for eval.checkpoint=last missing: evaluating, training is done" in console
    assert {p.name: p.read_bytes() for p in (runs / "rf_lognorm_0.00_1.00/checkpoints").glob("*.ckpt")} == checkpoints
    import json

    records = json.loads((runs / "rf_lognorm_0.00_1.00/results.json").read_text())
    assert sorted({r["checkpoint"] for r in records}) == ["best", "last"] and len(records) == 24
