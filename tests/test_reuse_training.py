"""A sweep over settings that only change the evaluation (the sampler) trains each model once: the second
directory links the first's checkpoints and evaluates (src/training/job.py reuse_training), through the CLI."""
import json
import os

import pytest

from src.results import read_results
from tests import warm
from tests.test_faults import TINY, cache_dir, run_cli  # noqa: F401 (cache_dir is a fixture)


def _sweep(tmp_path, cache_dir, *extra):
    return run_cli(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=s",
                    "loss=rf", "sampler=rf_time,native", *extra])


def test_a_sampler_sweep_trains_each_model_once(tmp_path, cache_dir, capsys):
    out = _sweep(tmp_path, cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    recipe = tmp_path / "outputs" / "multirun" / "s" / "digits" / "rf"
    first, second = recipe / "sampler=rf_time", recipe / "sampler=native"
    assert not (first / "reused_training.json").exists()
    assert json.loads((second / "reused_training.json").read_text()) == {"checkpoints_from": str(first.resolve())}
    assert f"reusing the model trained in {first}" in out.stdout  # the console handler
    assert "2 jobs share 1 training(s): 1 job(s) train first, then the other 1 evaluate the same models" in out.stdout
    names = sorted(p.name for p in (first / "checkpoints").glob("*.ckpt"))
    assert names and names == sorted(p.name for p in (second / "checkpoints").glob("*.ckpt"))
    for name in names:  # the same files (hard links), not a second training
        assert os.path.samefile(first / "checkpoints" / name, second / "checkpoints" / name)
    for run_dir, sampler in ((first, "rf_time"), (second, "native")):
        records = read_results(run_dir)
        assert records and {r["sampler"] for r in records} == {sampler}
    assert not list(second.glob(".checkpoints.reuse.tmp"))
    # The planner says what a third sampler's job would do: evaluate the model trained in sampler=rf_time.
    from src import plan

    capsys.readouterr()
    assert plan.main([*TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=s", "loss=rf",
                      "sampler=rf_time,native,heun"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if "/digits/rf/" in line}
    assert lines[str(recipe / "sampler=heun")].rstrip().endswith("to evaluate (trained in sampler=rf_time)")
    assert lines[str(first)].rstrip().endswith("done") and lines[str(second)].rstrip().endswith("done")
    # Rerunning changes nothing: both are complete.
    before = (second / "results.json").read_bytes()
    again = _sweep(tmp_path, cache_dir)
    assert again.returncode == 0 and (second / "results.json").read_bytes() == before


@pytest.mark.slow  # the quick suite's time budget; `make test-slow` runs it
def test_the_other_ranks_of_a_multi_process_job_leave_evaluation_to_rank_zero(tmp_path, cache_dir):
    """Rank 1 of a two-task job (SLURM's variables) neither trains a model its twin trained nor evaluates: rank 0
    links and evaluates (once, not once per rank)."""
    import sys

    from tests.test_faults import ROOT

    assert _sweep(tmp_path, cache_dir).returncode == 0
    recipe = tmp_path / "outputs" / "multirun" / "s" / "digits" / "rf"
    trained = {d: (recipe / d / "results.json").read_bytes() for d in ("sampler=rf_time", "sampler=native")}
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=s", "loss=rf",
            "sampler=rf_time,native,heun", "eval.n_samples=6"]  # trained twins with records missing, and a new one
    env = {**os.environ, "WANDB_MODE": "disabled", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    out = warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True,
                   timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {d: (recipe / d / "results.json").read_bytes() for d in trained} == trained  # not evaluated by rank 1
    heun = recipe / "sampler=heun"
    assert not list(heun.glob("checkpoints/*.ckpt")) and not (heun / "results.json").exists()  # nor trained
    rank0 = run_cli(args)
    assert rank0.returncode == 0, rank0.stderr[-3000:]
    assert json.loads((heun / "reused_training.json").read_text()) == {
        "checkpoints_from": str((recipe / "sampler=rf_time").resolve())}
    for d in ("sampler=rf_time", "sampler=native", "sampler=heun"):  # rank 0 evaluated each
        assert 6 in {r["n_samples"] for r in read_results(recipe / d)}, d


@pytest.mark.slow  # the quick suite's time budget; `make test-slow` runs it
def test_reuse_training_false_and_other_seeds_train_again(tmp_path, cache_dir):
    out = _sweep(tmp_path, cache_dir, "reuse_training=false")
    assert out.returncode == 0, out.stderr[-3000:]
    recipe = tmp_path / "outputs" / "multirun" / "s" / "digits" / "rf"
    assert not list(recipe.glob("*/reused_training.json"))
    a, b = (recipe / d / "checkpoints" / "last.ckpt" for d in ("sampler=rf_time", "sampler=native"))
    assert not os.path.samefile(a, b)
    # A twin must have the same training configuration: another seed is another model.
    seeds = run_cli(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=t",
                     "loss=rf", "seed=0,1"])
    assert seeds.returncode == 0, seeds.stderr[-3000:]
    assert not list((tmp_path / "outputs" / "multirun" / "t").rglob("reused_training.json"))


def test_a_failed_training_is_not_repeated_by_the_jobs_that_share_it(tmp_path, cache_dir):
    """The first wave's training diverges: the second wave's job, which would train the same model again and fail the
    same way, is not launched; it is named in the summary and failures.json; nothing is created for it."""
    from src.launch.failures import read_sweep_failures

    out = _sweep(tmp_path, cache_dir, "optim.lr=1e30", "optim.warmup_steps=1")
    assert out.returncode == 1
    sweep = tmp_path / "outputs" / "multirun" / "s"
    recipe = sweep / "digits" / "rf"
    assert json.loads((recipe / "sampler=rf_time" / "error.json").read_text())["type"] == "FloatingPointError"
    assert not (recipe / "sampler=native").exists()
    line = "not launched: the training it shares with digits/rf/sampler=rf_time failed; rerun the sweep to retry"
    summary = out.stderr[out.stderr.index("2 job(s) failed:"):]
    assert "digits/rf/sampler=rf_time: FloatingPointError: training loss is" in summary
    assert f"digits/rf/sampler=native: {line}" in summary
    assert read_sweep_failures(sweep)["digits/rf/sampler=native"]["error"] == line
    assert "job 2/" not in out.stderr  # one job was launched, of one
