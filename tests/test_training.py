"""Training end to end on the embedded digits: the loss falls, resume is exact, finished jobs are skipped."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from src.config import ConfigError, register_resolvers
from src.training.job import run_job

register_resolvers()

TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
    "data.batch_size=16", "data.val_samples=32",
    "logger=csv", "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def make_cfg(tmp_path, cache_dir, overrides=()):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *TINY, *overrides],
        )


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def test_training_loss_falls(tmp_path, cache_dir):
    cfg = make_cfg(tmp_path, cache_dir, ["train.max_steps=120", "train.val_every=60", "train.ckpt_every=60",
                                         "optim.warmup_steps=10", "eval.enabled=false"])
    run_dir = tmp_path / "run"
    out = run_job(cfg, run_dir)
    assert out["global_step"] == 120
    log = pd.read_csv(run_dir / "csv" / "metrics.csv")
    train = log["train/loss"].dropna().to_numpy()
    assert len(train) >= 10
    first, last = train[:3].mean(), train[-3:].mean()
    assert last < 0.8 * first, (first, last)
    val = log[["val/loss_mean", "val_ema/loss_mean"]].dropna()
    assert len(val) == 2  # validated at steps 60 and 120, raw and EMA
    assert (run_dir / "checkpoints" / "best.ckpt").exists()


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, step: int, hook: str = "training_step") -> None:
    """Make FormulationModule's `hook` raise Interrupt at global step `step` (a kill there); monkeypatch.undo() or
    setattr back restores it."""
    from src.training import module as module_lib

    original = getattr(module_lib.FormulationModule, hook)

    def interrupted(self, batch, batch_idx):
        if self.global_step == step:
            raise Interrupt()
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.FormulationModule, hook, interrupted)


def test_resume_matches_uninterrupted_run(tmp_path, cache_dir, monkeypatch):
    overrides = ["train.max_steps=12", "train.val_every=6", "train.ckpt_every=4", "eval.enabled=false",
                 "train.ema_every=2"]
    straight = tmp_path / "straight"
    run_job(make_cfg(tmp_path, cache_dir, overrides), straight)

    # Interrupt the second run at step 10 (last checkpoint: step 8), then rerun the same command.
    resumed = tmp_path / "resumed"
    interrupt_at(monkeypatch, 10)
    with pytest.raises(Interrupt):
        run_job(make_cfg(tmp_path, cache_dir, overrides), resumed)
    assert final_state(resumed)[1] == 8
    monkeypatch.undo()
    run_job(make_cfg(tmp_path, cache_dir, overrides), resumed)

    a, step_a = final_state(straight)
    b, step_b = final_state(resumed)
    assert step_a == step_b == 12
    assert a.keys() == b.keys() and any(k.startswith("ema_backbone.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ema_averages_every_ema_every_th_step_and_a_checkpoint_holds_it(tmp_path, cache_dir, monkeypatch):
    """train.ema_every=2: the EMA averages the weights after steps 2 and 4, and last.ckpt of step 4 holds that
    average (docs/training.md#ema). The update read Lightning's step count inside its optimizer_step hook, which
    counts the step only once the hook returns: it averaged the weights after steps 1 and 3."""
    from src.training import module as module_lib

    weights = []
    original = module_lib.FormulationModule.optimizer_step

    def record(self, *args, **kwargs):
        def snapshot():
            return {name: p.detach().clone() for name, p in self.backbone.named_parameters()}

        weights.extend([] if weights else [snapshot()])  # the initial weights, the EMA's start
        original(self, *args, **kwargs)
        weights.append(snapshot())

    monkeypatch.setattr(module_lib.FormulationModule, "optimizer_step", record)
    overrides = ["train.max_steps=4", "train.val_every=4", "train.ckpt_every=4", "eval.enabled=false",
                 "train.ema_every=2", "train.ema_decay=0.5", "optim.warmup_steps=0"]
    run_job(make_cfg(tmp_path, cache_dir, overrides), tmp_path / "run")
    state, step = final_state(tmp_path / "run")
    assert step == 4 and len(weights) == 5
    for name, start in weights[0].items():
        want = 0.5 * (0.5 * start + 0.5 * weights[2][name]) + 0.5 * weights[4][name]
        torch.testing.assert_close(state[f"ema_backbone.{name}"], want, msg=name)


@pytest.mark.slow
def test_a_resumed_run_updates_with_the_configured_adamw_kernel(tmp_path, cache_dir, monkeypatch):
    """optim.fused is a throughput setting (not in the fingerprint): a run resumed under another value, or under
    "auto" on another device, uses the configured kernel. torch's Optimizer.load_state_dict had taken it from the
    checkpoint's parameter groups, so a run checkpointed with the fused kernel stayed fused."""
    from src.training import module as module_lib

    overrides = ["train.max_steps=2", "train.val_every=10", "train.ckpt_every=1", "eval.enabled=false"]
    run_dir = tmp_path / "run"
    interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupt):
        run_job(make_cfg(tmp_path, cache_dir, [*overrides, "optim.fused=true"]), run_dir)
    monkeypatch.undo()
    kernels = []
    original = module_lib.FormulationModule.training_step

    def record(self, batch, batch_idx):
        kernels.append(self.trainer.optimizers[0].param_groups[0]["fused"])
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.FormulationModule, "training_step", record)
    run_job(make_cfg(tmp_path, cache_dir, [*overrides, "optim.fused=false"]), run_dir)
    assert final_state(run_dir)[1] == 2 and kernels == [None]  # step 2, resumed from step 1


def test_training_streams_are_independent_of_each_other_and_of_other_seeds():
    """Every (seed, stream, step) has a stream of its own: replicate seeds, a step's data and its draws, and the
    validation noise share none (version 1 did: seed s's noise was seed s + 3's times)."""
    from src.training.streams import DATA, NOISE, TIMES, VALIDATION, step_generator

    first = {}
    for seed in range(5):
        for stream in (TIMES, NOISE, DATA, VALIDATION):
            for step in range(40):
                draws = tuple(torch.rand(4, generator=step_generator(seed, step, stream)).tolist())
                assert draws not in first, (seed, stream, step, first.get(draws))
                first[draws] = (seed, stream, step)
    old = [torch.rand(4, generator=step_generator(s, k, c, streams=1)) for s, k, c in ((0, 5, NOISE), (3, 5, TIMES))]
    assert torch.equal(*old)
    with pytest.raises(ValueError, match="streams=3: allowed versions are 1 and 2"):
        step_generator(0, 0, streams=3)


def test_a_run_made_before_independent_streams_resumes_with_its_own(tmp_path, cache_dir, monkeypatch):
    """A run directory bound before fingerprint.json recorded "streams" trained with version 1: resumed today, it ends
    with exactly the weights of an uninterrupted version-1 run (not a mix of two streams); a new run takes today's."""
    import json

    from src.training import streams as streams_lib

    overrides = ["train.max_steps=6", "train.val_every=3", "train.ckpt_every=3", "eval.enabled=false"]
    monkeypatch.setattr(streams_lib, "STREAMS", 1)  # the code before: every run of version 1
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_job(make_cfg(tmp_path, cache_dir, overrides), straight)
    interrupt_at(monkeypatch, 4)
    with pytest.raises(Interrupt):
        run_job(make_cfg(tmp_path, cache_dir, overrides), resumed)
    monkeypatch.undo()  # today's code
    fingerprint = json.loads((resumed / "fingerprint.json").read_text())
    assert fingerprint.pop("streams") == 1
    (resumed / "fingerprint.json").write_text(json.dumps(fingerprint))  # as written before the key existed
    run_job(make_cfg(tmp_path, cache_dir, overrides), resumed)
    a, b = final_state(straight), final_state(resumed)
    assert a[1] == b[1] == 6 and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    new = tmp_path / "new"
    run_job(make_cfg(tmp_path, cache_dir, overrides), new)
    assert json.loads((new / "fingerprint.json").read_text())["streams"] == streams_lib.STREAMS == 2
    key = "backbone.x_embedder.proj.weight"
    assert not torch.equal(final_state(new)[0][key], a[0][key])  # other draws


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The same last and best checkpoints (step and weights, bitwise) and the same evaluation records."""
    import json

    for name in ("last.ckpt", "best.ckpt"):
        a = torch.load(reference / "checkpoints" / name, map_location="cpu", weights_only=True)
        b = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert a["global_step"] == b["global_step"], name
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), (name, k)
    records = [json.loads((d / "results.json").read_text()) for d in (reference, run_dir)]
    assert [(r["checkpoint_step"], r["fid_clip"]) for r in records[0]] == \
        [(r["checkpoint_step"], r["fid_clip"]) for r in records[1]]


def validation_rows(run_dir: Path) -> list:
    from src.training.metrics_log import read_metrics

    log = read_metrics(run_dir / "csv" / "metrics.csv")
    return log[["step", "val_ema/loss_mean"]].dropna().values.tolist()


@pytest.mark.parametrize("killed_at", [8, 12])
def test_killed_in_the_validation_of_a_checkpoint_step_resumes_to_the_same_run(tmp_path, cache_dir, monkeypatch,
                                                                                killed_at):
    """A job killed while validating a step that is also a checkpoint step (the final one included): its last
    checkpoint is the step before, so the rerun validates that step, selects the same best model and evaluates it."""
    overrides = ["train.max_steps=12", "train.val_every=4", "train.ckpt_every=4", "eval.n_samples=4",
                 "eval.batch_size=4", "eval.settings=[{steps: 2, cfg: 5.0}]", "eval.ema=[true]", "optim.lr=0.05"]
    straight = tmp_path / "straight"
    run_job(make_cfg(tmp_path, cache_dir, overrides), straight)

    resumed = tmp_path / "resumed"
    interrupt_at(monkeypatch, killed_at, "validation_step")
    with pytest.raises(Interrupt):
        run_job(make_cfg(tmp_path, cache_dir, overrides), resumed)
    assert final_state(resumed)[1] == killed_at - 4  # not a checkpoint of a step whose validation did not run
    monkeypatch.undo()
    run_job(make_cfg(tmp_path, cache_dir, overrides), resumed)

    assert validation_rows(resumed) == validation_rows(straight) and len(validation_rows(straight)) == 3
    assert_same_run(resumed, straight)


INTERRUPTED = ["train.max_steps=12", "train.val_every=4", "train.ckpt_every=100", "eval.n_samples=4",
               "eval.batch_size=4", "eval.settings=[{steps: 2, cfg: 5.0}]", "eval.ema=[true]", "optim.lr=0.05",
               "trainer.log_every_n_steps=1"]


def interrupt_and_rerun(tmp_path, cache_dir, monkeypatch, hook: str, at: int, signum) -> dict:
    """An uninterrupted run, and a run sent signum from FormulationModule.<hook> at global step `at` (it must stop
    before the evaluation), then rerun to its end; checks that the rerun ends as the uninterrupted run (validations,
    training-loss rows, checkpoints, results); returns the last.ckpt the stopped run left."""
    import os
    import signal

    from src.training import module as module_lib
    from src.training.metrics_log import read_metrics

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_job(make_cfg(tmp_path, cache_dir, INTERRUPTED), straight)
    original = getattr(module_lib.FormulationModule, hook)
    sent = []

    def interrupted(self, batch, batch_idx):
        if self.global_step == at and not sent:
            sent.append(at)
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.FormulationModule, hook, interrupted)
    previous = signal.getsignal(signum)
    try:
        with pytest.raises(SystemExit) as stop:  # Ctrl-C: status 1; SIGTERM: Lightning's SIGTERMException
            run_job(make_cfg(tmp_path, cache_dir, INTERRUPTED), resumed)
    finally:
        signal.signal(signum, previous)
    assert sent == [at] and not (resumed / "results.json").exists()  # stopped before the evaluation
    assert signum != signal.SIGINT or stop.value.code == 1
    monkeypatch.setattr(module_lib.FormulationModule, hook, original)
    stopped = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    run_job(make_cfg(tmp_path, cache_dir, INTERRUPTED), resumed)

    assert validation_rows(resumed) == validation_rows(straight)
    losses = [read_metrics(d)[["step", "train/loss"]].dropna().values.tolist() for d in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    assert_same_run(resumed, straight)
    return stopped


@pytest.mark.parametrize("hook, at", [("training_step", 6), ("validation_step", 8), ("validation_step", 12)],
                         ids=["training", "validation", "final-validation"])
def test_ctrl_c_stops_and_the_rerun_ends_as_the_uninterrupted_run(tmp_path, cache_dir, monkeypatch, hook, at):
    """Ctrl-C in a training step, in a validation, in the final validation: the job stops with status 1 before the
    evaluation, and the rerun ends with the same validations, training-loss rows, checkpoints and results."""
    import signal

    interrupt_and_rerun(tmp_path, cache_dir, monkeypatch, hook, at, signal.SIGINT)


@pytest.mark.parametrize("hook, at", [("training_step", 5), ("training_step", 7), ("validation_step", 8)],
                         ids=["training", "training-before-a-validation", "validation"])
def test_sigterm_stops_and_the_rerun_logs_the_uninterrupted_runs_steps(tmp_path, cache_dir, monkeypatch, hook, at):
    """`kill` (SIGTERM): Lightning stops after the step's validation and the job saves last.ckpt there (exit 143).
    Saved after Lightning counted the step for its loggers, a checkpoint of a validated step made the rerun count it
    again: every later row of metrics.csv (losses, validations) was labelled one step late."""
    import signal

    stopped = interrupt_and_rerun(tmp_path, cache_dir, monkeypatch, hook, at, signal.SIGTERM)
    assert stopped["global_step"] == (at if hook == "validation_step" else at + 1)


def test_last_checkpoint_is_the_final_step_and_a_finished_run_is_skipped(tmp_path, cache_dir):
    # max_steps is not a multiple of ckpt_every: last.ckpt must still hold the final step.
    overrides = ["train.max_steps=7", "train.val_every=7", "train.ckpt_every=5", "eval.enabled=false"]
    run_dir = tmp_path / "run"
    assert run_job(make_cfg(tmp_path, cache_dir, overrides), run_dir)["global_step"] == 7
    assert final_state(run_dir)[1] == 7
    assert run_job(make_cfg(tmp_path, cache_dir, overrides), run_dir)["skipped"] is True
    # The embedded data in another cache (paths.cache_dir) are the same data: still this run, not another one. A
    # fingerprint stored with whole paths (before they were named by their folder) compares the same.
    assert run_job(make_cfg(tmp_path, tmp_path / "other_cache", overrides), run_dir)["skipped"] is True
    import json

    stored = json.loads((run_dir / "fingerprint.json").read_text())
    assert stored["data"]["train_dir"].endswith("/train") and not stored["data"]["train_dir"].startswith("/")
    stored["data"]["train_dir"] = f"{cache_dir}/data/{stored['data']['train_dir']}"
    stored["data"]["eval_dir"] = f"/elsewhere/data/{stored['data']['eval_dir']}"
    (run_dir / "fingerprint.json").write_text(json.dumps(stored))
    assert run_job(make_cfg(tmp_path, cache_dir, overrides), run_dir)["skipped"] is True


def test_changed_config_in_same_directory_is_an_error(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    base = ["train.max_steps=2", "train.val_every=2", "train.ckpt_every=2", "eval.enabled=false"]
    run_job(make_cfg(tmp_path, cache_dir, base), run_dir)
    with pytest.raises(ConfigError, match="optim.lr"):
        run_job(make_cfg(tmp_path, cache_dir, base + ["optim.lr=0.5"]), run_dir)
    # Trainer settings that change the weights belong to the run too; a finished run is not served as theirs.
    for override, key in (("trainer.gradient_clip_val=0.01", "trainer.gradient_clip_val"),
                          ("trainer.precision=bf16-mixed", "trainer.precision")):
        with pytest.raises(ConfigError, match=key):
            run_job(make_cfg(tmp_path, cache_dir, base + [override]), run_dir)
    assert run_job(make_cfg(tmp_path, cache_dir, base + ["trainer.log_every_n_steps=1"]), run_dir)["skipped"]
    # A run fingerprinted before the trainer section counted resumes under the settings it had (null).
    import json

    stored = json.loads((run_dir / "fingerprint.json").read_text())
    assert stored["trainer"] == {"gradient_clip_val": None, "precision": None}
    del stored["trainer"]
    (run_dir / "fingerprint.json").write_text(json.dumps(stored))
    assert run_job(make_cfg(tmp_path, cache_dir, base), run_dir)["skipped"]
    with pytest.raises(ConfigError, match="trainer.gradient_clip_val"):
        run_job(make_cfg(tmp_path, cache_dir, base + ["trainer.gradient_clip_val=1.0"]), run_dir)


def test_a_finished_run_relaunched_with_fewer_max_steps_is_refused_and_left_as_it_was(tmp_path, cache_dir):
    """Training shorter would need other weights (README "Resume"): refused in one line naming train.max_steps and
    what is allowed, never retrained in place; the directory keeps its files as they were."""
    run_dir = tmp_path / "run"
    base = ["train.val_every=2", "train.ckpt_every=2", "eval.enabled=false"]
    run_job(make_cfg(tmp_path, cache_dir, base + ["train.max_steps=4"]), run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for steps in (3, 1):
        with pytest.raises(ConfigError, match=rf"^train.max_steps={steps}: .* holds a run trained to 4 steps; "
                                              r"allowed: more than 4 \(it trains on from its last.ckpt\)"):
            run_job(make_cfg(tmp_path, cache_dir, base + [f"train.max_steps={steps}"]), run_dir)
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


EXTEND = ["train.val_every=4", "train.ckpt_every=4", "train.ema_every=2", "eval.n_samples=4", "eval.batch_size=4",
          "eval.settings=[{steps: 2, cfg: 1.0}]", "torch_threads=1", "trainer.log_every_n_steps=1", "run_name=extended"]


def run_cli(root: Path, cache_dir: Path, *args: str, module: str = "src.run"):
    """python -m src.run (or src.plan), as the user runs it (a single run: outputs/runs/<run_name>); its output."""
    import os
    import sys

    from tests import warm

    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = warm.run([sys.executable, "-m", module, *TINY, *EXTEND, f"paths.root_dir={root}",
                    f"paths.cache_dir={cache_dir}", *args], cwd=Path(__file__).resolve().parents[1],
                   capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def extended_run(root: Path) -> Path:
    return root / "outputs" / "runs" / "extended"


def test_the_plan_says_a_run_relaunched_with_more_max_steps_is_extended(tmp_path, cache_dir):
    """python -m src.plan on a finished 8-step run with train.max_steps=12: it goes on, not 'refused: changed
    configuration'."""
    run_cli(tmp_path, cache_dir, "train.max_steps=8", "eval.enabled=false")
    out = run_cli(tmp_path, cache_dir, "train.max_steps=12", "eval.enabled=false", module="src.plan")
    [row] = [line for line in out.stdout.splitlines() if "runs/extended" in line]
    assert row.endswith("extend 8 -> 12 steps"), out.stdout


def test_a_finished_run_relaunched_with_more_max_steps_trains_on_to_the_straight_runs_weights(tmp_path, cache_dir):
    """train.max_steps=8, then 12 in the same directory: training goes on from last.ckpt (constant learning rate
    after warm-up; data, times and noise of (seed, step)) to bitwise the weights, EMA, optimizer state and best.ckpt
    of a run trained straight to 12; results.json keeps the step-8 records and adds those of step 12."""
    from src.ranking.aggregate import load_sweep
    from src.results import read_results
    from src.training.metrics_log import read_metrics

    longer, straight = extended_run(tmp_path / "longer"), extended_run(tmp_path / "straight")
    run_cli(tmp_path / "longer", cache_dir, "train.max_steps=8")
    assert {r["checkpoint_step"] for r in read_results(longer)} == {8}
    run_cli(tmp_path / "longer", cache_dir, "train.max_steps=12")
    run_cli(tmp_path / "straight", cache_dir, "train.max_steps=12")
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for d in (straight, longer))
    assert a["global_step"] == b["global_step"] == 12 and any(k.startswith("ema_backbone.") for k in a["state_dict"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    [opt_a], [opt_b] = a["optimizer_states"], b["optimizer_states"]
    for i, state in opt_a["state"].items():
        for k, v in state.items():
            assert torch.equal(v, opt_b["state"][i][k]), (i, k)
    best = [torch.load(d / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["global_step"]
            for d in (straight, longer)]
    assert best[0] == best[1]
    for key in ("train/loss", "val_ema/loss_mean"):  # metrics.csv goes on as for a resume, at the same steps
        curves = [read_metrics(d)[["step", key]].dropna().to_numpy().tolist() for d in (straight, longer)]
        assert curves[0] == curves[1] and len(curves[0]) >= 3, key
    records = read_results(longer)
    assert best[1] == 12 and len(records) == 2 * len(read_results(straight))
    assert sorted(r["checkpoint_step"] for r in records) == [8] * (len(records) // 2) + [12] * (len(records) // 2)
    assert len({r["arrays"] for r in records}) == len(records)  # the step-8 records keep their own samples
    assert json.loads((longer / "fingerprint.json").read_text())["train"]["max_steps"] == 12
    sweep = load_sweep([longer.parent])  # the report ranks the step-12 records, done
    assert list(sweep.runs["status"]) == ["done"] and set(sweep.records["checkpoint_step"]) == {12}


def test_only_rank_zero_binds_the_run_directory(tmp_path, cache_dir, monkeypatch):
    """The job's other ranks write nothing into the run directory: each also wrote fingerprint.json and config.yaml
    through temp files, which rank 0's removal of stale temp files could delete before their rename (an FSDP job
    failed at its start, FileNotFoundError on .fingerprint.json.<random>.tmp)."""
    from src.training import job as job_lib

    class Bound(Exception):
        pass

    def stop(cfg):  # the job's next step after binding
        raise Bound()

    monkeypatch.setattr(job_lib, "build_formulation", stop)
    monkeypatch.setenv("RANK", "1")
    run_dir = tmp_path / "run"
    with pytest.raises(Bound):
        run_job(make_cfg(tmp_path, cache_dir, ["eval.enabled=false"]), run_dir)
    assert not (run_dir / "fingerprint.json").exists() and not (run_dir / "config.yaml").exists()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(Bound):
        run_job(make_cfg(tmp_path, cache_dir, ["eval.enabled=false"]), run_dir)
    assert (run_dir / "fingerprint.json").is_file() and (run_dir / "config.yaml").is_file()


def test_a_launch_that_failed_before_training_does_not_claim_the_directory(tmp_path, cache_dir):
    """A typo fails the job before its first checkpoint; the corrected command then runs in the same directory."""
    run_dir = tmp_path / "run"
    base = ["train.max_steps=2", "train.val_every=2", "train.ckpt_every=2", "eval.enabled=false"]
    with pytest.raises(ConfigError, match="hidden_size"):
        run_job(make_cfg(tmp_path, cache_dir, base + ["model.hidden_size=abc"]), run_dir)
    run_job(make_cfg(tmp_path, cache_dir, base), run_dir)
    assert final_state(run_dir)[1] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.s=-1", "s=-1"),
        ("train.ema_decay=1.5", "train.ema_decay=1.5"),
        ("data.latent_channels=3", "data.latent_channels=3"),
        ("optim.lr=abc", "optim.lr=abc: must be a number > 0"),
        ("train.max_steps=2.5", "train.max_steps=2.5: must be an integer >= 1"),
        ("train.ema_every=true", "train.ema_every=True: must be an integer >= 1"),
        ("train.val_every=0", "train.val_every=0: must be an integer >= 1"),
        ("train.ckpt_every=0", "train.ckpt_every=0: must be an integer >= 1"),
        # Trained as if 0 (no warm-up), or a TypeError in the first step.
        ("optim.warmup_steps=-10", "optim.warmup_steps=-10: must be a number >= 0"),
        ("optim.warmup_steps=abc", "optim.warmup_steps=abc: must be a number >= 0"),
        # Trained without clipping, or Lightning's TypeError once the run directory was bound.
        ("trainer.gradient_clip_val=0", "trainer.gradient_clip_val=0: must be a number > 0 (or null: no clipping)"),
        ("trainer.gradient_clip_val=abc", "trainer.gradient_clip_val=abc: must be a number > 0"),
        # A KeyError at the first dropped sample; a range past the 16 tokens drops nothing there, silently.
        ("train.cond_groups=[{context_token: [0, 16], pooled_channels: [0, 64]}]",
         "train.cond_groups.0.context_token: no such key; a group has context_tokens, context_channels, "
         "pooled_channels (optional) and a name"),
        ("train.cond_groups=[{context_tokens: [16, 32], pooled_channels: [0, 64]}]",
         "train.cond_groups.0.context_tokens=[16, 32]: not allowed; allowed: [start, end] with 0 <= start <= end "
         "<= 16 (the data's context_length)"),
        ("seed=abc", "seed=abc: must be an integer >= 0"),
        ("data.val_samples=0", "data.val_samples=0: must be an integer >= 1"),
        ("eval.batch_size=0", "eval.batch_size=0: must be an integer >= 1"),
        ("eval.settings=[{steps: 0, cfg: 1.0}]", "eval.settings.0.steps=0: must be an integer >= 1"),
        ("eval.ema=[maybe]", "eval.ema.0=maybe: must be a boolean (true or false)"),
        # Read by nothing: the shift-1.0 records would be served as the shifted setting's.
        ("eval.settings=[{steps: 2, cfg: 1.0, shift: 3.0}]",
         "eval.settings.0.shift: no such key; an entry has only steps, cfg; the shift is eval.shift"),
        ("eval.settings=[[2, 1.0]]", "eval.settings.0=[2, 1.0]: must be a mapping {steps: N, cfg: W}"),
        ("eval.settings=[{steps: 2, cfg: 1.0}, {steps: 2, cfg: 1}]",
         "eval.settings.1={steps: 2, cfg: 1}: the same setting as eval.settings.0; list each setting once"),
        ("eval.ema=[false, false]", "eval.ema=[False, False]: lists a value twice"),
        ("data=shards", "data.train_dir is not set"),
    ],
)
def test_bad_values_fail_before_training(tmp_path, cache_dir, override, message):
    evaluated = "true" if override.startswith("eval.") else "false"  # evaluation settings count when it runs
    cfg = make_cfg(tmp_path, cache_dir, [f"eval.enabled={evaluated}", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_job(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluation_writes_one_record_per_setting_and_weights(tmp_path, cache_dir):
    import json

    overrides = ["train.max_steps=4", "train.val_every=4", "train.ckpt_every=4", "eval.n_samples=6",
                 "eval.batch_size=4", "eval.settings=[{steps: 2, cfg: 1.0}, {steps: 3, cfg: 5.0}]"]
    run_dir = tmp_path / "run"
    run_job(make_cfg(tmp_path, cache_dir, overrides), run_dir)
    records = json.loads((run_dir / "results.json").read_text())
    assert sorted((r["steps"], r["cfg"], r["ema"]) for r in records) == [
        (2, 1.0, False), (2, 1.0, True), (3, 5.0, False), (3, 5.0, True)]
    for r in records:
        assert r["recipe"] == "rf/lognorm(0.00, 1.00)" and r["dataset"] == "digits" and r["n_samples"] == 6
        assert r["checkpoint_step"] == 4 and r["config"]["loss"]["family"] == "rf_lognorm"
        assert (run_dir / r["arrays"]).exists() and (run_dir / r["arrays"].replace(".npz", ".png")).exists()
    assert run_job(make_cfg(tmp_path, cache_dir, overrides), run_dir)["skipped"] is True


@pytest.mark.slow
def test_compiled_backbone_trains_like_the_eager_one(tmp_path, cache_dir):
    """model.compile=true compiles the training forward only: the same steps, the same checkpoint keys (no
    `_orig_mod.` prefixes), weights within inductor's float tolerance of the eager run."""
    overrides = ["train.max_steps=4", "train.val_every=4", "train.ckpt_every=4", "eval.enabled=false",
                 "train.ema_every=2"]
    run_job(make_cfg(tmp_path, cache_dir, overrides), tmp_path / "eager")
    from torch._dynamo.utils import counters

    counters.clear()
    run_job(make_cfg(tmp_path, cache_dir, [*overrides, "model.compile=true"]), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1  # the training forward went through torch.compile
    (a, step_a), (b, step_b) = final_state(tmp_path / "eager"), final_state(tmp_path / "compiled")
    assert step_a == step_b == 4 and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_train_shift_trains_at_shifted_times(tmp_path, cache_dir, monkeypatch):
    """train.shift=3.0: every training step's times are the recipe's draws under the shift (the same draws, moved
    toward noise); train.shift is part of the run's fingerprint (a changed value is another model)."""
    from src.config import fingerprint
    from src.training import module as module_lib

    seen = {}
    original = module_lib.FormulationModule._loss

    def record(self, forward, x0, eps, t, *args):
        if torch.is_grad_enabled():  # training steps (validation runs without gradients)
            seen.setdefault(self.shift, []).append(t.detach().clone())
        return original(self, forward, x0, eps, t, *args)

    monkeypatch.setattr(module_lib.FormulationModule, "_loss", record)
    for shift in (1.0, 3.0):
        cfg = make_cfg(tmp_path, cache_dir, ["loss=rf_lognorm", "train.max_steps=2", "train.val_every=2",
                                             "train.ckpt_every=2", f"train.shift={shift}", "eval.enabled=false"])
        assert fingerprint(cfg)["train"]["shift"] == shift
        run_job(cfg, tmp_path / f"shift{shift}")
    n = cfg.data.batch_size
    plain, shifted = torch.cat(seen[1.0]), torch.cat(seen[3.0])
    assert len(plain) == 2 * n and torch.allclose(shifted, 3 * plain / (1 + 2 * plain), atol=1e-6)


@pytest.mark.parametrize("override, message", [("train.shift=0", "train.shift=0: must be a number > 0 (1.0 = no "
                                                                  "shift)")])
def test_train_shift_is_checked(tmp_path, cache_dir, override, message):
    from src.training.prepare import check_values

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_values(make_cfg(tmp_path, cache_dir, [override]))


@pytest.mark.parametrize("override, message", [
    ("eval.shift=inf", "eval.shift=inf: must be a number > 0 (1.0 = no shift)"),
    ("eval.settings=[{steps: 2, cfg: inf}]", "eval.settings.0.cfg=inf: must be a number >= 0, finite"),
    # An infinite learning rate trained: the first update made the weights NaN ("training loss is nan at step 1"),
    # and an infinite warm-up trained at a rate of 0, silently.
    ("optim.lr=inf", "optim.lr=inf: must be a number > 0, finite"),
    ("optim.warmup_steps=inf", "optim.warmup_steps=inf: must be a number >= 0, finite"),
])
def test_infinite_eval_shift_or_cfg_fails_before_training(tmp_path, cache_dir, override, message):
    """"> 0" let infinity through: the sampler refused it only once the training had ended."""
    from src.training.prepare import check_values

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_values(make_cfg(tmp_path, cache_dir, ["eval.enabled=true", override]))


def test_validation_runs_its_fixed_batch_in_chunks_of_the_training_batch():
    """data.val_samples (1024 in the paper setup) went through the backbone in one forward per level: a memory peak
    of its own. In chunks of the per-rank training batch (val_chunk), every logged loss is the same."""
    from src.formulations import get_recipe
    from src.models import MMDiT
    from src.training.module import FormulationModule

    torch.manual_seed(0)
    backbone = MMDiT(input_size=8, patch_size=2, in_channels=1, depth=1, hidden_size=32, num_heads=2, context_dim=16,
                     pooled_dim=8)
    batch = {"x0": torch.randn(10, 1, 8, 8), "context": torch.randn(10, 4, 16), "pooled": torch.randn(10, 8)}
    sizes = []
    backbone.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))

    def logged(val_chunk):
        module = FormulationModule(get_recipe("rf/lognorm(0.00, 1.00)"), backbone, val_levels=4, val_chunk=val_chunk)
        module.ema_backbone = backbone  # the hook counts the EMA copy's forwards too
        out = {}
        module.log = lambda name, value, **kw: out.__setitem__(name, value.item())
        sizes.clear()
        with torch.no_grad():
            module.validation_step(batch, 0)
        return out, set(sizes)

    whole, whole_sizes = logged(None)
    chunked, chunk_sizes = logged(4)
    assert whole_sizes == {10} and chunk_sizes == {4, 2}
    assert chunked.keys() == whole.keys() and len(whole) == 2 * 5
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_validation_splits_its_fixed_batch_over_the_ranks_and_adds_their_sums():
    """Every rank validated the whole fixed batch. Now rank r takes rows [r * ceil(n / world), ...), a rank short of
    rows repeats its last one with weight 0 (so every rank runs as many forwards, as FSDP needs), and the per-level
    sums added over the ranks give the one-process losses."""
    from types import SimpleNamespace

    from src.formulations import get_recipe
    from src.models import MMDiT
    from src.training.module import FormulationModule

    torch.manual_seed(0)
    backbone = MMDiT(input_size=8, patch_size=2, in_channels=1, depth=1, hidden_size=32, num_heads=2, context_dim=16,
                     pooled_dim=8)
    batch = {"x0": torch.randn(10, 1, 8, 8), "context": torch.randn(10, 4, 16), "pooled": torch.randn(10, 8)}
    seen = []
    backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))

    def logged(world, rank, partial):
        module = FormulationModule(get_recipe("rf/lognorm(0.00, 1.00)"), backbone, val_levels=4, val_chunk=6)
        module.ema_backbone = backbone
        if world > 1:  # the sums leave through the strategy's reduce; kept here to be added by hand
            reduce = lambda tensor, reduce_op: partial.append((reduce_op, tensor.clone())) or tensor  # noqa: E731
            module._trainer = SimpleNamespace(world_size=world, global_rank=rank,
                                              strategy=SimpleNamespace(reduce=reduce))
        module.log = lambda name, value, **kw: None
        seen.clear()
        with torch.no_grad():
            module.validation_step(batch, 0)
        return [x.shape[0] for x in seen], torch.cat(seen[:2])  # the first level's rows (val backbone)

    one = []
    module = FormulationModule(get_recipe("rf/lognorm(0.00, 1.00)"), backbone, val_levels=4, val_chunk=6)
    module.ema_backbone = backbone
    module.log = lambda name, value, **kw: one.append((name, value.item()))
    seen.clear()
    with torch.no_grad():
        module.validation_step(batch, 0)
    one_rows = torch.cat(seen[:2])  # chunks of 6 and 4 in one process

    partial, rows = [], []
    for rank in range(3):
        sizes, inputs = logged(3, rank, partial)
        assert sizes == [2, 2] * 4 * 2  # ceil(10 / 3) = 4 rows in chunks of 6 // 3, per level and backbone
        rows.append(inputs)
    assert {op for op, _ in partial} == {"sum"} and len(partial) == 3 * 2
    assert torch.equal(torch.cat([rows[0], rows[1], rows[2][:2]]), one_rows)  # disjoint slices covering the batch
    assert torch.equal(rows[2][2], rows[2][1]) and torch.equal(rows[2][3], rows[2][1])  # rows 8, 9, then 9 twice
    val = sum(tensor for (_, tensor), k in zip(partial, [0, 1] * 3) if k == 0) / 10
    one = dict(one)
    assert val.tolist() == pytest.approx([one[f"val/loss_t{k}"] for k in range(4)], rel=1e-6)


def test_ema_update_moves_the_copy_a_fraction_one_minus_decay_toward_the_weights_and_copies_buffers():
    """ema <- decay * ema + (1 - decay) * weights (docs/training.md#ema), with a decay other than 0.5 (where decay
    and 1 - decay coincide); buffers are copied, not averaged; the copy is frozen and in eval mode."""
    from src.training.ema import ema_update, make_ema_copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = make_ema_copy(model)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the trained backbone is untouched
    start = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(4, 3))  # moves BatchNorm's running statistics
    ema_update(ema, model, 0.9)
    for s, e, m in zip(start, ema.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * m, rtol=0, atol=1e-6)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        assert torch.equal(eb, mb)
    with pytest.raises(ValueError, match="different parameter lists"):
        ema_update(ema, torch.nn.Linear(3, 2), 0.9)


def _unit_module(**kwargs):
    """A FormulationModule outside a Trainer (a stand-in backbone: these tests replace its _loss)."""
    from src.formulations import get_recipe
    from src.training.module import FormulationModule

    return FormulationModule(get_recipe("rf/lognorm(0.00, 1.00)"), torch.nn.Linear(1, 1), **kwargs)


def test_a_training_step_draws_times_dropout_and_noise_from_its_step_streams_for_the_global_batch():
    """Times, then dropout decisions (probability train.cond_dropout, one per encoder group), from the TIMES stream of
    (seed, global step); the noise from the NOISE stream; all drawn for the global batch and sliced at this rank's
    rows (docs/training.md#randomness-and-exact-resume)."""
    from types import SimpleNamespace

    from src.training.conditioning import draw_drops, drop_conditioning
    from src.training.streams import NOISE, TIMES, step_generator

    groups = [{"context_tokens": [0, 2], "pooled_channels": [0, 3]},
              {"context_tokens": [2, 4], "pooled_channels": [3, 3]}]
    module = _unit_module(cond_dropout=0.3, cond_groups=groups, seed=5, shift=3.0)
    module._trainer = SimpleNamespace(world_size=2, global_rank=1, global_step=7)
    module.log = lambda *args, **kwargs: None
    seen = {}

    def loss(backbone, x0, eps, t, context, pooled):
        seen.update(eps=eps, t=t, context=context, pooled=pooled)
        return torch.zeros(len(x0))

    module._loss = loss
    n = 16
    batch = {"x0": torch.randn(n, 2, 4, 4), "context": torch.ones(n, 4, 3), "pooled": torch.ones(n, 3)}
    module.training_step(batch, 0)

    rows = slice(n, 2 * n)  # rank 1 of 2
    g = step_generator(5, 7, TIMES)
    f = module.formulation
    t = f.shift_t(f.sample_t(2 * n, generator=g), 3.0)[rows]
    drop = draw_drops(2 * n, 2, 0.3, g)[rows]
    eps = torch.randn(2 * n, 2, 4, 4, generator=step_generator(5, 7, NOISE))[rows]
    context, pooled = drop_conditioning(batch["context"], batch["pooled"], drop, groups)
    assert drop.any() and not drop.all() and not torch.equal(drop[:, 0], drop[:, 1])
    assert torch.equal(seen["t"], t) and torch.equal(seen["eps"], eps)
    assert torch.equal(seen["context"], context) and torch.equal(seen["pooled"], pooled)


def test_validation_draws_fixed_noise_and_logs_the_mean_over_all_levels_but_t_1_for_both_backbones():
    """The validation noise comes from the VALIDATION stream of (seed, batch index); val/ is the trained backbone,
    val_ema/ the EMA copy; loss_mean averages every level but the last (t = 1) (docs/evaluation.md)."""
    from src.training.streams import VALIDATION, step_generator

    module = _unit_module(seed=3, val_levels=4)
    logged, seen = {}, []
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value))

    def loss(backbone, x0, eps, t, context, pooled):
        seen.append(eps)
        return t + (10.0 if backbone is module.ema_backbone else 0.0)

    module._loss = loss
    x0 = torch.randn(5, 2, 4, 4)
    module.validation_step({"x0": x0, "context": torch.ones(5, 4, 3), "pooled": torch.ones(5, 3)}, 2)
    want = torch.randn(x0.shape, generator=step_generator(3, 2, VALIDATION))
    assert len(seen) == 8 and all(torch.equal(e, want) for e in seen)
    levels = module.val_t.tolist()
    assert len(levels) == 4
    for tag, offset in (("val", 0.0), ("val_ema", 10.0)):
        for k, tk in enumerate(levels):
            assert logged[f"{tag}/loss_t{k}"] == pytest.approx(tk + offset)
        assert logged[f"{tag}/loss_mean"] == pytest.approx(sum(levels[:-1]) / 3 + offset)


def test_adamw_takes_the_configured_settings_and_the_learning_rate_warms_up_linearly_per_step():
    """optim.*: AdamW's lr, betas, eps and weight decay; the first update at lr / warmup_steps, the warmup_steps-th
    and every later one at lr, stepped per optimizer step (not per epoch); warmup_steps=0: lr from the start."""
    module = _unit_module(lr=1e-3, betas=(0.8, 0.95), eps=1e-15, weight_decay=0.05, warmup_steps=4)
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-15, 0.05)
    assert len(group["params"]) == 2 and all(p in group["params"] for p in module.backbone.parameters())
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3])
    opt = _unit_module(lr=1e-3, warmup_steps=0).configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_each_stream_is_seeded_as_its_version_says():
    """Runs resume with the generators they were made with: version 2 seeds numpy's SeedSequence of (seed, stream,
    step); version 1 seeded seed * 1_000_003 + step, the noise at seed + 3, the validation noise at seed + 1 and
    the data indices at step + 17 (docs/training.md#randomness-and-exact-resume). A changed formula or offset would
    resume every existing run with other draws, which no resume test (both halves on today's code) can see."""
    import numpy as np

    from src.training.streams import DATA, NOISE, TIMES, VALIDATION, step_generator

    assert (TIMES, NOISE, DATA, VALIDATION) == (0, 1, 2, 3)
    for seed, step in ((0, 0), (2, 5), (7, 1234)):
        for stream in (TIMES, NOISE, DATA, VALIDATION):
            want = int(np.random.SeedSequence([seed, stream, step]).generate_state(1, dtype=np.uint64)[0])
            assert step_generator(seed, step, stream).initial_seed() == want
        for stream, (s, k) in {TIMES: (seed, step), NOISE: (seed + 3, step), DATA: (seed, step + 17),
                               VALIDATION: (seed + 1, step)}.items():
            assert step_generator(seed, step, stream, streams=1).initial_seed() == s * 1_000_003 + k


def test_a_non_finite_training_loss_stops_the_run_naming_the_step():
    from types import SimpleNamespace

    module = _unit_module()
    module._trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=41)
    module.log = lambda *args, **kwargs: None
    batch = {"x0": torch.randn(2, 2, 4, 4), "context": torch.ones(2, 4, 3), "pooled": torch.ones(2, 3)}
    for bad in (float("nan"), float("inf")):
        module._loss = lambda *args, bad=bad: torch.tensor([1.0, bad])
        with pytest.raises(FloatingPointError, match=f"training loss is {bad} at step 41"):
            module.training_step(batch, 0)
    module._loss = lambda *args: torch.tensor([1.0, 3.0])
    assert module.training_step(batch, 0).item() == 2.0


def test_a_single_runs_refusal_names_no_sweep_name(tmp_path, cache_dir):
    """A single run's directory is outputs/runs/<run_name>, whatever sweep_name says: its refusal of a changed
    configuration points to run_tag (or deleting the directory), not to another sweep_name, which a sweep's does."""
    from src.training.prepare import bind_fingerprint, prepare_job

    cfg = make_cfg(tmp_path, cache_dir)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    prepare_job(cfg, run)  # resolves the data keys of the fingerprint
    bind_fingerprint(cfg, run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"trained")  # bound: something was trained here
    changed = make_cfg(tmp_path, cache_dir, ["optim.lr=0.5"])
    with pytest.raises(ConfigError, match=r"different configuration \(optim.lr\); give this configuration its own "
                                          r"directory with run_tag=/<label>, or delete the directory$"):
        prepare_job(changed, run)
    with pytest.raises(ConfigError, match=r"\(optim.lr\); use another sweep_name, give this configuration"):
        prepare_job(changed, run, multirun=True)


def test_the_trainer_clips_the_gradient_norm_at_trainer_gradient_clip_val(tmp_path, cache_dir):
    """trainer.gradient_clip_val=c: before each update the module scales the gradients to total 2-norm c when larger
    (torch.nn.utils.clip_grad_norm_), and leaves smaller ones alone; the job's trainer is built with that value."""
    from src.training.job import build_trainer

    trainer = build_trainer(make_cfg(tmp_path, cache_dir, ["trainer.gradient_clip_val=0.5"]), tmp_path / "run", [], [])
    module = _unit_module()
    module.trainer = trainer
    opt = module.configure_optimizers()["optimizer"]
    params = list(module.backbone.parameters())
    for scale, norm in ((3.0, 0.5), (0.05, None)):  # 2-norm of the gradient [3, 4] * scale: 15, then 0.25
        params[0].grad = torch.full_like(params[0], 3.0 * scale)
        params[1].grad = torch.full_like(params[1], 4.0 * scale)
        module.configure_gradient_clipping(opt, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        total = torch.cat([p.grad.flatten() for p in params]).norm().item()
        assert total == pytest.approx(norm if norm is not None else 5.0 * scale, rel=1e-5)
        assert params[0].grad.item() / params[1].grad.item() == pytest.approx(0.75)  # the direction is kept


def test_best_checkpoint_is_the_lowest_ema_validation_loss(tmp_path, cache_dir):
    """best.ckpt is model selection on val_ema/loss_mean: of the validations logged, the one with the lowest EMA loss,
    not the lowest loss of the raw weights. Here the EMA never updates (ema_every > max_steps): its loss is the same
    at every validation, so the first one stays best, while the raw weights improve."""
    from src.training.metrics_log import read_metrics

    overrides = ["train.max_steps=6", "train.val_every=1", "train.ckpt_every=2", "optim.lr=0.003",
                 "optim.warmup_steps=0", "train.ema_every=100", "eval.enabled=false"]
    run_dir = tmp_path / "run"
    run_job(make_cfg(tmp_path, cache_dir, overrides), run_dir)
    log = read_metrics(run_dir)
    ema, raw = log["val_ema/loss_mean"].dropna(), log["val/loss_mean"].dropna()
    assert len(ema) == len(raw) == 6 and ema.nunique() == 1 and raw.idxmin() != raw.index[0]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    [state] = [s for s in ckpt["callbacks"].values() if "best_model_score" in s]
    assert float(state["best_model_score"]) == pytest.approx(ema.min(), rel=1e-6)
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["global_step"] == state["best_model_step"] == 1  # the first validation: after step 1
