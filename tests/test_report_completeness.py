"""The rank report never calls a sweep complete that is not, nor ranks runs trained differently together: sweeps made
with `python -m src.run -m ...`, relaunched, damaged or cut short as a kill leaves them, then reported with
`python -m src.ranking.report SWEEP_DIR`."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from src.ranking.report import main
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "train.val_every=4", "train.ckpt_every=4", "eval.n_samples=4", "eval.batch_size=4",
    "eval.settings=[{steps: 2, cfg: 1.0}]", "logger=csv", "trainer.enable_progress_bar=false", "torch_threads=1",
]
RECIPES = "loss=rf_lognorm,edm,eps_linear"
NAMES = ("digits/rf_lognorm_0.00_1.00", "digits/edm_-1.20_1.20", "digits/eps_linear")


def run_cli(root: Path, cache: Path, *args: str, steps: int = 8):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return warm.run([sys.executable, "-m", "src.run", "-m", *TINY, f"train.max_steps={steps}",
                           f"paths.root_dir={root}", f"paths.cache_dir={cache}", *args],
                    cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def report(capsys, *args: str) -> tuple[int, str, str]:
    """python -m src.ranking.report's main, as the command runs it: (exit status, stdout, stderr)."""
    code = main([*map(str, args), "--bootstrap", "0"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished three-recipe sweep (8 steps each): (its root, the shared data cache)."""
    from src.data.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("cache")
    prepare_embedded("digits", cache / "data")
    root = tmp_path_factory.mktemp("base")
    out = run_cli(root, cache, RECIPES)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, cache


def copy_of(base, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the base sweep, as a user copies one to try something on it: (root, sweep directory)."""
    root, _ = base
    shutil.copytree(root / "outputs", tmp_path / "outputs")
    return tmp_path, tmp_path / "outputs" / "multirun" / "default"


def test_a_sweep_cut_short_is_partial_naming_the_job_never_started_and_the_run_evaluated_in_part(base, tmp_path,
                                                                                                  capsys):
    """A kill -9 after job 2 wrote its first record: job 3 has no directory (Hydra makes it when the job starts) and
    job 2's results.json holds its first record (records are merged atomically, one setting at a time). The
    sweep's jobs.json, written by the launches, still names job 3; job 2's configuration asks for two records."""
    root, sweep = copy_of(base, tmp_path)
    # A relaunch of one recipe (complete already) does not make the sweep forget the other two.
    out = run_cli(root, base[1], "loss=edm")
    assert out.returncode == 0 and "complete already, skipped" in out.stderr, out.stderr[-3000:]
    assert sorted(json.loads((sweep / "jobs.json").read_text())) == sorted(NAMES)
    code, text, _ = report(capsys, sweep, "--out", tmp_path / "r0")
    assert code == 0 and "3 run directories (3 done)" in text and "PARTIAL" not in text

    shutil.rmtree(sweep / NAMES[2])
    results = sweep / NAMES[1] / "results.json"
    results.write_text(json.dumps(json.loads(results.read_text())[:1]))
    code, text, _ = report(capsys, sweep, "--out", tmp_path / "r1")
    assert code == 0
    assert "Sweep default: 3 run directories (1 done, 1 partial results, 1 never started)" in text
    partial = next(line for line in text.splitlines() if line.startswith("PARTIAL SWEEP: "))
    assert "1 run planned in jobs.json but never started: digits/eps_linear" in partial
    assert "digits/edm_-1.20_1.20 (1 of 2 records)" in partial
    md = (tmp_path / "r1" / "report.md").read_text()
    assert "| never started | planned in jobs.json, never started |" in md
    assert "| partial results | 1 of the 2 records its configuration asks for; missing: 1 setting(s): 2 steps, " \
           "cfg 1.0 (raw) |" in md


def test_one_run_evaluated_in_part_is_not_done_in_a_sweep_from_before_jobs_json(base, tmp_path, capsys):
    """A sweep made before jobs.json existed still loads; a run short of its records is partial, not done."""
    _, sweep = copy_of(base, tmp_path)
    (sweep / "jobs.json").unlink(missing_ok=True)
    results = sweep / NAMES[0] / "results.json"
    results.write_text(json.dumps(json.loads(results.read_text())[:1]))
    # A record whose arrays are gone counts as missing too (the job evaluates it again; the bootstrap reads them).
    (sweep / NAMES[2] / json.loads((sweep / NAMES[2] / "results.json").read_text())[0]["arrays"]).unlink()
    code, text, _ = report(capsys, sweep, "--out", tmp_path / "r")
    assert code == 0 and "3 run directories (1 done, 2 partial results)" in text
    assert "PARTIAL SWEEP: 2 runs evaluated in part" in text
    assert "digits/eps_linear (1 of 2 records), digits/rf_lognorm_0.00_1.00 (1 of 2 records)" in text
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| partial results | 1 of the 2 records its configuration asks for; 1 without their arrays (eval/*.npz) |" \
        in md


def test_a_relaunch_with_other_training_settings_is_refused_in_one_line_and_its_refusals_are_shown(base, tmp_path,
                                                                                                  capsys):
    """The finished sweep relaunched with one recipe more and optim.warmup_steps=10: the three runs there are refused
    (their directories hold runs warmed up over 50 steps; failures.json), the new one trains. Ranking it against the
    others is refused; ranked alone, the report says the relaunches did not run. (A larger train.max_steps alone
    would train the three on: README "Resume".)"""
    root, sweep = copy_of(base, tmp_path)
    out = run_cli(root, base[1], f"{RECIPES},v_linear", "optim.warmup_steps=10")
    assert out.returncode == 1 and "3 job(s) failed:" in out.stderr, out.stderr[-3000:]
    code, text, err = report(capsys, sweep, "--out", tmp_path / "r")
    assert code == 1 and err.count("\n") == 1 and not (tmp_path / "r").exists()
    assert err.startswith("rank report: error: the runs ranked together were trained with different settings: "
                          "optim.warmup_steps = 50 (3 runs), 10 (1 run) on digits; "), err
    assert "retrain these runs with optim.warmup_steps=50" in err
    assert err.rstrip().endswith(str(sweep / "digits/v_linear"))
    assert "--by-sweep" not in err  # one sweep: that option would not help

    code, text, _ = report(capsys, sweep, "--recipes", "v/linear", "--out", tmp_path / "r")
    assert code == 0
    assert "4 run directories (4 done); 3 relaunches not run (failures.json)" in text
    assert ("PARTIAL SWEEP: 3 runs whose latest launch did not run, their directories holding earlier runs "
            "(failures.json): digits/edm_-1.20_1.20, digits/eps_linear, digits/rf_lognorm_0.00_1.00") in text
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("| relaunch not run | ConfigError: ") == 3
    assert "not run; the directory holds an earlier run: done)" in md


@pytest.mark.slow  # the quick suite's time budget; `make test-slow` runs it
def test_sweeps_of_different_budgets_are_not_pooled(base, tmp_path, capsys):
    """Two sweeps of different recipes, one trained 8 steps and one 9, named in one report: refused in one line;
    --by-sweep ranks each sweep's entries side by side."""
    root, cache = base
    other = tmp_path / "other"
    out = run_cli(other, cache, "loss=v_linear", "sweep_name=longer", steps=9)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = root / "outputs/multirun/default", other / "outputs/multirun/longer"
    code, _, err = report(capsys, first, second, "--out", tmp_path / "r")
    assert code == 1 and err.count("\n") == 1
    assert "train.max_steps = 8 (3 runs), 9 (1 run) on digits" in err and "pass --by-sweep" in err
    code, text, _ = report(capsys, first, second, "--by-sweep", "--out", tmp_path / "r")
    assert code == 0 and "v/linear [sweep=longer]" in text


def test_a_damaged_failures_json_makes_the_sweep_partial_and_a_launch_keeps_it_aside(base, tmp_path, capsys):
    root, sweep = copy_of(base, tmp_path)
    damaged = '{\n  "digits/v_linear": {\n    "error": "ConfigError: loss: ...",\n    "ti'  # cut short
    (sweep / "failures.json").write_text(damaged)
    code, text, _ = report(capsys, sweep, "--out", tmp_path / "r")
    assert code == 0 and "3 run directories (3 done)" in text
    partial = next(line for line in text.splitlines() if line.startswith("PARTIAL SWEEP: "))
    assert partial.startswith(f"PARTIAL SWEEP: {sweep / 'failures.json'} is unreadable (not valid JSON: "
                              "Unterminated string starting at: line 4 column 5")
    assert "): the jobs it recorded as failed are unknown, so the sweep may be incomplete;" in partial
    # The next launch keeps the damaged file aside, says so, and starts a readable one.
    out = run_cli(root, base[1], "loss=edm")
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert f"{sweep / 'failures.json'} is unreadable" in console and "kept as failures.json.damaged" in console
    assert (sweep / "failures.json.damaged").read_text() == damaged
    assert json.loads((sweep / "failures.json").read_text()) == {}
    code, text, _ = report(capsys, sweep, "--out", tmp_path / "r")
    assert code == 0 and "PARTIAL" not in text  # jobs.json names the sweep's jobs: all done
    assert f"{sweep / 'failures.json.damaged'} is a damaged failures.json a launch kept aside" in text


def test_the_report_ranks_the_records_the_latest_launch_asked_for(base, tmp_path, capsys):
    """A relaunch with more samples (eval.n_samples=6), then the sweep's own command again (its n=4 records are
    there: complete already): the report ranks the n=4 records the latest launch asked for, not the newer n=6 ones."""
    from src.ranking.aggregate import load_sweep

    root, sweep = copy_of(base, tmp_path)
    _, cache = base
    more = run_cli(root, cache, "loss=rf_lognorm", "eval.n_samples=6")
    assert more.returncode == 0, more.stderr[-3000:]
    samples = lambda loaded: loaded.records.set_index("run_dir")["n_samples"].to_dict()  # noqa: E731
    rf = str(sweep / NAMES[0])
    assert samples(load_sweep([sweep]))[rf] == 6  # that launch asked for n=6
    again = run_cli(root, cache, "loss=rf_lognorm")
    assert again.returncode == 0 and "complete already, skipped" in again.stderr, again.stderr[-3000:]
    loaded = load_sweep([sweep])
    assert set(samples(loaded).values()) == {4} and set(loaded.duplicates["n_samples"]) == {6}
    assert list(loaded.runs["status"]) == ["done"] * 3
