"""Fault isolation: a failing job does not stop its sweep; concurrent jobs do not corrupt each other's files."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict

from src.config import ConfigError, register_resolvers
from src.launch import failures
from src.launch.checks import check_no_relaunch_in_multirun
from src.launch.rundir import RunDirBusy, run_dir_lock
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
register_resolvers()

TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "train.max_steps=8", "train.val_every=4", "train.ckpt_every=4", "eval.n_samples=4", "eval.batch_size=4",
    "eval.settings=[{steps: 2, cfg: 1.0}]", "logger=csv", "trainer.enable_progress_bar=false", "torch_threads=1",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from src.data.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("cache")
    prepare_embedded("digits", cache / "data")  # once, before the subprocesses share it
    return cache


def run_cli(args, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True,
                    timeout=timeout, env=env)


# ---- one failing job in a sweep ----------------------------------------------------------------------------------
def test_failing_jobs_are_recorded_and_the_sweep_goes_on(tmp_path, cache_dir):
    """4 jobs: one trains; one diverges (lr 1e30: the loss becomes non-finite); two have an invalid s (found before
    any job is launched: they get no directory)."""
    out = run_cli(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=faults",
                   'run_name="${data.name}/${recipe_slug:${loss}}/lr${optim.lr}"', "loss=rf_lognorm",
                   "loss.s=1.0,-1", "optim.lr=1e-3,1e30", "optim.warmup_steps=1"])
    assert out.returncode == 1, out.stderr[-3000:]
    summary = out.stderr[out.stderr.index("3 job(s) failed:"):]
    assert "digits/rf_lognorm_0.00_1.00/lr1e+30: FloatingPointError: training loss is" in summary
    # The two jobs refused alike: one line naming both.
    assert summary.count("ConfigError: loss: rf_lognorm: s=-1 is not allowed") == 1
    refused = "digits/loss=rf_lognorm,loss.s=-1/optim.lr="
    assert f"  2 jobs ({refused}0.001, {refused}1e+30): ConfigError: loss: rf_lognorm: s=-1 is not allowed" in summary

    sweep = tmp_path / "outputs" / "multirun" / "faults"
    good, diverged = sweep / "digits/rf_lognorm_0.00_1.00/lr0.001", sweep / "digits/rf_lognorm_0.00_1.00/lr1e+30"
    assert (good / "results.json").is_file() and not (good / "error.json").exists()
    err = json.loads((diverged / "error.json").read_text())
    assert err["type"] == "FloatingPointError" and "Traceback" in err["traceback"]

    from src.ranking.aggregate import load_sweep

    runs = load_sweep([sweep]).runs.set_index("run_dir")
    assert runs.loc[str(good), "status"] == "done"
    assert runs.loc[str(diverged), "status"] == "failed"
    assert runs.loc[str(diverged), "error"].startswith("FloatingPointError: training loss is")
    # The two invalid recipes were never launched: no run directory; the sweep's failures.json names them, and the
    # report's run table lists them as failed (a sweep missing two jobs is not complete).
    assert not [p for p in (sweep / "digits").iterdir() if p.name != "rf_lognorm_0.00_1.00"]
    from src.launch.failures import read_sweep_failures

    refused = read_sweep_failures(sweep)
    assert len(refused) == 2 and all("s=-1 is not allowed" in v["error"] for v in refused.values())
    assert (runs["status"] == "failed").sum() == 3
    for name in refused:
        assert runs.loc[str(sweep / name), "status"] == "failed"
        assert "s=-1 is not allowed" in runs.loc[str(sweep / name), "error"]
    # The corrected command: no run will ever have the invalid jobs' stand-in names, so this launch drops them.
    out = run_cli(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=faults",
                   'run_name="${data.name}/${recipe_slug:${loss}}/lr${optim.lr}"', "loss=rf_lognorm",
                   "loss.s=1.0", "optim.lr=1e-3", "optim.warmup_steps=1"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_sweep_failures(sweep) == {}
    assert load_sweep([sweep]).runs.set_index("run_dir").loc[str(diverged), "status"] == "failed"  # its error.json


def test_a_job_failing_before_its_directory_is_locked_is_recorded_in_the_sweeps_failures_json(tmp_path):
    """A job that fails preparing (here its data cache cannot be made: paths.cache_dir is a file) with an error other
    than a configuration error wrote neither error.json nor the sweep's failures.json: once the command's summary
    had scrolled by, nothing said it had failed. Where error.json is not written, failures.json is."""
    (tmp_path / "afile").touch()
    out = run_cli(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'afile'}",
                   "sweep_name=early", "loss=rf,edm", "eval.enabled=false"])
    assert out.returncode == 1 and "2 job(s) failed:" in out.stderr, out.stderr[-3000:]
    from src.launch.failures import read_sweep_failures
    from src.ranking.aggregate import load_sweep

    sweep = tmp_path / "outputs" / "multirun" / "early"
    failures = read_sweep_failures(sweep)
    assert sorted(failures) == ["digits/edm_-1.20_1.20", "digits/rf"]
    assert all(v["error"].startswith("NotADirectoryError: ") for v in failures.values())
    assert not list(sweep.rglob("error.json"))
    runs = load_sweep([sweep]).runs
    assert len(runs) == 2 and (runs["status"] == "failed").all()


def test_fail_fast_stops_at_the_first_failed_job_in_one_line(tmp_path, cache_dir):
    """fail_fast=true: the sweep stops at the first failed job and says so with the summary, not a traceback (the
    job's own is in its run.log and error.json)."""
    out = run_cli(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=ff",
                   "loss=rf_lognorm,edm", "optim.lr=1e30", "optim.warmup_steps=1", "eval.enabled=false",
                   "fail_fast=true"])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-3:] == [
        "1 job(s) failed:", "  digits/rf_lognorm_0.00_1.00: FloatingPointError: training loss is inf at step 1",
        "fail_fast=true: the sweep stopped at the first failed job; rerun it to go on"]
    runs = tmp_path / "outputs/multirun/ff/digits"
    assert (runs / "rf_lognorm_0.00_1.00/error.json").is_file() and not (runs / "edm_-1.20_1.20").exists()


def test_a_deferred_loss_check_names_the_first_bad_step_and_saves_nothing_after_it(tmp_path, cache_dir):
    """train.loss_check_every=4 (a GPU's auto reads the loss every 50 steps): the loss first turns non-finite at step
    1, is found at the step-2 checkpoint, before it is written, and the error names step 1. Checking only every
    4 steps would have saved checkpoints of diverged weights at steps 2 and 3."""
    out = run_cli([*TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "loss=rf_lognorm",
                   "optim.lr=1e30", "optim.warmup_steps=1", "train.loss_check_every=4", "train.ckpt_every=1",
                   "eval.enabled=false"])
    assert out.returncode == 1, out.stderr[-3000:]
    (error,) = tmp_path.rglob("error.json")
    err = json.loads(error.read_text())
    assert err["type"] == "FloatingPointError" and err["error"] == "training loss is inf at step 1", err
    ckpt = torch.load(error.parent / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 1
    assert all(torch.isfinite(v).all() for k, v in ckpt["state_dict"].items() if v.is_floating_point())


def test_a_deferred_loss_check_runs_every_n_steps_and_at_the_end():
    """Between checkpoints the loss is read every loss_check_every steps, and once more when training ends."""
    import lightning as L

    from src.formulations import get_recipe
    from src.models import MMDiT
    from src.training.module import FormulationModule

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return {"x0": torch.randn(2, 2, 8, 8), "context": torch.randn(2, 6, 16), "pooled": torch.randn(2, 8)}

    def fit(max_steps, every, lr):
        torch.manual_seed(0)
        backbone = MMDiT(input_size=8, patch_size=2, in_channels=2, depth=1, hidden_size=32, num_heads=2,
                         context_dim=16, pooled_dim=8)
        module = FormulationModule(get_recipe("rf"), backbone, lr=lr, warmup_steps=1, loss_check_every=every)
        steps = []
        module.training_step = (lambda step: lambda *a: (steps.append(module.global_step), step(*a))[1])(
            module.training_step)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        with pytest.raises(FloatingPointError) as e:
            trainer.fit(module, torch.utils.data.DataLoader(Batches(), batch_size=None))
        return str(e.value), steps[-1]

    assert fit(20, 3, 1e30) == ("training loss is inf at step 1", 2)  # found at the end of step 2 (global_step 3)
    assert fit(2, 5, 1e30) == ("training loss is inf at step 1", 1)  # found when training ends
    assert fit(20, 1, 1e30) == ("training loss is inf at step 1", 1)  # every step: at once


@pytest.mark.parametrize("spoil, error", [
    (lambda p: p.mul_(1e37), r"val/loss_mean is (inf|nan) after 2 training steps \(the weights diverged"),
    (lambda p: p.fill_(float("nan")), r"the weights are not finite after 2 training steps \(the last update diverged"),
], ids=["huge", "nan"])
def test_an_update_that_diverges_after_a_finite_loss_stops_the_run_before_validation_or_a_checkpoint_takes_it(
        tmp_path, spoil, error):
    """The last step's update makes the weights huge (the forward overflows) or NaN; its loss, computed before the
    update, was finite, so the loss check never saw it. Validation logged the non-finite loss (and best.ckpt takes
    whatever the first validation gives), last.ckpt was written of the diverged weights and the run ended as done,
    its evaluation sampling NaN. Now the run stops there, naming it; the checkpoints are of step 1."""
    import lightning as L

    from src.formulations import get_recipe
    from src.models import MMDiT
    from src.training.callbacks import BestCheckpoint, StepCheckpoint
    from src.training.module import FormulationModule

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x0": torch.randn(2, 2, 8, 8, generator=g), "context": torch.randn(2, 6, 16, generator=g),
                    "pooled": torch.randn(2, 8, generator=g)}

    torch.manual_seed(0)
    backbone = MMDiT(input_size=8, patch_size=2, in_channels=2, depth=1, hidden_size=32, num_heads=2,
                     context_dim=16, pooled_dim=8)
    module = FormulationModule(get_recipe("rf"), backbone, lr=1e-3, warmup_steps=1, ema_every=1, val_levels=2)
    step = module.optimizer_step

    def optimizer_step(*args, **kwargs):
        step(*args, **kwargs)
        if module.global_step == 1:  # the second (last) step's update
            with torch.no_grad():
                for p in module.backbone.parameters():
                    spoil(p)

    module.optimizer_step = optimizer_step
    ckpt = tmp_path / "checkpoints"
    callbacks = [BestCheckpoint(dirpath=ckpt, filename="best", monitor="val_ema/loss_mean", mode="min", save_top_k=1,
                                auto_insert_metric_name=False, enable_version_counter=False),
                 StepCheckpoint(ckpt / "last.ckpt", every=1, val_every=1)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=1, check_val_every_n_epoch=None,
                        limit_val_batches=1, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    with pytest.raises(FloatingPointError, match=error):
        trainer.fit(module, loader, loader)
    for name in ("best.ckpt", "last.ckpt"):
        saved = torch.load(ckpt / name, weights_only=True, map_location="cpu")
        assert saved["global_step"] == 1, name
        assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point()), name


def test_a_run_trained_at_null_precision_resumes_only_at_the_precision_it_resolved_to(tmp_path, cache_dir):
    """trainer.precision=null is bf16-mixed on a GPU and 32-true on the CPU: fingerprint.json records what it
    resolved to, and a relaunch on another device is refused in one line naming the precision to give, which it
    then accepts (the finished run is done: nothing retrained)."""
    args = [*TINY, "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2", "eval.enabled=false",
            f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "loss=rf", "run_name=r"]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "outputs" / "runs" / "r"
    fp = json.loads((run / "fingerprint.json").read_text())
    assert fp["trained_precision"] == "32-true" and fp["trainer"]["precision"] is None
    fp["trained_precision"] = "bf16-mixed"  # as a GPU would have resolved it
    (run / "fingerprint.json").write_text(json.dumps(fp))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in ("run.log", ".run.lock")}
    out = run_cli(args)
    assert out.returncode == 1 and (f"ConfigError: trainer.precision=null: {run} was trained at bf16-mixed, and null "
                                    "is 32-true here (bf16-mixed on a GPU, else 32-true); resume it with "
                                    "trainer.precision=bf16-mixed") in out.stderr, out.stderr[-2000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name not in ("run.log", ".run.lock")} \
        == before

    from src import plan

    for launch in ([], ["hydra/launcher=slurm"]):  # without -m, no launcher: it trains here
        [job] = plan.plan_sweep([*args, *launch]).jobs
        assert (job.run_dir, job.status) == (run, "refused: trained at bf16-mixed, trainer.precision=null is 32-true "
                                                  "there")
    out = run_cli([*args, "trainer.precision=bf16-mixed"])
    assert out.returncode == 0, out.stderr[-3000:]
    from src.ranking.aggregate import training_settings

    assert "trained_precision" not in training_settings(run)  # not a setting runs are ranked on


def test_a_sweep_launch_checks_a_null_precision_on_the_device_its_jobs_train_on(tmp_path, cache_dir):
    """The planner and the launcher run on a login node: a sweep of GPU-trained runs (null resolved to bf16-mixed)
    relaunched to SLURM with GPUs resumes there, and was refused before launch because this machine has none. A
    local launch or trainer.accelerator=cpu trains at 32-true: refused by both; a SLURM launch without gpus_per_node
    may get GPUs through gres, so the job checks it."""
    import torch

    from src import plan
    from src.launch.validate import refused_by_run_dir
    from src.training.prepare import _fingerprint_json, resolve_data

    args = ["-m", *TINY, "loss=rf", f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    [job] = plan.plan_sweep(args).jobs
    with plan._hydra_context():
        cfg = plan._compose(job.overrides)
        resolve_data(cfg)
        stored = _fingerprint_json(cfg)
    (job.run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 2}, job.run_dir / "checkpoints" / "last.ckpt")
    (job.run_dir / "fingerprint.json").write_text(json.dumps({**stored, "trained_precision": "bf16-mixed"}))

    refused, errors = "refused: trained at bf16-mixed, trainer.precision=null is 32-true there", {}
    for launch, status in ((["hydra/launcher=slurm"], "resume"), (["hydra/launcher=slurm_8gpu"], "resume"),
                           (["hydra/launcher=local"], refused),
                           (["hydra/launcher=slurm", "trainer.accelerator=cpu"], refused),
                           (["hydra/launcher=slurm_cpu"], "resume")):
        [planned] = plan.plan_sweep([*args, *launch]).jobs
        assert (planned.run_dir, planned.status) == (job.run_dir, status), launch
        with plan._hydra_context():
            error = refused_by_run_dir(plan._compose(planned.overrides))
        assert (error is None) == (status == "resume"), (launch, error)
        errors[launch[-1]] = error
    assert str(errors["hydra/launcher=local"]).startswith(
        f"trainer.precision=null: {job.run_dir} was trained at bf16-mixed, and null is 32-true where this launch "
        "trains"), errors


# ---- the launcher reads failures back from job processes ------------------------------------------------------------
class FakeJob:
    def __init__(self, job_id, result=None, error=None):
        self.job_id, self._result, self._error = job_id, result, error

    def results(self):
        if self._error:
            raise self._error
        return [self._result]


def test_launcher_records_failures_of_remote_jobs(monkeypatch):
    from submitit.core.utils import UncompletedJobError

    from src.launch import submitit as launch

    monkeypatch.setattr(launch, "wait_for", lambda job: None)
    monkeypatch.setattr(failures, "FAILED", [])  # record_failure appends to the module's list
    collect = launch.CollectingSubmititLauncher._collect
    ok = JobReturn(overrides=["loss=rf"], status=JobStatus.COMPLETED, _return_value={"run_dir": "x"})
    own = JobReturn(overrides=["loss=edm"], status=JobStatus.COMPLETED,
                    _return_value={"failed": True, "run_name": "digits/edm", "error": "ConfigError: bad"})
    assert collect(None, FakeJob("1_0", ok), ["loss=rf"]) is ok
    assert collect(None, FakeJob("1_1", own), ["loss=edm"]) is own
    lost = collect(None, FakeJob("1_2", error=UncompletedJobError("Job 1_2 was cancelled\nlong log")),
                   ["loss=eps_linear"])
    assert lost.status == JobStatus.COMPLETED and lost.return_value["failed"]  # the sweeper goes on
    monkeypatch.setattr(launch, "wait_for", lambda job: "CANCELLED")
    collect(None, FakeJob("1_3", ok), ["loss=v_cos"])
    assert failures.FAILED == [
        ("digits/edm", "ConfigError: bad"),
        ("loss=eps_linear", "job 1_2 ended without a result: UncompletedJobError: Job 1_2 was cancelled"),
        ("loss=v_cos", "job 1_3 ended without a result: RuntimeError: the scheduler reports CANCELLED and no "
                       "result was written"),
    ]


def test_failures_are_recorded_in_one_line_and_summarised(monkeypatch):
    """record_failure keeps the first line of the error; summary() counts and lists them in order, "" when none."""
    monkeypatch.setattr(failures, "FAILED", [])
    assert failures.summary() == ""
    failures.record_failure("digits/a", "ValueError: bad\n  traceback line")
    failures.record_failure(Path("digits/b"), "")
    assert failures.summary() == "2 job(s) failed:\n  digits/a: ValueError: bad\n  digits/b: unknown error"
    assert failures.one_line(ValueError("first\nsecond")) == "ValueError: first"


def test_the_sweeps_failures_json_keeps_each_jobs_latest_failure_until_it_runs(tmp_path):
    """record_sweep_failure writes <sweep dir>/failures.json (one line per error, the latest kept per run name,
    nameless jobs marked); clear_sweep_failure drops one job's entry, forget_nameless_failures the nameless ones;
    neither creates the file where there is none."""
    sweep = tmp_path / "sweep"
    failures.clear_sweep_failure(sweep, "digits/a")
    failures.forget_nameless_failures(sweep)
    assert not sweep.exists() and failures.read_sweep_failures(sweep) == {}  # not even a lock file written
    failures.record_sweep_failure(sweep, "digits/a", "ConfigError: first\ndetails")
    failures.record_sweep_failure(sweep, "digits/a", "ConfigError: second")
    failures.record_sweep_failure(sweep, "digits/b", "")
    failures.record_sweep_failure(sweep, "loss=bogus", "ConfigError: no such recipe", nameless=True)
    recorded = failures.read_sweep_failures(sweep)
    assert recorded == json.loads((sweep / failures.SWEEP_FAILURES).read_text())
    assert {k: v["error"] for k, v in recorded.items()} == {
        "digits/a": "ConfigError: second", "digits/b": "unknown error", "loss=bogus": "ConfigError: no such recipe"}
    assert [k for k, v in recorded.items() if v.get("nameless")] == ["loss=bogus"]
    assert all(time.strptime(v["time"], "%Y-%m-%dT%H:%M:%S") for v in recorded.values())
    failures.clear_sweep_failure(sweep, "digits/a")
    assert sorted(failures.read_sweep_failures(sweep)) == ["digits/b", "loss=bogus"]
    failures.forget_nameless_failures(sweep)
    assert sorted(failures.read_sweep_failures(sweep)) == ["digits/b"]
    assert not list(sweep.glob("*.tmp")) and not list(sweep.glob(".*.tmp"))


# ---- concurrent writers ---------------------------------------------------------------------------------------------
def _merge_many(run_dir: str, worker: int, n: int) -> None:
    from src.results import merge_results

    for i in range(n):
        merge_results(run_dir, [{"recipe": f"r{worker}", "dataset": "d", "setting": f"s{i}", "steps": i, "cfg": 1.0,
                                 "ema": True, "clip_score": 0.2, "fid_clip": 1.0, "i": i}])


def test_concurrent_result_merges_keep_every_record(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    records = json.loads((tmp_path / "results.json").read_text())
    assert len(records) == 100
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def _write_errors(path: str, worker: int, n: int) -> None:
    from src.utils.io import atomic_write_json

    for i in range(n):
        atomic_write_json(path, {"type": "E", "error": f"{worker}-{i}", "traceback": "x" * 200_000})


def test_error_json_is_never_seen_half_written(tmp_path):
    path = tmp_path / "error.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_errors, args=(str(path), w, 40)) for w in range(2)]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            json.loads(path.read_text())  # raises on a torn file
            reads += 1
    assert reads > 0 and all(p.exitcode == 0 for p in procs)


def test_an_atomic_write_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path, monkeypatch):
    """A new file renamed over the old one (a reader of the old one reads it whole), its content fsynced before the
    rename, permissions as the umask says (not mkstemp's 0600); a failed write (NaN in JSON, an error while writing)
    leaves the old file and no temp file."""
    import stat

    from src.utils.io import atomic_write, atomic_write_json

    path = tmp_path / "sub" / "results.json"
    atomic_write_json(path, {"a": 1})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(json.loads(path.read_text())), real_fsync(fd)))
    umask = os.umask(0o022)
    try:
        with open(path) as reader:
            atomic_write_json(path, {"b": 2})
            assert json.loads(reader.read()) == {"a": 1}
    finally:
        os.umask(umask)
    assert synced == [{"a": 1}]  # fsynced while the old file was still in place
    assert json.loads(path.read_text()) == {"b": 2} and stat.S_IMODE(path.stat().st_mode) == 0o644
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")})

    def fail(f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"b": 2} and os.listdir(path.parent) == ["results.json"]


def test_first_line_of_an_exception_is_its_first_message_line_or_its_type():
    """Failure summaries are one line: the first line of a multi-line library message, the type for an empty one."""
    from src.utils.io import first_line

    assert first_line(RuntimeError("\n  CUDA out of memory.\nTried to allocate 2 GiB\n")) == "CUDA out of memory."
    assert first_line(KeyError()) == "KeyError"


def test_stale_temp_files_are_removed_but_not_in_skipped_folders(tmp_path):
    """remove_stale_temp_files deletes this module's temp names (temp_sibling's among them) and nothing else; it does
    not enter wandb/ (another library's files)."""
    from src.utils.io import remove_stale_temp_files, temp_sibling

    stale = [temp_sibling(tmp_path / "checkpoints" / "last.ckpt"), tmp_path / "eval" / ".x.npz.abcd_123.tmp"]
    kept = [tmp_path / "wandb" / f".run.{'b' * 32}.tmp", tmp_path / "notes.tmp", tmp_path / "eval" / "x.npz"]
    for p in (*stale, *kept):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert stale[0].parent == tmp_path / "checkpoints" and stale[0].name.startswith(".last.ckpt.")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_stale_temp_files_of_a_run_directory_inside_this_one_are_left_to_its_own_job(tmp_path):
    """Two launches of a sweep at once, one with a key added (sampler=rf_time,ab2): neither saw the other's run
    directories when its launch checks ran, so digits/rf/sampler=ab2 trains inside digits/rf. The outer job's start
    removed the inner job's temp files, the checkpoint or results.json it was writing, whose rename then failed. A
    folder holding a run's lock (.run.lock) belongs to that run's job: not entered."""
    from src.launch.rundir import LOCK_FILE
    from src.utils.io import remove_stale_temp_files, temp_sibling

    inner = tmp_path / "sampler=ab2"
    (inner / "checkpoints").mkdir(parents=True)
    (inner / LOCK_FILE).write_text("")
    writing = [temp_sibling(inner / "checkpoints" / "last.ckpt"), temp_sibling(inner / "results.json")]
    stale = temp_sibling(tmp_path / "results.json")
    for p in (*writing, stale):
        p.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert all(p.exists() for p in writing)
    assert remove_stale_temp_files(inner) == sorted(writing, key=lambda p: p.parent != inner)  # its own job's


# ---- one job per run directory --------------------------------------------------------------------------------------
HOLD = "import sys, time; from src.launch.rundir import run_dir_lock\nwith run_dir_lock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(60)\n"


def test_second_job_in_a_busy_run_directory_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"in use by another job .*pid.*{holder.pid}"):
            with run_dir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(tmp_path):  # released when its holder died
        pass


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"SLURM_PROCID": "3"}, {"LOCAL_RANK": "1"},
                                 {"NODE_RANK": "1", "LOCAL_RANK": "0"}],
                         ids=["torchrun", "slurm", "lightning re-launch", "lightning re-launch, node 1"])
def test_the_other_ranks_of_a_job_share_their_rank_zeros_run_directory(tmp_path, monkeypatch, env):
    """Only a job's first rank takes the lock; the others (started by torchrun, SLURM or Lightning's re-launch of a
    single run) train in the same directory instead of being refused (which left rank 0 waiting for them)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")})
    try:
        assert holder.stdout.readline().strip() == "held"
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with run_dir_lock(tmp_path):  # not refused
            pass
        for key in env:
            monkeypatch.setenv(key, "0")
        with pytest.raises(RunDirBusy):  # rank 0 of a second job is
            with run_dir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_file_names_only_its_current_holder(tmp_path, monkeypatch):
    """The refusal names the holder from the lock file: a new holder's record replaces an earlier one's whole."""
    import socket

    from src.launch.rundir import LOCK_FILE

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job": "123456789"}))
    with run_dir_lock(tmp_path):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
    assert held == {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None}


def test_a_launch_records_its_configuration_and_ends_the_latest_re_evaluation_request(tmp_path, monkeypatch):
    """save_job_config writes .hydra/{config,hydra,overrides}.yaml as Hydra would and removes eval_request.yaml (the
    launch's settings are the run's latest request); a job's other ranks write nothing. A run's configurations are
    read newest first: that request, the latest launch's, the one the directory was bound with."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from src.launch.rundir import EVAL_REQUEST, evaluation_configs, launch_configs, save_job_config

    assert launch_configs(tmp_path) == (tmp_path / ".hydra" / "config.yaml", tmp_path / "config.yaml")
    assert evaluation_configs(tmp_path) == (tmp_path / EVAL_REQUEST, *launch_configs(tmp_path))
    hydra_cfg = OmegaConf.create({"hydra": {"overrides": {"task": ["loss=rf", "seed=1"]}}})
    monkeypatch.setattr(HydraConfig, "instance", lambda: SimpleNamespace(cfg=hydra_cfg))
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / EVAL_REQUEST).write_text("eval: {n_samples: 6}\n")
    monkeypatch.setenv("SLURM_PROCID", "2")
    save_job_config(tmp_path, OmegaConf.create({"seed": 1}))
    assert os.listdir(tmp_path) == [EVAL_REQUEST]
    monkeypatch.setenv("SLURM_PROCID", "")  # set but empty: rank 0
    save_job_config(tmp_path, OmegaConf.create({"seed": 1}))
    assert not (tmp_path / EVAL_REQUEST).exists()
    saved = {name: OmegaConf.to_container(OmegaConf.load(tmp_path / ".hydra" / name))
             for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    assert saved == {"config.yaml": {"seed": 1}, "hydra.yaml": OmegaConf.to_container(hydra_cfg),
                     "overrides.yaml": ["loss=rf", "seed=1"]}


def test_entry_point_leaves_a_busy_run_directory_alone(tmp_path, monkeypatch):
    """src.run.main on a directory another job holds: no training, error.json (the other job's) untouched."""
    from src import run

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=TINY, return_hydra_config=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "error.json").write_text('{"type": "theirs"}')
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(failures, "FAILED", [])
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        out = run.main(cfg)
    finally:
        holder.kill()
        holder.wait()
        HydraConfig.instance().cfg = None
    assert out["failed"] and out["error"].startswith("RunDirBusy:")
    assert (run_dir / "error.json").read_text() == '{"type": "theirs"}'
    assert not (run_dir / "checkpoints").exists()
    assert failures.FAILED[0][1].startswith("RunDirBusy:")


def test_a_job_that_runs_clears_an_earlier_refusal_before_it_works(tmp_path, cache_dir, monkeypatch):
    """failures.json names a launch refused earlier (busy); the next launch that runs the job clears the entry once
    it holds the directory, not at its end: killed half-way, the report would say its latest launch never ran."""
    from src import run
    from src.training import job

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"paths.cache_dir={cache_dir}"],
                      return_hydra_config=True)
    sweep = tmp_path / "sweep"
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.sweep.dir = str(sweep)
        cfg.hydra.runtime.output_dir = str(sweep / "digits/rf_lognorm_0.00_1.00")
    failures.record_sweep_failure(sweep, "digits/rf_lognorm_0.00_1.00", "RunDirBusy: in use by another job")
    seen = []

    def killed(cfg, run_dir):  # what failures.json says while the job works: a kill leaves that
        seen.append(failures.read_sweep_failures(sweep))
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run_job", killed)
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(KeyboardInterrupt):
            run._job(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert seen == [{}] and failures.read_sweep_failures(sweep) == {}


# ---- never Lightning's re-launch inside a multirun ------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, devices, multirun, slurm, refused",
    [
        ("ddp", 2, True, False, True),
        ("fsdp", "auto", True, False, True),
        ("ddp", 2, False, False, False),  # a single run may re-launch itself
        ("ddp", 1, True, False, False),
        ("ddp_spawn", 2, True, False, False),
        ("ddp", 2, True, True, False),  # SLURM started the ranks
        ("auto", 2, True, False, False),
    ],
)
def test_relaunching_strategies_are_refused_in_a_local_multirun(monkeypatch, strategy, devices, multirun, slurm,
                                                                 refused):
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    if slurm:
        monkeypatch.setenv("SLURM_NTASKS", "2")
        monkeypatch.setenv("SLURM_JOB_NAME", "run")
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer.strategy={strategy}", f"trainer.devices={devices}"])
    if refused:
        with pytest.raises(ConfigError, match=f"trainer.strategy={strategy} with trainer.devices={devices}"):
            check_no_relaunch_in_multirun(cfg, multirun)
    else:
        check_no_relaunch_in_multirun(cfg, multirun)


def test_asking_whether_slurm_started_the_ranks_warns_of_nothing_where_srun_exists(monkeypatch, tmp_path):
    """Lightning's SLURM detection warns that `srun` "is available but not used" on any machine that has it (a login
    node): that went to the console of every local sweep checked for a re-launching strategy."""
    import warnings

    from src.launch.checks import ranks_started_outside

    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ranks_started_outside() is False
    assert [str(w.message) for w in seen] == []


@pytest.mark.parametrize("devices, num_nodes, ranks", [
    (2, 1, 2), ("3", 2, 6), ([0, 1], 2, 4), ("0,1,", 1, 2), ("0,1", 3, 6), (-1, 1, None), ("auto", 2, None),
])
def test_the_ranks_a_trainer_starts_are_its_devices_times_its_nodes(devices, num_nodes, ranks):
    from src.launch.checks import _processes

    assert _processes(devices, num_nodes) == ranks


def test_launch_checks_count_every_node_and_all_devices(monkeypatch):
    """The global batch divides over devices x nodes (the trainer's, or the launcher's tasks x nodes);
    trainer.devices=-1 (all of them) may be several ranks, so it is refused in a local multirun like 'auto'."""
    from omegaconf import OmegaConf

    from src.launch.checks import check_batch_over_ranks

    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)

    def cfg(batch, devices=3, num_nodes=2, launcher=None):
        hydra = {"hydra": {"mode": "RunMode.MULTIRUN", "launcher": launcher}} if launcher else {}
        return OmegaConf.create({"trainer": {"strategy": "ddp", "devices": devices, "num_nodes": num_nodes},
                                 "data": {"batch_size": batch}, **hydra})

    check_batch_over_ranks(cfg(66))
    check_batch_over_ranks(cfg(65, devices=1, num_nodes=1))
    with pytest.raises(ConfigError, match="data.batch_size=65: the global batch must divide over the 2 ranks"):
        check_batch_over_ranks(cfg(65, devices=2, num_nodes=1))
    with pytest.raises(ConfigError, match=r"data.batch_size=63: the global batch must divide over the 6 ranks "
                                          r"\(trainer.devices=3 x num_nodes=2\)"):
        check_batch_over_ranks(cfg(63))
    check_batch_over_ranks(cfg(8, launcher={"tasks_per_node": 2, "nodes": 2}))
    with pytest.raises(ConfigError, match=r"over the 4 ranks \(hydra.launcher.tasks_per_node=2 x nodes=2\)"):
        check_batch_over_ranks(cfg(6, launcher={"tasks_per_node": 2, "nodes": 2}))
    with pytest.raises(ConfigError, match="trainer.strategy=ddp with trainer.devices=-1 in a local multirun"):
        check_no_relaunch_in_multirun(cfg(64, devices=-1, num_nodes=1), multirun=True)


def test_an_fsdp_strategy_without_use_orig_params_is_refused():
    """FSDP's own default is use_orig_params=False, which AdamW and the EMA update are not built for: a strategy that
    leaves the key out is refused like one that sets it false."""
    from omegaconf import OmegaConf

    from src.launch.checks import check_fsdp

    strategy = {"_target_": "lightning.pytorch.strategies.FSDPStrategy"}
    with pytest.raises(ConfigError, match="trainer.strategy.use_orig_params=None: allowed: true"):
        check_fsdp(OmegaConf.create({"trainer": {"strategy": strategy}}))
    check_fsdp(OmegaConf.create({"trainer": {"strategy": {**strategy, "use_orig_params": True}}}))


def test_a_relaunching_strategy_in_a_local_multirun_is_refused_before_anything_is_written(monkeypatch):
    """The sweeper's checks before launching ran without the multirun-only launch check: the job refused itself after
    building the data and making the sweep's directories (README: a command refused whole writes nothing at all)."""
    from src.launch.validate import config_error

    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer=ddp", "trainer.devices=2"])
    assert config_error(cfg, []) is None  # a single run may re-launch itself
    assert "in a local multirun" in str(config_error(cfg, [], multirun=True))


@pytest.mark.slow  # the quick suite's time budget: the command's own start (about 10 s); the check is tested above
def test_a_relaunching_strategy_in_a_local_multirun_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    out = subprocess.run([sys.executable, "-m", "src.run", "-m", "loss=rf", "trainer=ddp", "trainer.devices=2",
                          f"paths.root_dir={tmp_path}"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300, env={**env, "WANDB_MODE": "disabled"})
    assert out.returncode == 1 and "digits/rf: ConfigError: trainer.strategy=ddp with trainer.devices=2" in out.stderr
    assert list(tmp_path.iterdir()) == []  # no data built, no sweep directory


# ---- preemption: checkpoint at the step boundary, then submitit's handler --------------------------------------------
class Requeued(BaseException):
    """What submitit's handler does after requeueing: leave the process (sys.exit) from inside the handler."""


def test_preemption_signal_saves_a_checkpoint_before_submitit_requeues(tmp_path, cache_dir, monkeypatch):
    from src.training import module as module_lib
    from src.training.job import run_job

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    calls = []

    def submitit_handler(signum, frame):
        calls.append(signum)
        raise Requeued()

    original = module_lib.FormulationModule.training_step

    def step(self, batch, batch_idx):
        if self.global_step == 5 and not calls:
            os.kill(os.getpid(), signal.SIGUSR2)  # preempted in the middle of step 5
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.FormulationModule, "training_step", step)
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    overrides = [*TINY, "train.max_steps=12", "train.ckpt_every=100", "train.val_every=100", "eval.enabled=false",
                 f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        with pytest.raises(Requeued):
            run_job(cfg, tmp_path / "run")
        assert calls == [signal.SIGUSR2]
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back
        ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 6  # step 5 finished, then saved: no periodic checkpoint was due
        # The requeued job: the same command resumes from that checkpoint and finishes.
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        assert run_job(cfg, tmp_path / "run")["global_step"] == 12
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_saves_a_checkpoint_between_steps(tmp_path, cache_dir, monkeypatch):
    """scancel: Lightning stops between steps on SIGTERM; last.ckpt is that step, not the last periodic one."""
    from src.training import module as module_lib
    from src.training.job import run_job

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    original = module_lib.FormulationModule.training_step

    def step(self, batch, batch_idx):
        if self.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.FormulationModule, "training_step", step)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[
                *TINY, "train.max_steps=12", "train.ckpt_every=100", "train.val_every=100", "eval.enabled=false",
                f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
        with pytest.raises(SystemExit):  # Lightning's SIGTERMException
            run_job(cfg, tmp_path / "run")
    finally:
        signal.signal(signal.SIGTERM, previous)
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6


# ---- a killed local sweep, relaunched -------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_local_sweep_resumes_and_skips(tmp_path, cache_dir):
    """The local launcher killed (SIGKILL) in its second job; the same command skips the first, resumes the second."""
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=killed",
            "train.max_steps=600", "train.ckpt_every=40", "train.val_every=300", "loss=rf,eps_linear",
            "verbose=true"]  # the INFO lines read below reach the console only when verbose
    sweep = tmp_path / "outputs/multirun/killed/digits"
    first, second = sweep / "rf", sweep / "eps_linear"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "src.run", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (second / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert (first / "results.json").is_file() and not (second / "results.json").exists()
    step = torch.load(second / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < 600
    mtime = (first / "results.json").stat().st_mtime_ns

    out = run_cli(args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{first}: results complete, nothing to do" in out.stderr + out.stdout
    assert "Restored all states from the checkpoint" in out.stderr + out.stdout
    assert (first / "results.json").stat().st_mtime_ns == mtime
    assert (second / "results.json").is_file()


def _launch_cfg(strategy="ddp", devices=1, batch=8, launcher=None):
    from omegaconf import OmegaConf

    hydra = {"hydra": {"mode": "RunMode.MULTIRUN", "launcher": launcher}} if launcher else {}
    return OmegaConf.create({"trainer": {"strategy": strategy, "devices": devices, "num_nodes": 1},
                             "data": {"batch_size": batch}, **hydra})


def test_a_forking_strategy_starts_its_own_ranks_so_is_no_relaunch_and_no_slurm_ranks(monkeypatch):
    """ddp_fork forks its ranks without re-running the command: allowed in a local multirun, but under SLURM tasks it
    is a one-process training per task (like ddp_spawn), refused."""
    from src.launch.checks import check_ranks_for_launcher

    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    check_no_relaunch_in_multirun(_launch_cfg("ddp_fork", devices=2), multirun=True)
    with pytest.raises(ConfigError, match="tasks_per_node=2 .* with trainer.strategy=ddp_fork: SLURM would start"):
        check_ranks_for_launcher(_launch_cfg("ddp_fork", launcher={"tasks_per_node": 2, "nodes": 1}))


def test_a_launcher_with_nodes_null_counts_one_node():
    """hydra.launcher.nodes=null is SLURM's default, one node: the ranks are the tasks of that one node."""
    from src.launch.checks import check_batch_over_ranks, check_ranks_for_launcher

    check_ranks_for_launcher(_launch_cfg("auto", launcher={"tasks_per_node": 1, "nodes": None}))
    check_batch_over_ranks(_launch_cfg(batch=6, launcher={"tasks_per_node": 2, "nodes": None}))


def test_check_launch_runs_the_launcher_and_batch_checks():
    """run.main's one entry to the launch checks: each check it leaves out would let its refusal through."""
    from src.launch.checks import check_launch

    with pytest.raises(ConfigError, match="SLURM would start 2 copies"):
        check_launch(_launch_cfg("auto", launcher={"tasks_per_node": 2, "nodes": 1}), multirun=False)
    with pytest.raises(ConfigError, match="data.batch_size=3: the global batch must divide over the 2 ranks"):
        check_launch(_launch_cfg(batch=3, launcher={"tasks_per_node": 2, "nodes": 1}), multirun=False)


def test_a_run_directory_locked_before_its_holder_wrote_its_name_is_refused_naming_an_unknown_process(tmp_path):
    """A holder that has the lock but has not written its record yet leaves the file empty: the refusal still says
    who holds it, as far as is known, rather than an empty pair of parentheses."""
    import fcntl

    from src.launch.rundir import LOCK_FILE

    with open(tmp_path / LOCK_FILE, "a+") as held:  # another open file: flock refuses it as another process
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirBusy, match=r"in use by another job \(unknown process\); not starting a second"):
            with run_dir_lock(tmp_path):
                pass


def test_the_run_log_takes_only_the_records_logged_inside_its_block(tmp_path):
    """run.log is the job's own log: a record logged once the block is over (the next job of a local sweep, in the
    same process) is not appended to this run's log."""
    import logging

    from src.launch.rundir import RUN_LOG, run_log

    logger = logging.getLogger("tests.run_log")
    logger.setLevel(logging.INFO)
    with run_log(tmp_path):
        logger.info("inside")
    logger.info("after")
    text = (tmp_path / RUN_LOG).read_text()
    assert "inside" in text and "after" not in text


def test_fsdp_checks_take_lightnings_spellings_of_the_strategy():
    """Lightning takes `strategy=fsdp` by its registered name and the sharding strategy in any case (it upper-cases
    it): neither is refused or breaks the check."""
    from omegaconf import OmegaConf

    from src.launch.checks import check_fsdp

    check_fsdp(OmegaConf.create({"trainer": {"strategy": "fsdp"}}))
    check_fsdp(OmegaConf.create({"trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.FSDPStrategy",
                                                          "sharding_strategy": "shard_grad_op",
                                                          "use_orig_params": True}}}))


# ---- a hostile file system: full disks, read-only folders ----------------------------------------------------------


def test_refused_write_tells_the_file_system_refusing_from_bad_input():
    """One rule for exit status 1 (the file system refused) vs 2 (bad input) in src.evaluate and src.preprocess: it
    was decided by errno in one and by any OSError in the other, so a path under a file was 1 in one and 2 in the
    other. Hydra's missing option, a busy lock and a missing file are OSErrors too, and bad input."""
    import errno

    from hydra.errors import MissingConfigException

    from src.utils.io import refused_write

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM):
        assert refused_write(OSError(code, os.strerror(code), "/x"))
    assert refused_write(PermissionError(errno.EACCES, "Permission denied"))
    for bad_input in (FileNotFoundError(errno.ENOENT, "No such file"), NotADirectoryError(errno.ENOTDIR, "Not a dir"),
                      IsADirectoryError(errno.EISDIR, "Is a directory"), BlockingIOError(errno.EAGAIN, "busy"),
                      MissingConfigException("Could not find 'loss/nope'", "loss/nope"), ValueError("x"), OSError()):
        assert not refused_write(bad_input), bad_input


def _full_disk(monkeypatch):
    """Every write to a file atomic_write opens fails as on a full disk (ENOSPC)."""
    import errno
    import io as pyio

    from src.utils import io

    class Full(pyio.BufferedWriter):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = os.fdopen
    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode="r", *a, **k: Full(real_fdopen(fd, "wb", buffering=0)))


def test_a_full_disk_during_a_checkpoint_save_names_the_file_and_the_cause(tmp_path, monkeypatch):
    """torch.save turns the write's ENOSPC into `RuntimeError: ... unexpected pos 223744 vs 223632`, which names
    neither; atomic_write raises the OSError with the checkpoint's path, and the old file stays whole."""
    import errno

    from src.training.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "No space left on device" in failures.one_line(info.value) and str(path) in failures.one_line(info.value)
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["last.ckpt"]


def test_an_atomic_write_into_a_folder_it_cannot_write_names_the_file_not_its_temp_name(tmp_path, monkeypatch):
    """A read-only folder refuses the temp file: the error names the file that was to be written."""
    import errno
    import tempfile

    from src.utils.io import atomic_write_json

    def refuse(dir=None, prefix="", suffix=""):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, f"{prefix}abcd1234{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as info:
        atomic_write_json(tmp_path / "reference.npz", {})
    assert info.value.errno == errno.EROFS and info.value.filename == str(tmp_path / "reference.npz")


def test_a_shard_write_failing_on_a_full_disk_names_the_shard_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """The write's ENOSPC names no file, and closing the shard then fails too (its flush): the temp shard, which
    fills the disk, was left behind."""
    import errno

    from src.data.shards import ShardWriter

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    def open_shard(writer):
        real_open_shard(writer)
        real_close = writer._tar.close
        monkeypatch.setattr(writer._tar, "close", lambda: (real_close(), full()))

    real_open_shard = ShardWriter._open_shard
    monkeypatch.setattr(ShardWriter, "_record_layout", full)
    monkeypatch.setattr(ShardWriter, "_open_shard", open_shard)
    shard_dir = tmp_path / "train"
    with pytest.raises(OSError) as info:
        with ShardWriter(shard_dir, encoder_names=["e"], samples_per_shard=4) as writer:
            writer.write(torch.zeros(3, 2, 2), torch.zeros(2, 4), torch.zeros(4), "a caption")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(shard_dir / "shard-000000.tar")
    assert os.listdir(shard_dir) == []


def test_an_output_root_that_cannot_be_made_is_one_line_naming_it(tmp_path):
    """Hydra makes the run directory itself: an output root it cannot create (read-only, full, under a file) was a
    traceback."""
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "sub"
    r = run_cli([f"paths.root_dir={root}", *TINY], timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: NotADirectoryError: [Errno 20] Not a directory: ") and str(root) in lines[0]


def test_a_dangling_last_checkpoint_resumes_from_the_previous_one_not_from_scratch(tmp_path):
    """last.ckpt a link to nothing (its target moved or deleted): it was taken for a run never saved, which trained
    again from step 0 over best.ckpt and last.prev.ckpt; it is an unreadable last.ckpt, so the previous one is used."""
    from src.training.checkpoint_io import LAST, PREVIOUS, AtomicCheckpointIO, checkpoint_to_resume

    ckpt_dir = tmp_path / "checkpoints"
    for step in (8, 16):
        AtomicCheckpointIO().save_checkpoint({"global_step": step}, ckpt_dir / LAST)
    (ckpt_dir / LAST).unlink()
    (ckpt_dir / LAST).symlink_to(tmp_path / "moved" / LAST)
    assert checkpoint_to_resume(ckpt_dir, repair=False) == ckpt_dir / PREVIOUS
    assert checkpoint_to_resume(ckpt_dir) == ckpt_dir / LAST and not (ckpt_dir / LAST).is_symlink()
    assert torch.load(ckpt_dir / LAST, weights_only=True)["global_step"] == 8


def test_a_results_json_that_is_a_folder_or_a_dangling_link_is_refused_naming_it(tmp_path, monkeypatch):
    """A results.json that is not a file was read as no results: the relaunch evaluated the finished run again,
    rewriting its samples, and then failed writing results.json. It is refused as an unreadable results.json is,
    before anything is written."""
    from src import run
    from src.results import read_results
    from src.training import job

    monkeypatch.setattr(job, "training_finished", lambda cfg, run_dir: True)
    (tmp_path / "a" / "results.json").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").symlink_to(tmp_path / "nowhere.json")
    for name, kind in (("a", "a folder"), ("b", "a link to nothing")):
        assert run.run_finished(None, tmp_path / name)  # a launch leaves it as it is
        with pytest.raises(ValueError, match=f"results.json: {kind}, not a results file; move it away"):
            read_results(tmp_path / name)
    assert read_results(tmp_path) == [] and not run.run_finished(None, tmp_path)


def test_a_run_directory_that_is_a_link_to_nothing_is_refused_and_the_sweep_goes_on(tmp_path, cache_dir):
    """Hydra's mkdir fails on a dangling link with `File exists`, which stopped the whole sweep at that job (a
    traceback before src.run said OSErrors in one line). The job is refused before launch, named; the others run."""
    from src.launch.validate import run_dir_not_a_folder

    root = tmp_path / "root"
    digits = root / "outputs" / "multirun" / "default" / "digits"
    digits.mkdir(parents=True)
    (digits / "rf").symlink_to(tmp_path / "moved")
    assert "is a link to nothing" in str(run_dir_not_a_folder(digits / "rf"))
    (tmp_path / "file").write_text("")
    assert "is a file, not a folder" in str(run_dir_not_a_folder(tmp_path / "file"))
    assert run_dir_not_a_folder(digits) is None and run_dir_not_a_folder(tmp_path / "none") is None
    r = run_cli(["-m", "loss=rf,eps_linear", f"paths.root_dir={root}", f"paths.cache_dir={cache_dir}", *TINY,
                 "eval.enabled=false"])
    assert r.returncode == 1, r.stderr
    assert f"digits/rf: ConfigError: run directory {digits / 'rf'} is a link to nothing" in r.stderr
    assert "Traceback" not in r.stderr and (digits / "eps_linear" / "checkpoints" / "last.ckpt").is_file()
    assert (digits / "rf").is_symlink() and not (tmp_path / "moved").exists()


def test_a_metrics_append_on_a_full_disk_names_metrics_csv(tmp_path, monkeypatch):
    """Lightning's append to metrics.csv raises `[Errno 28] No space left on device` naming no file."""
    import errno
    import io as pyio

    from src.training.metrics_log import _AppendingWriter

    writer = _AppendingWriter(str(tmp_path))
    writer.log_metrics({"loss": 1.0}, 0)
    writer.save()

    class Full(pyio.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._fs, "open", lambda *args, **kwargs: Full())
    writer.log_metrics({"loss": 2.0}, 1)
    with pytest.raises(OSError) as info:
        writer.save()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "metrics.csv")


def test_run_log_on_a_full_disk_is_one_warning_and_the_jobs_own_error_stays(tmp_path, capsys):
    """logging printed a traceback per record run.log could not take, and the handler's last flush on closing
    replaced the job's own error with a bare `[Errno 28] No space left on device`."""
    import errno
    import logging

    from src.launch.rundir import run_log

    class Full:
        def write(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = close = write

    with pytest.raises(ValueError, match="the job's own error"):
        with run_log(tmp_path):
            handler = logging.getLogger().handlers[-1]
            handler.stream = Full()
            logging.getLogger("src.x").warning("one")
            logging.getLogger("src.x").warning("two")
            raise ValueError("the job's own error")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("run.log not written further: OSError: [Errno 28]") == 1


def test_a_failed_job_names_only_the_files_that_took_its_traceback(tmp_path, monkeypatch, caplog):
    """The console line said "(traceback in run.log)" when a full disk had refused run.log and error.json both."""
    import errno
    import logging

    from src import run
    from src.launch import rundir
    from src.training import job, prepare

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=TINY, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(failures, "FAILED", [])
    monkeypatch.setattr(prepare, "prepare_job", lambda *args: (tmp_path / "run").mkdir(exist_ok=True))
    monkeypatch.setattr(run, "save_job_config", lambda *args: None)

    def crash(*args):
        raise RuntimeError("crashed")

    monkeypatch.setattr(job, "run_job", crash)
    lines = lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]  # noqa: E731
    try:
        with caplog.at_level(logging.INFO):
            assert run._job(cfg)["failed"]  # a disk with room: both files take it
            assert lines()[-1].endswith(f"(traceback in {tmp_path / 'run' / 'run.log'} and "
                                        f"{tmp_path / 'run' / 'error.json'})")
            caplog.clear()
            real_emit = rundir._RunLogHandler.emit

            def refuse(self, record):  # run.log's write fails as on a full disk
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    self.handleError(record)

            monkeypatch.setattr(rundir._RunLogHandler, "emit", lambda self, r: refuse(self, r) or real_emit(self, r))
            _full_disk(monkeypatch)
            assert run._job(cfg)["failed"]
    finally:
        HydraConfig.instance().cfg = None
    assert lines()[-1] == f"{run.job_name(cfg)} failed: RuntimeError: crashed (traceback not written: the file " \
        "system refused)"


def test_a_sweep_failure_that_cannot_be_recorded_leaves_the_job_failed_not_the_sweep_stopped(tmp_path, monkeypatch):
    """failures.json on a full disk: its OSError escaped the job's handler and stopped the sweep at that job."""
    import errno

    from hydra.types import RunMode

    from src import run
    from src.training import prepare

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=TINY, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(failures, "FAILED", [])

    def refuse(*args, **kwargs):
        raise RuntimeError("refused")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "failures.json"))

    monkeypatch.setattr(prepare, "prepare_job", refuse)
    monkeypatch.setattr(run, "record_sweep_failure", full)
    try:
        out = run._job(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert out["failed"] and out["error"] == "RuntimeError: refused"
    assert failures.FAILED == [(run.job_name(cfg), "RuntimeError: refused")]


def test_a_launch_whose_run_directory_another_configuration_bound_before_its_lock_rewrites_nothing(
        tmp_path, monkeypatch, cache_dir):
    """Two launches of one run at once with different configurations: the second's checks passed on the empty
    directory, then the first bound it (trained, released its lock) before the second took the lock. The second then
    wrote its own .hydra/config.yaml over the first's record of its launch (and removed its eval_request.yaml)
    before run_job's checks refused it. The run directory's checks run again once the lock is held."""
    from src import run
    from src.launch import rundir
    from src.launch.rundir import EVAL_REQUEST

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"paths.cache_dir={cache_dir}"],
                      return_hydra_config=True)
    run_dir = tmp_path / "run"
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(failures, "FAILED", [])
    real_lock = rundir.run_dir_lock
    theirs = {".hydra/config.yaml": "seed: 7\n", EVAL_REQUEST: "eval: {n_samples: 6}\n", "fingerprint.json":
              json.dumps({"seed": 7}), "checkpoints/last.ckpt": "trained by the other launch"}

    def bound_meanwhile(path):  # the other launch ran between this one's checks and its lock
        for name, text in theirs.items():
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_text(text)
        return real_lock(path)

    monkeypatch.setattr(run, "run_dir_lock", bound_meanwhile)
    try:
        result = run._job(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert result["failed"] and "holds a run with a different configuration" in result["error"]
    assert {name: (run_dir / name).read_text() for name in theirs} == theirs
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([".hydra", ".run.lock", EVAL_REQUEST, "checkpoints",
                                                              "fingerprint.json"])
