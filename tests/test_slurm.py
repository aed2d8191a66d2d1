"""Sweeps on a real one-node SLURM cluster started on this machine (scripts/slurm_local.sh), through submitit.

Needs root and Debian's slurm-wlm + munge (installed by the script where apt works); skipped with the reason
otherwise. Each test launches `python -m src.run` with hydra/launcher=slurm_cpu, as a user would.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "eval.n_samples=4", "eval.batch_size=4", "eval.settings=[{steps: 2, cfg: 1.0}]", "logger=csv",
    "trainer.enable_progress_bar=false", "torch_threads=1", "hydra/launcher=slurm_cpu",
    "hydra.launcher.cpus_per_task=1", "data=digits",
    "verbose=true",  # the job logs keep Lightning's and the job's INFO lines, which these tests read
]
RECIPES = ["paper/rf_lognorm_0.00_1.00", "paper/eps_linear", "paper/edm_-1.20_1.20"]


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (SlurmUser=root, daemons, /etc/slurm)")
    if shutil.which("slurmctld") is None:
        out = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            pytest.skip(f"slurm-wlm/munge could not be installed: {out.stderr.strip()[-300:]}")
    was_running = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    out = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.skip(f"slurmctld/slurmd could not be started: {(out.stderr or out.stdout).strip()[-300:]}")
    yield
    subprocess.run(["scancel", "--full", "--quiet", "--partition", "debug"], capture_output=True)
    if not was_running:  # leave the machine as found
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from src.data.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("cache")
    prepare_embedded("digits", cache / "data")
    return cache


class Sweep(subprocess.Popen):
    """`python -m src.run ...` with its output in a file (a pipe nobody reads would block it)."""

    def __init__(self, args, log: Path):
        self.log = log
        env = {**os.environ, "WANDB_MODE": "disabled"}
        with open(log, "w") as f:
            super().__init__([sys.executable, "-m", "src.run", *args], cwd=ROOT, env=env, stdout=f,
                             stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def launch(args) -> Sweep:
    log = Path(tempfile.mkstemp(prefix="sweep-", suffix=".log")[1])
    return Sweep(args, log)


def finish(proc: Sweep, timeout=900):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"sweep did not end in {timeout} s:\n{proc.output()[-3000:]}")
    return proc.returncode, proc.output()


def wait_for(predicate, timeout, what, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before {what}:\n{proc.output()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def slurm_job_id(run_dir: Path) -> str:
    """The SLURM (array task) id of the job that ran in run_dir, as Hydra recorded it."""
    return str(yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def job_log(sweep: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit").glob(f"{job_id}*/*_log.*")))


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def preempt_and_requeue(job_id: str) -> None:
    """Send submitit's preemption signal, wait until SLURM has requeued the job, and let it start again now."""
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)

    def requeued() -> bool:
        state = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        return state == "PENDING"

    wait_for(requeued, 120, "the requeue")
    # SLURM holds a requeued job back for a while (BeginTime); let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_sweep_on_slurm_cancel_then_relaunch_resumes_and_skips(slurm, cache_dir, tmp_path):
    """Three recipes as a SLURM array; one job is cancelled mid-training; the relaunch resumes it, skips the rest."""
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=slurm",
            "train.max_steps=1500", "train.ckpt_every=50", "train.val_every=500", f"loss={','.join(RECIPES)}"]
    sweep = tmp_path / "outputs" / "multirun" / "slurm"
    runs = {r: sweep / "digits" / r.split("/")[1] for r in RECIPES}
    victim = runs["paper/rf_lognorm_0.00_1.00"]  # job 0: among the first two to start on the 2 CPUs

    proc = launch(args)
    wait_for(lambda: (victim / "checkpoints" / "last.ckpt").is_file(), 300, "the victim's first checkpoint", proc)
    job_id = slurm_job_id(victim)
    subprocess.run(["scancel", job_id], check=True)
    code, err = finish(proc)

    # The sweep went on: the other two finished; the summary names the cancelled job; non-zero exit.
    assert code == 1, err[-3000:]
    summary = err[err.index("1 job(s) failed:"):]
    # Named as the job names itself (its run name), with the file submitit kept its output in.
    assert f"  digits/rf_lognorm_0.00_1.00: job {job_id} ended without a result" in summary
    assert f"(its log: {sweep / '.submitit' / job_id / f'{job_id}_0_log.err'})" in summary
    done = [runs["paper/eps_linear"], runs["paper/edm_-1.20_1.20"]]
    assert all((d / "results.json").is_file() for d in done)
    assert not (victim / "results.json").exists()
    interrupted_at = ckpt_step(victim / "checkpoints" / "last.ckpt")
    assert 50 <= interrupted_at < 1500
    # scancel sends SIGTERM first: Lightning stops between two steps and the job saves that step.
    assert f"checkpoint on SIGTERM at step {interrupted_at}" in job_log(sweep, job_id)
    # The rank report's reason: the scheduler's, in the run's error.json (the relaunch removes it).
    assert "the scheduler reports" in json.loads((victim / "error.json").read_text())["error"]
    mtimes = [(d / "results.json").stat().st_mtime_ns for d in done]

    # The same command again: the finished runs are skipped, the cancelled one resumes from its checkpoint.
    code, err = finish(launch(args))
    assert code == 0, err[-3000:]
    assert [(d / "results.json").stat().st_mtime_ns for d in done] == mtimes
    for d in done:
        assert "results complete, nothing to do" in job_log(sweep, slurm_job_id(d))
    log = job_log(sweep, slurm_job_id(victim))
    assert "Restored all states from the checkpoint" in log
    assert (victim / "results.json").is_file() and ckpt_step(victim / "checkpoints" / "last.ckpt") == 1500
    assert not (victim / "error.json").exists()


@pytest.mark.parametrize("setting, line", [
    ("hydra.launcher.partition=nosuch", "ConfigError: hydra.launcher.partition=nosuch: refused by SLURM (invalid "
                                        "partition specified: nosuch; allocation failure: Invalid partition name "
                                        "specified); the partitions: debug"),
    (f"hydra.launcher.tasks_per_node={os.cpu_count() + 1}",
     f"ConfigError: hydra.launcher.nodes=1 hydra.launcher.tasks_per_node={os.cpu_count() + 1} "
     "hydra.launcher.cpus_per_task=1: refused by SLURM (allocation failure: Requested node configuration is not "
     f"available); the nodes: debug: 1 node(s) of {os.cpu_count()} CPUs"),
], ids=["partition", "tasks"])
def test_settings_the_cluster_refuses_are_one_line_and_write_nothing(slurm, cache_dir, tmp_path, setting, line):
    """sbatch --test-only before the sweep writes anything: no sweep directory, no jobs.json, no job submitted."""
    code, err = finish(launch(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                               "loss=paper/rf", setting]))
    assert code == 1 and err.strip().startswith(line) and len(err.strip().splitlines()) == 1, err[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_timeout_over_the_partitions_limit_is_refused_not_left_pending(slurm, cache_dir, tmp_path):
    """The local cluster does not enforce partition limits at submission: a job over the partition's MaxTime would
    stay PENDING (PartitionTimeLimit) and the sweep would wait for ever."""
    subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=60"], check=True)
    try:
        code, err = finish(launch(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                                   "loss=paper/rf", "hydra.launcher.timeout_min=61"]), timeout=300)
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "MaxTime=INFINITE"], check=True)
    assert code == 1 and err.strip() == (
        "ConfigError: hydra.launcher.timeout_min=61: over the time limit of partition debug (1:00:00, 60 min), so "
        "SLURM would keep the jobs pending (PartitionTimeLimit); allowed: up to 60 (a run that needs longer is "
        "requeued, max_num_timeout times)"), err[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_relaunch_while_the_jobs_are_queued_submits_none_again(slurm, cache_dir, tmp_path):
    """The cluster busy, a sweep's array waits; the same command again submits none of its jobs a second time and
    ends at once naming the queued job; once the first launch is over, the command again skips the finished runs."""
    blocker = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={os.cpu_count()}", "--output=/dev/null",
                              "--wrap", "sleep 600"],
                             capture_output=True, text=True, check=True).stdout.strip()
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=queued",
            "train.max_steps=50", f"loss={','.join(RECIPES[:2])}"]
    sweep = tmp_path / "outputs" / "multirun" / "queued"
    try:
        first = launch(args)
        wait_for(lambda: (sweep / "slurm_jobs.json").is_file(), 300, "the first launch's submission", first)
        code, err = finish(launch(args), timeout=300)
        assert code == 1, err[-3000:]
        summary = err[err.index("2 job(s) failed:"):]
        assert re.search(r"digits/rf_lognorm_0.00_1.00: not submitted: SLURM job \d+_0 of an earlier launch has this "
                         r"run \(PENDING\)", summary), summary
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        assert len(queued) == 2  # the blocker and the first launch's array: nothing submitted twice
    finally:
        subprocess.run(["scancel", blocker], check=True)
    code, err = finish(first)
    assert code == 0, err[-3000:]
    code, err = finish(launch(args))
    assert code == 0, err[-3000:]
    for name in ("rf_lognorm_0.00_1.00", "eps_linear"):
        assert "complete already, skipped" in job_log(sweep, slurm_job_id(sweep / "digits" / name))


def test_sampler_sweep_on_slurm_trains_each_model_once(slurm, cache_dir, tmp_path):
    """Two recipes x two samplers: the models train in a first array of two, the second array evaluates them."""
    recipes = RECIPES[:2]
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=samplers",
            "train.max_steps=200", f"loss={','.join(recipes)}", "sampler=rf_time,native"]
    code, out = finish(launch(args))
    assert code == 0, out[-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "samplers"
    for recipe in recipes:
        trained, evaluated = (sweep / "digits" / recipe.split("/")[1] / f"sampler={s}" for s in ("rf_time", "native"))
        assert not (trained / "reused_training.json").exists()
        reused = yaml.safe_load((evaluated / "reused_training.json").read_text())
        assert reused == {"checkpoints_from": str(trained.resolve())}
        assert os.path.samefile(trained / "checkpoints" / "last.ckpt", evaluated / "checkpoints" / "last.ckpt")
        assert (trained / "results.json").is_file() and (evaluated / "results.json").is_file()
        assert "reusing the model trained in" in job_log(sweep, slurm_job_id(evaluated))
        # Two SLURM arrays: the evaluating job was submitted after the training job ended.
        assert slurm_job_id(trained).split("_")[0] != slurm_job_id(evaluated).split("_")[0]


def test_sampler_sweep_of_two_task_jobs_trains_once_and_evaluates_on_rank_zero(slurm, cache_dir, tmp_path):
    """FSDP over two SLURM tasks: the second wave's job links the model on rank 0 and evaluates there; rank 1 ends."""
    recipe = RECIPES[0]
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=ranks",
            "train.max_steps=100", f"loss={recipe}", "sampler=rf_time,native", "trainer=fsdp",
            "trainer.accelerator=cpu", "hydra.launcher.tasks_per_node=2"]
    code, out = finish(launch(args))
    assert code == 0, out[-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "ranks"
    trained, evaluated = (sweep / "digits" / recipe.split("/")[1] / f"sampler={s}" for s in ("rf_time", "native"))
    assert yaml.safe_load((evaluated / "reused_training.json").read_text()) == {
        "checkpoints_from": str(trained.resolve())}
    assert os.path.samefile(trained / "checkpoints" / "last.ckpt", evaluated / "checkpoints" / "last.ckpt")
    assert (evaluated / "results.json").is_file()
    log = job_log(sweep, slurm_job_id(evaluated))
    assert "reusing the model trained in" in log and "training is done; rank 0 evaluates" in log
    assert "Restored all states" not in log  # no training, and one evaluation (rank 0's), not one per rank:
    assert len(re.findall(r"evaluating \S+ \(step 100\): \d+ record\(s\)", log)) == 1


@pytest.mark.parametrize("ranks, steps", [
    ([], 2000),
    # Two SLURM tasks sharded with FSDP: both ranks get the signal, save together, rank 0 requeues the job.
    (["trainer=fsdp", "trainer.accelerator=cpu", "hydra.launcher.tasks_per_node=2"], 800),
], ids=["one task", "fsdp two tasks"])
def test_preempted_job_checkpoints_is_requeued_and_resumes(slurm, cache_dir, tmp_path, ranks, steps):
    """submitit's signal (SIGUSR2): a checkpoint at the next step, requeue, resume; the sweep itself succeeds."""
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=preempt",
            f"train.max_steps={steps}", "train.ckpt_every=100000", "train.val_every=1000", "loss=paper/rf", *ranks]
    sweep = tmp_path / "outputs" / "multirun" / "preempt"
    run_dir = sweep / "digits" / "rf"
    proc = launch(args)
    metrics = run_dir / "csv" / "metrics.csv"
    # Well into training: two flushes of logged rows (every 10 steps, written every 100), not a fixed sleep.
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 11 and (run_dir / ".hydra").is_dir(),
             300, "training to run", proc)
    job_id = slurm_job_id(run_dir)
    preempt_and_requeue(job_id)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    log = job_log(sweep, job_id)
    saved = [int(s) for s in re.findall(r"preemption checkpoint at step (\d+)", log)]
    # Each rank logs the one collective save, at the same step; no periodic checkpoint was due: it is the resume point.
    assert len(saved) == (2 if ranks else 1) and len(set(saved)) == 1 and 0 < saved[0] < steps
    assert "Requeued job" in log and "Restored all states from the checkpoint" in log
    assert f"`max_steps={steps}` reached" in log and (run_dir / "results.json").is_file()


SLURM_PAIR = ["eval.enabled=false", "train.max_steps=8", "train.ckpt_every=4", "train.val_every=4",
              "optim.warmup_steps=1", "train.ema_every=2", "trainer.accelerator=cpu", "loss=paper/rf"]


@pytest.fixture(scope="module")
def one_process_on_slurm(slurm, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    code, err = finish(launch(["-m", *TINY, f"paths.root_dir={root}", f"paths.cache_dir={cache_dir}", *SLURM_PAIR,
                               "sweep_name=one"]))
    assert code == 0, err[-3000:]
    return torch.load(root / "outputs/multirun/one/digits/rf/checkpoints/last.ckpt", weights_only=True)


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_ranks_started_by_slurm_match_one_process(slurm, cache_dir, tmp_path, one_process_on_slurm, trainer):
    """trainer=ddp or fsdp with two SLURM tasks (gloo on the CPU): the same weights as the one-process run."""
    code, err = finish(launch(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", *SLURM_PAIR,
                               "sweep_name=two", f"trainer={trainer}", "hydra.launcher.tasks_per_node=2"]))
    assert code == 0, err[-3000:]
    two_dir = tmp_path / "outputs/multirun/two/digits/rf"
    assert "Starting with 2 processes" in job_log(tmp_path / "outputs/multirun/two", slurm_job_id(two_dir))
    a = one_process_on_slurm
    b = torch.load(two_dir / "checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_streaming_shards_sweep_preempted_job_equals_uninterrupted_run(slurm, cache_dir, tmp_path):
    """Two recipes on data=shards, streamed by two loader workers per job; one job is preempted mid-training
    (SIGUSR2), requeued and resumed. Its weights and evaluation results equal those of an uninterrupted run."""
    from src.data.embedded import prepare_embedded

    dirs = prepare_embedded("digits", cache_dir / "data")  # the embedded digits' shard folders, read as real data
    shards = ["data=shards", "data.name=digits_shards", f"data.train_dir={dirs['train']}",
              f"data.eval_dir={dirs['eval']}", "data.in_memory=false", "data.num_workers=2", "data.batch_size=16",
              "data.val_samples=32"]
    common = [*TINY, *shards, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "train.max_steps=1500",
              "train.ckpt_every=100000", "train.val_every=500", "optim.warmup_steps=10"]
    recipes = ["paper/rf_lognorm_0.00_1.00", "paper/eps_linear"]
    sweep = tmp_path / "outputs" / "multirun" / "shards"
    victim = sweep / "digits_shards" / "rf_lognorm_0.00_1.00"

    proc = launch(["-m", *common, "sweep_name=shards", f"loss={','.join(recipes)}"])
    metrics = victim / "csv" / "metrics.csv"
    # Training under way: a flush of logged rows, not a fixed sleep.
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 1 and (victim / ".hydra").is_dir(),
             300, "training to start", proc)
    job_id = slurm_job_id(victim)
    preempt_and_requeue(job_id)
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    log = job_log(sweep, job_id)
    saved = [int(s) for s in re.findall(r"preemption checkpoint at step (\d+)", log)]
    assert len(saved) == 1 and 0 < saved[0] < 1500  # no periodic checkpoint was due: this is the resume point
    assert "Requeued job" in log and "Restored all states from the checkpoint" in log
    assert "streaming 1500 training samples" in log and "with 2 loader worker(s)" in log
    assert (sweep / "digits_shards" / "eps_linear" / "results.json").is_file()

    # The same recipe, never interrupted.
    code, err = finish(launch(["-m", *common, "sweep_name=straight", f"loss={recipes[0]}"]))
    assert code == 0, err[-3000:]
    straight = tmp_path / "outputs" / "multirun" / "straight" / "digits_shards" / "rf_lognorm_0.00_1.00"
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(victim / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 1500
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    metrics = ("setting", "ema", "clip_score", "fid_clip", "checkpoint_step")
    results = [[{k: r[k] for k in metrics} for r in yaml.safe_load((d / "results.json").read_text())]
               for d in (straight, victim)]
    assert results[0] == results[1] and len(results[0]) == 2
