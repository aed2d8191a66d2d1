"""README commands no other test ran as a user runs them: the Makefile's targets (their commands read from
`make -n`, so the test follows the Makefile), the recipe examples of "Choosing recipes, models and data" (read from
the README itself), and the paper grid's planned GPU-hours. Each runs through its module as `python -m` runs it.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests import warm
from tests.test_progress import TINY, cache_dir  # noqa: F401 -- cache_dir is a fixture

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def make_commands(target: str, *variables: str) -> list[list[str]]:
    """The `python -m ...` commands `make TARGET` runs, as argument lists from `-m` on (the interpreter left out)."""
    out = subprocess.run(["make", "-n", target, "PY=python", *variables], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return [shlex.split(line)[1:] for line in out.stdout.splitlines() if line.startswith("python -m src.")]


def run(args, cwd, *, code=0, timeout=600):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = warm.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_make_sweep_plan_and_rank_report_run_the_documented_commands():
    """README: `make sweep-<name>` and `make plan-<name>` do what `python -m src.run / src.plan +sweep=<name>` do;
    `make rank-report` is `python -m src.ranking.report [SWEEP_DIR ...]`, REPORT_ARGS its options."""
    assert make_commands("sweep-smoke") == [["-m", "src.run", "+sweep=smoke"]]
    assert make_commands("plan-paper_grid") == [["-m", "src.plan", "+sweep=paper_grid"]]
    assert make_commands("sweep-backbones", "ARGS=data=digits") == [
        ["-m", "src.run", "+sweep=backbones", "data=digits"]]
    assert make_commands("rank-report") == [["-m", "src.ranking.report"]]
    assert make_commands("rank-report", "SWEEP=outputs/multirun/smoke", "REPORT_ARGS=--bootstrap 0") == [
        ["-m", "src.ranking.report", "outputs/multirun/smoke", "--bootstrap", "0"]]


def test_make_plan_smoke_lists_the_six_jobs_and_launches_nothing(tmp_path):
    """`make plan-smoke`: the smoke sweep's job list (3 recipes x {digits, shapes}), FLOPs and GPU-hours."""
    [plan] = make_commands("plan-smoke", f"ARGS=paths.root_dir={tmp_path} --mfu 0.3")
    console = run(plan, tmp_path)
    assert "6 jobs (6 to run; done: 0)" in console and "30% utilisation" in console
    for dataset in ("digits", "shapes"):
        for recipe in ("rf_lognorm_0.00_1.00", "eps_linear", "edm_-1.20_1.20"):
            assert f"outputs/multirun/smoke/{dataset}/{recipe}" in console
    assert not (tmp_path / "outputs").exists()  # launches nothing


def test_make_tiny_clip_trains_saves_checksummed_weights_and_their_accuracies(tmp_path):
    """`make tiny-clip` = `python -m src.text.train_tiny_clip` (docs/data.md, Tiny CLIP): the weights and their
    sidecar JSON (sha256, held-out accuracies), loaded back through open_clip with that checksum. Shortened with
    the script's own options; its default --out is the committed file."""
    from src.text import tiny_clip
    from src.text.checkpoints import sha256_file

    [train] = make_commands("tiny-clip")
    assert train == ["-m", "src.text.train_tiny_clip"]
    assert tiny_clip.WEIGHTS_PATH == ROOT / "assets/tiny_clip/tiny_clip.pt"
    out = tmp_path / "clip/tiny_clip.pt"
    console = run([*train, "--steps", "2", "--batch-size", "8", "--threads", "1", "--out", str(out)], tmp_path)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(out) and f"wrote {out} (sha256 {meta['sha256'][:16]}..." in console
    assert meta["training"]["steps"] == 2 and meta["model_name"] == tiny_clip.MODEL_NAME
    accuracies = meta["accuracies"]
    assert (accuracies["digits_eval_images"], accuracies["shapes_eval_images"]) == (297, 500)
    assert 0 <= accuracies["digits_zero_shot_10way"] <= 1 and 0 <= accuracies["shapes_zero_shot_120way"] <= 1
    model, _ = tiny_clip.load_tiny_clip(out, sha256=meta["sha256"])
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 3.5  # docs/data.md: 3.5M parameters


def readme_recipe_examples() -> list[tuple[list[str], str]]:
    """The README's recipe commands ("Choosing recipes, models and data"): (arguments after src.run, comment)."""
    block = README.split("A recipe is chosen by family and parameters, or by its paper name:")[1].split("```")[1]
    lines = [line for line in block.splitlines() if line.startswith("python -m src.run")]
    examples = []
    for line in lines:
        command, comment = line.rsplit("#", 1)
        examples.append((shlex.split(command)[3:], comment.strip()))
    assert len(examples) == 6, lines
    return examples


@pytest.mark.slow
def test_readme_recipe_examples_train_the_recipes_they_name(tmp_path, cache_dir):  # noqa: F811
    """Each command of the README's recipe block, shortened, trains and evaluates the recipe its comment names."""
    examples = readme_recipe_examples()
    common = [*TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    for args, comment in examples[:5]:
        if re.fullmatch(r"[\w/]+\([\d., -]+\)", comment):  # the recipe's name
            recipe = comment
        elif comment == "the paper's name (quote it)":
            [recipe] = [a.split("=", 1)[1].strip("'") for a in args if a.startswith("loss.recipe=")]
        else:  # the generated file's name: paper/edm_0.60_1.20 is edm(0.60, 1.20)
            assert comment == "one of the 61 generated files" and args == ["loss=paper/edm_0.60_1.20"]
            assert len(list((ROOT / "conf/loss/paper").glob("*.yaml"))) == 61
            recipe = "edm(0.60, 1.20)"
        run(["-m", "src.run", *args, *common], tmp_path)
        results = [json.loads(p.read_text()) for p in (tmp_path / "outputs/runs/digits").glob("*/results.json")]
        assert recipe in {r["recipe"] for records in results for r in records}, (args, recipe)
    args, comment = examples[5]
    assert args == ["-m", "loss=rf_lognorm,edm,eps_linear", "data=shapes"] and comment.startswith("a multirun")
    console = run(["-m", "src.run", *args, *common], tmp_path)
    assert "job 3/3: shapes/eps_linear" in console
    runs = tmp_path / "outputs/multirun/default/shapes"
    assert sorted(p.parent.name for p in runs.glob("*/results.json")) == [
        "edm_-1.20_1.20", "eps_linear", "rf_lognorm_0.00_1.00"]


@pytest.mark.slow
def test_paper_grid_plan_gpu_hours_on_h200(tmp_path):
    """README: "The paper grid: 10,290 GPU-hours on H200s at the measured 37.1% (`--gpu H200`)" (1 to 2 minutes)."""
    assert "The paper grid: 10,290 GPU-hours on H200s at the measured 37.1% (`--gpu H200`)" in README.replace(
        "\n", " ")
    console = run(["-m", "src.plan", "+sweep=paper_grid", "--gpu", "H200", f"paths.root_dir={tmp_path}"], tmp_path)
    assert "122 jobs (122 to run; done: 0)" in console
    assert "1.029e+04 in all" in console
    assert "measured 37.1% for d15-default (batch 128) on NVIDIA H200" in console
    assert not (tmp_path / "outputs").exists()


def test_sweeps_readme_job_counts():
    """sweeps/README.md's table: each sweep's number of jobs, as `python -m src.run +sweep=<name>` launches them
    (the planner's expansion, tests/test_sweeps.py), and `+sweep=paper_embedded data=digits` runs 61 jobs."""
    from src import plan

    table = (ROOT / "sweeps/README.md").read_text().split("| sweep | jobs | what |")[1].split("\n\n")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d+) \|", table, re.M))
    assert set(rows) == {p.stem for p in (ROOT / "sweeps").glob("*.yaml")}
    with plan._hydra_context():
        counts = {name: len(plan.expand_jobs([f"+sweep={name}"])[1]) for name in rows}
        digits_only = len(plan.expand_jobs(["+sweep=paper_embedded", "data=digits"])[1])
    assert counts == {name: int(n) for name, n in rows.items()}
    assert digits_only == 61
    assert "+sweep=paper_embedded data=digits` runs 61 jobs" in README
