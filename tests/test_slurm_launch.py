"""The SLURM launcher's checks before a sweep writes anything, without a cluster: its settings by value, sbatch's
refusals (a fake sbatch on PATH) and SLURM's commands missing, each one line with a non-zero exit and no files.
The same on the real local cluster: tests/test_slurm.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.config import ConfigError
from src.launch import submitit as launch
from src.launch.failures import LaunchError
from tests import warm

ROOT = Path(__file__).resolve().parents[1]

#: conf/hydra/launcher/slurm_cpu.yaml's settings, as the launcher holds them.
PARAMS = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": None, "cpus_per_task": 2, "mem_gb": None,
          "timeout_min": 120, "max_num_timeout": 3, "array_parallelism": 64, "signal_delay_s": 60, "partition": None}


def test_launcher_defaults_pass():
    launch.check_slurm_params(PARAMS)
    launch.check_slurm_params({**PARAMS, "gpus_per_node": 8, "tasks_per_node": 8, "mem_gb": 512, "nodes": 4})


@pytest.mark.parametrize("change, line", [
    ({"timeout_min": 0},
     "hydra.launcher.timeout_min=0: not allowed (minutes per submission); allowed: an integer >= 1"),
    ({"timeout_min": -5}, "hydra.launcher.timeout_min=-5: not allowed"),
    ({"nodes": 0}, "hydra.launcher.nodes=0: not allowed (nodes per job); allowed: an integer >= 1"),
    ({"tasks_per_node": 0}, "hydra.launcher.tasks_per_node=0: not allowed (ranks per node); allowed: an integer >= 1; "
                            "it follows gpus_per_node unless set (CPU-only: hydra/launcher=slurm_cpu)"),
    ({"tasks_per_node": None}, "hydra.launcher.tasks_per_node=None: not allowed"),
    ({"gpus_per_node": -1}, "hydra.launcher.gpus_per_node=-1: not allowed (GPUs per node); allowed: an integer >= 0 "
                            "or null (SLURM's default)"),
    ({"cpus_per_task": 0}, "hydra.launcher.cpus_per_task=0: not allowed"),
    ({"mem_gb": 0}, "hydra.launcher.mem_gb=0: not allowed (GB per node)"),
    ({"array_parallelism": 0}, "hydra.launcher.array_parallelism=0: not allowed"),
    ({"signal_delay_s": 600, "timeout_min": 5},
     "hydra.launcher.signal_delay_s=600 with hydra.launcher.timeout_min=5: the time-out signal would come before the "
     "job trains a step"),
], ids=["timeout 0", "timeout negative", "nodes", "tasks", "tasks null", "gpus", "cpus", "mem", "parallelism",
        "signal"])
def test_bad_launcher_settings_are_named(change, line):
    with pytest.raises(ConfigError) as e:
        launch.check_slurm_params({**PARAMS, **change})
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


@pytest.mark.parametrize("said, expected", [
    ("sbatch: error: invalid partition specified: gpu\nallocation failure: Invalid partition name specified",
     "ConfigError: hydra.launcher.partition=gpu: refused by SLURM (invalid partition specified: gpu; allocation "
     "failure: Invalid partition name specified); the partitions: debug*, big"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "ConfigError: hydra.launcher.account=nobody: refused by SLURM (Batch job submission failed: Invalid account or "
     "account/partition combination specified); the nodes: debug*: 1 node(s) of 2 CPUs"),
    ("allocation failure: Requested node configuration is not available",
     "ConfigError: hydra.launcher.nodes=1 hydra.launcher.tasks_per_node=1 hydra.launcher.cpus_per_task=2: refused by "
     "SLURM (allocation failure: Requested node configuration is not available); the nodes: debug*: 1 node(s) of 2 "
     "CPUs"),
    ("allocation failure: Unable to contact slurm controller (connect failure)",
     "LaunchError: SLURM cannot be reached (allocation failure: Unable to contact slurm controller (connect failure));"
     " nothing was submitted"),
    ("sbatch: unrecognized option '--mail-typ=END'",
     "ConfigError: hydra.launcher: refused by SLURM (unrecognized option '--mail-typ=END'); the nodes: debug*"),
], ids=["partition", "account", "node sizes", "controller down", "other"])
def test_sbatch_refusals_name_the_setting_and_what_the_cluster_has(monkeypatch, said, expected):
    from src.launch.failures import one_line

    monkeypatch.setattr(launch, "_sinfo", lambda fmt, partition=None: ["debug*", "big"] if fmt == "%R" else
                        ["debug*: 1 node(s) of 2 CPUs, 1 MB, gres (null)"])
    error = launch.sbatch_refusal({**PARAMS, "partition": "gpu", "account": "nobody"}, said)
    assert one_line(error).startswith(expected) and isinstance(error, (ConfigError, LaunchError))


def fake_slurm(bin_dir: Path, sbatch: str) -> None:
    """sbatch (the given shell body), srun, squeue and sinfo as scripts in bin_dir."""
    bin_dir.mkdir()
    for name, body in {"sbatch": sbatch, "srun": "exit 0", "squeue": "exit 0", "sinfo": "echo 'debug*'"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


def sweep(tmp_path: Path, path: str, *args: str) -> subprocess.CompletedProcess:
    root = tmp_path / "root"
    return warm.run([sys.executable, "-m", "src.run", "-m", "hydra/launcher=slurm_cpu", "loss=paper/rf",
                           "data=digits", f"paths.root_dir={root}", f"paths.cache_dir={tmp_path / 'cache'}", *args],
                    cwd=ROOT, capture_output=True, text=True, timeout=300,
                    env={**os.environ, "WANDB_MODE": "disabled", "PATH": path})


@pytest.mark.parametrize("sbatch, args, line", [
    pytest.param('echo "sbatch: error: invalid partition specified: gpu" >&2\n'
                 'echo "allocation failure: Invalid partition name specified" >&2; exit 1',
                 ["hydra.launcher.partition=gpu"],
                 "ConfigError: hydra.launcher.partition=gpu: refused by SLURM (invalid partition specified: gpu; "
                 "allocation failure: Invalid partition name specified); the partitions: debug*", id="partition"),
    pytest.param("exit 0", ["hydra.launcher.timeout_min=0"],
                 "ConfigError: hydra.launcher.timeout_min=0: not allowed (minutes per submission); allowed: an "
                 "integer >= 1", id="value"),
    pytest.param("exit 0", ['hydra.launcher.setup=["if then"]'],
                 "ConfigError: hydra.launcher.setup=['if then']: not valid shell (line 1: syntax error near unexpected "
                 "token `then'; line 1: `if then'); allowed: lines of a bash script, run in order before srun",
                 id="setup"),
    pytest.param(None, [],  # no SLURM commands on PATH at all
                 "LaunchError: sbatch and srun not found on PATH: hydra/launcher=slurm submits the sweep with SLURM's "
                 "commands, so launch it on a machine of the cluster (a login node), or run it here with "
                 "hydra/launcher=local", id="no sbatch"),
])
def test_a_refused_launch_is_one_line_and_writes_nothing(tmp_path, sbatch, args, line):
    if sbatch is None:
        (tmp_path / "bin").mkdir()
        path = str(tmp_path / "bin")
    else:
        fake_slurm(tmp_path / "bin", sbatch)
        path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
    out = sweep(tmp_path, path, *args)
    assert out.returncode == 1
    assert out.stderr.strip() == line
    assert not (tmp_path / "root").exists()


def test_a_submitit_without_the_script_method_skips_only_the_test_submission(tmp_path, monkeypatch, caplog):
    """preflight builds sbatch's script with a private submitit method: another submitit without it still gets the
    checks of the values and the partition's time limit, and a warning instead of a traceback."""
    import types

    fake_slurm(tmp_path / "bin", "exit 1")  # never asked: no script to try
    (tmp_path / "bin/sinfo").write_text("#!/bin/sh\necho 'debug* 1:00:00'\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    launcher = types.SimpleNamespace(params=dict(PARAMS, timeout_min=30), executor=lambda: types.SimpleNamespace())
    launch.CollectingSubmititLauncher.preflight(launcher)
    assert "not tried with sbatch --test-only" in caplog.text
    with pytest.raises(ConfigError, match="^hydra.launcher.timeout_min=120: over the time limit of partition debug"):
        launch.CollectingSubmititLauncher.preflight(types.SimpleNamespace(params=PARAMS, executor=launcher.executor))


def test_submission_refused_after_the_check_is_one_line(tmp_path):
    """sbatch takes the test submission but refuses the array (the controller went down in between, a limit on
    arrays): one line naming the batch and sbatch's words, exit 1, no traceback. The sweep's failures.json names the
    job with that line, so the rank report says why it has no run (it said: planned but never started)."""
    from src.data.embedded import prepare_embedded

    prepare_embedded("digits", tmp_path / "cache" / "data")
    refusal = "sbatch: error: Batch job submission failed: Invalid job array specification"
    fake_slurm(tmp_path / "bin", f'[ "$1" = --test-only ] && exit 0\necho "{refusal}" >&2; exit 1')
    out = sweep(tmp_path, f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("LaunchError: sbatch did not submit the 1 job(s) of this batch: "
                                                   "sbatch: error: Batch job submission failed: Invalid job array "
                                                   "specification")
    assert "Traceback" not in out.stderr
    from src.launch.failures import read_sweep_failures
    from src.ranking.aggregate import load_sweep

    [sweep_dir] = (tmp_path / "root" / "outputs" / "multirun").iterdir()
    failures = read_sweep_failures(sweep_dir)
    assert list(failures) == ["digits/rf"] and failures["digits/rf"]["error"] == out.stderr.strip().splitlines()[-1]
    [row] = load_sweep([sweep_dir]).runs.to_dict("records")
    assert row["status"] == "failed" and row["error"].startswith("LaunchError: sbatch did not submit"), row


# ---- jobs that end without a result ----------------------------------------------------------------------------------
def test_job_that_ended_without_a_result_is_named_by_its_run_and_its_log(monkeypatch, tmp_path):
    """A killed or cancelled array task is named in the summary as the job names itself (`digits/rf`, as in the
    sweep's files and the rank report), not by its whole override list, with the file submitit kept its output in."""
    from submitit.core.utils import JobPaths

    from src.launch import failures

    class Killed:
        job_id = "136_0"
        paths = JobPaths(tmp_path / ".submitit" / "%j", job_id="136_0", task_id=0)

    monkeypatch.setattr(launch, "wait_for", lambda job: "CANCELLED")
    monkeypatch.setattr(failures, "FAILED", [])
    overrides = ["model.depth=1", "torch_threads=1", "data=digits", "loss=paper/rf"]
    ret = launch.CollectingSubmititLauncher._collect(None, Killed(), overrides, lambda o: "digits/rf")
    log_file = tmp_path / ".submitit" / "136_0" / "136_0_0_log.err"
    error = f"job 136_0 ended without a result: RuntimeError: the scheduler reports CANCELLED and no result was " \
            f"written (its log: {log_file})"
    assert failures.FAILED == [("digits/rf", error)]
    assert ret.return_value == {"failed": True, "run_name": "digits/rf", "error": error}


@pytest.mark.parametrize("made", ["nothing", "run_dir", "results"])
def test_the_rank_report_says_why_the_scheduler_ended_a_job(monkeypatch, tmp_path, made):
    """A job the scheduler ended without a result is failed in the rank report, with the scheduler's reason, not
    "running or killed" (a run directory without results: its error.json) nor "never started" (no directory: the
    sweep's failures.json); a run whose results stay as they were keeps its files (failures.json names the launch)."""
    from types import SimpleNamespace

    from src.launch import failures
    from src.launch.planned import record_planned_jobs
    from src.ranking.aggregate import load_sweep

    class Killed:
        job_id = "136_0"

    sweep_dir = tmp_path / "sweep"
    record_planned_jobs(sweep_dir, {"digits/rf": {"run_dir": "digits/rf", "overrides": ["loss=paper/rf"]}})
    run_dir = sweep_dir / "digits/rf"
    if made != "nothing":
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra/config.yaml").write_text("seed: 0\n")
    if made == "results":
        (run_dir / "results.json").write_text("[]")
    monkeypatch.setattr(launch, "wait_for", lambda job: "OUT_OF_MEMORY")
    monkeypatch.setattr(failures, "FAILED", [])
    launcher = SimpleNamespace(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    launch.CollectingSubmititLauncher._collect(launcher, Killed(), ["loss=paper/rf"], lambda o: "digits/rf")

    runs = load_sweep([sweep_dir]).runs
    reason = "job 136_0 ended without a result: RuntimeError: the scheduler reports OUT_OF_MEMORY"
    if made == "results":  # the earlier run's results stand; its directory is untouched
        assert not (run_dir / "error.json").exists()
        assert list(runs["status"]) == ["done", "refused"] and reason in runs["error"].iloc[1]
    else:
        assert list(runs["status"]) == ["failed"] and reason in runs["error"].iloc[0]
        assert (run_dir / "error.json").exists() == (made == "run_dir")


def test_sweep_job_name_is_the_run_name():
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from src.config import register_resolvers
    from src.launch.validate import sweep_job_name

    register_resolvers()
    with initialize_config_module("conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration("config", ["hydra/launcher=slurm_cpu"], run_mode=RunMode.MULTIRUN)
        assert sweep_job_name(loader, cfg, ["data=digits", "loss=paper/rf"]) == "digits/rf"
        assert sweep_job_name(loader, cfg, ["data=digits", "loss=paper/rf", "optim.lr=0.001",
                                            "run_tag='/optim.lr=0.001'"]) == "digits/rf/optim.lr=0.001"
        assert sweep_job_name(loader, cfg, ["loss=bogus"]) == "loss=bogus"  # cannot be composed: its overrides


@pytest.mark.parametrize("limit, minutes", [("infinite", None), ("UNLIMITED", None), ("1:00:00", 60), ("30:00", 30),
                                            ("2-00:00:00", 2880), ("1-12", 2160), ("45", 45)])
def test_slurm_time_limits_in_minutes(limit, minutes):
    assert launch.slurm_minutes(limit) == minutes


def test_timeout_over_the_partitions_time_limit_is_refused(monkeypatch):
    """sbatch --test-only takes it, and SLURM keeps such a job pending for ever (PartitionTimeLimit) where the cluster
    does not enforce partition limits at submission: the sweep would wait without a word."""
    shown = {None: ["debug* 1:00:00", "long 7-00:00:00"], "long": ["long 7-00:00:00"], "gpu": ["gpu infinite"]}
    monkeypatch.setattr(launch, "_sinfo", lambda fmt, partition=None: shown[partition])
    with pytest.raises(ConfigError) as e:
        launch.check_time_limit(PARAMS)  # the default partition's
    assert str(e.value) == ("hydra.launcher.timeout_min=120: over the time limit of partition debug (1:00:00, 60 min), "
                            "so SLURM would keep the jobs pending (PartitionTimeLimit); allowed: up to 60 (a run that "
                            "needs longer is requeued, max_num_timeout times)")
    launch.check_time_limit({**PARAMS, "timeout_min": 60})
    launch.check_time_limit({**PARAMS, "partition": "long", "timeout_min": 10080})
    launch.check_time_limit({**PARAMS, "partition": "gpu", "timeout_min": 100000})
    with pytest.raises(ConfigError, match="timeout_min=10081: over the time limit of partition long"):
        launch.check_time_limit({**PARAMS, "partition": "long", "timeout_min": 10081})
    monkeypatch.setattr(launch, "_sinfo", lambda fmt, partition=None: [])  # no answer: left to SLURM
    launch.check_time_limit(PARAMS)


class JobWithResult:
    """A submitit job as wait_for sees it: done (its result written) after some polls."""

    def __init__(self, job_id: str, after_polls: int):
        from types import SimpleNamespace

        self.job_id, self.after_polls, self.polls = job_id, after_polls, 0
        self.paths = SimpleNamespace(result_pickle=SimpleNamespace(exists=lambda: True))

    def done(self) -> bool:
        self.polls += 1
        return self.polls > self.after_polls


def test_wait_goes_on_while_the_controller_does_not_answer(monkeypatch):
    """A controller restart (squeue: `Unable to contact slurm controller`) is not the end of the job: it runs on, and
    its result is collected once it is written. A job squeue no longer knows (`Invalid job id`) has ended."""
    from types import SimpleNamespace

    answers = iter([(1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")] * 5
                   + [(0, "RUNNING\n", "")])
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: SimpleNamespace(
        **dict(zip(("returncode", "stdout", "stderr"), next(answers)))))
    clock = iter(range(0, 10_000, 100))  # 100 s between polls: far past any grace
    monkeypatch.setattr(launch.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)

    assert launch.wait_for(JobWithResult("7_0", after_polls=6)) is None  # the result after the controller is back
    gone = SimpleNamespace(returncode=1, stdout="", stderr="slurm_load_jobs error: Invalid job id specified")
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: gone)
    assert launch.squeue_state("7_0") is None
    never = SimpleNamespace(done=lambda: False, job_id="8_0")
    assert launch.wait_for(never) == "no longer in the queue"


def test_a_job_pending_for_more_than_its_turn_is_said_once_per_reason(monkeypatch, caplog):
    """Drained nodes, a partition down or a QOS limit can keep a job pending for ever: the sweep says so once per
    reason, with SLURM's words, instead of waiting silently; waiting for its turn (Priority, Resources) says nothing."""
    from types import SimpleNamespace

    answers = iter(["PENDING Priority", "PENDING ReqNodeNotAvail, UnavailableNodes:node1",
                    "PENDING ReqNodeNotAvail, UnavailableNodes:node1", "PENDING QOSMaxJobsPerUserLimit",
                    "PENDING Resources", "RUNNING None"])
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0,
                                                                                  stdout=next(answers) + "\n",
                                                                                  stderr=""))
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)

    with caplog.at_level("WARNING", logger=launch.__name__):
        assert launch.wait_for(JobWithResult("9_0", after_polls=6)) is None
    assert [r.getMessage() for r in caplog.records] == [
        "job 9_0 is pending: ReqNodeNotAvail, UnavailableNodes:node1 (SLURM's reason); waiting",
        "job 9_0 is pending: QOSMaxJobsPerUserLimit (SLURM's reason); waiting"]
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0, stdout="", stderr=""))
    assert launch.squeue_job("9_0") == (None, "")  # not listed: long gone


def test_ctrl_c_while_waiting_says_the_jobs_run_on(monkeypatch, capsys, tmp_path):
    """Ctrl-C in the launching command stops its waiting, not the SLURM jobs: one line saying so and how to stop them
    (exit status 130), instead of a KeyboardInterrupt traceback that leaves the user thinking the sweep stopped."""
    from types import SimpleNamespace

    from src import run
    from src.launch.failures import StoppedWaiting

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "wait_for", interrupted)
    launcher = launch.CollectingSubmititLauncher.__new__(launch.CollectingSubmititLauncher)
    launcher.config = SimpleNamespace(hydra=SimpleNamespace(sweep=SimpleNamespace(dir=str(tmp_path))))
    jobs = [SimpleNamespace(job_id="156_0"), SimpleNamespace(job_id="156_1")]
    with pytest.raises(StoppedWaiting) as e:
        launcher._collect_all(jobs, [["loss=paper/rf"], ["loss=paper/eps_linear"]])
    line = (f"stopped waiting; the sweep's 2 job(s) run on in SLURM job 156 and write their runs under {tmp_path} "
            "(`scancel 156` stops them; this command again, once they are over, skips the finished runs)")
    assert str(e.value) == line

    def main():
        raise e.value

    monkeypatch.setattr(run, "main", main)
    monkeypatch.setattr(run, "FAILED", [])
    assert run.cli() == 130
    assert capsys.readouterr().err == f"StoppedWaiting: {line}\n"


@pytest.mark.parametrize("overrides, refused", [
    (["hydra.launcher.tasks_per_node=2"], True),  # the default trainer: one process
    (["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8"], True),  # tasks follow the GPUs
    (["hydra.launcher.nodes=2"], True),
    (["hydra.launcher.tasks_per_node=2", "trainer=ddp"], False),  # SLURM starts its ranks
    (["hydra.launcher.tasks_per_node=2", "trainer=fsdp"], False),
    (["hydra.launcher.tasks_per_node=2", "trainer.strategy=ddp_spawn"], True),
    ([], False),
], ids=["tasks", "gpus", "nodes", "ddp", "fsdp", "spawn", "one task"])
def test_several_tasks_per_run_need_a_trainer_with_ranks(overrides, refused):
    """hydra/launcher=slurm hydra.launcher.gpus_per_node=8 without trainer=ddp started 8 copies of a one-process
    training in one run directory (found on the local cluster: both tasks trained and wrote the same checkpoints)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from src.config import register_resolvers
    from src.launch.checks import check_ranks_for_launcher

    register_resolvers()
    with initialize_config_module("conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        args = overrides if any(o.startswith("hydra/launcher=") for o in overrides) else \
            ["hydra/launcher=slurm_cpu", *overrides]
        sweep = loader.load_configuration("config", [*args, "hydra.mode=MULTIRUN"], run_mode=RunMode.MULTIRUN)
        # A job as the sweeper's checks have it: Hydra's settings from the command, the job's own overrides.
        job = loader.load_sweep_config(sweep, ["loss=paper/rf", *(o for o in args if not o.startswith("hydra"))])
        if refused:
            with pytest.raises(ConfigError, match=r"^hydra.launcher.tasks_per_node=\d+ \(nodes=\d+\) with "
                                                  r"trainer.strategy=\w+: SLURM would start \d+ copies"):
                check_ranks_for_launcher(job)
        else:
            check_ranks_for_launcher(job)
        single = loader.load_configuration("config", [*args, "hydra.mode=RUN"], run_mode=RunMode.RUN)
        check_ranks_for_launcher(single)  # a single run: the launcher is not used


def test_a_lost_job_whose_run_a_relaunch_submitted_again_writes_nothing_there(monkeypatch, tmp_path):
    """scancel of a running job, then the same command again at once: the relaunch's job trains in the run directory
    while the first launch still waits out the cancelled one, whose JobLost error.json was then written there, left
    beside the new job's results: the rank report called the finished run failed. The first launch's summary still
    names the lost job; its files say nothing once slurm_jobs.json names a later job for the run."""
    from types import SimpleNamespace

    from src.launch import failures
    from src.launch.planned import record_planned_jobs

    class Killed:
        job_id = "136_0"

    sweep_dir = tmp_path / "sweep"
    record_planned_jobs(sweep_dir, {"digits/rf": {"run_dir": "digits/rf", "overrides": ["loss=paper/rf"]}})
    run_dir = sweep_dir / "digits/rf"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra/config.yaml").write_text("seed: 0\n")
    launch.record_slurm_jobs(sweep_dir, {"digits/rf": "136_0"})
    launch.record_slurm_jobs(sweep_dir, {"digits/rf": "140"})  # the relaunch's job, training in run_dir now
    monkeypatch.setattr(launch, "wait_for", lambda job: "CANCELLED")
    monkeypatch.setattr(failures, "FAILED", [])
    launcher = SimpleNamespace(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    launch.CollectingSubmititLauncher._collect(launcher, Killed(), ["loss=paper/rf"], lambda o: "digits/rf")
    assert [name for name, _ in failures.FAILED] == ["digits/rf"]
    assert not (run_dir / "error.json").exists() and not (sweep_dir / "failures.json").exists()

    launch.record_slurm_jobs(sweep_dir, {"digits/rf": "136_0"})  # the run's latest job: recorded as before
    launch.CollectingSubmititLauncher._collect(launcher, Killed(), ["loss=paper/rf"], lambda o: "digits/rf")
    assert '"type": "JobLost"' in (run_dir / "error.json").read_text()


def test_a_lost_job_writes_nothing_into_a_run_directory_a_live_job_holds(monkeypatch, tmp_path):
    """A job the scheduler reported ended (NODE_FAIL, then requeued under the same id; or cancelled, and the run
    launched again with hydra/launcher=local) while another process trains in its run directory: the launcher's
    JobLost error.json, written there without the run's lock, stayed beside that job's results (the job removes an
    error.json only when it starts), and the rank report called the finished run failed. Now it is written under the
    run's lock: a directory a live job holds is left alone (that job records its own outcome)."""
    from types import SimpleNamespace

    from src.launch import failures
    from src.launch.planned import record_planned_jobs

    class Killed:
        job_id = "136_0"

    sweep_dir = tmp_path / "sweep"
    record_planned_jobs(sweep_dir, {"digits/rf": {"run_dir": "digits/rf", "overrides": ["loss=paper/rf"]}})
    run_dir = sweep_dir / "digits/rf"
    run_dir.mkdir(parents=True)
    monkeypatch.setattr(launch, "wait_for", lambda job: "NODE_FAIL")
    monkeypatch.setattr(failures, "FAILED", [])
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    launcher = SimpleNamespace(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    hold = "import sys, time; from src.launch.rundir import run_dir_lock\nwith run_dir_lock(sys.argv[1]):\n" \
           "    print('held', flush=True); time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], cwd=Path(__file__).resolve().parents[1],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        launch.CollectingSubmititLauncher._collect(launcher, Killed(), ["loss=paper/rf"], lambda o: "digits/rf")
    finally:
        holder.kill()
        holder.wait()
    assert [name for name, _ in failures.FAILED] == ["digits/rf"]  # the summary still names it
    assert not (run_dir / "error.json").exists() and not (sweep_dir / "failures.json").exists()
    assert [p.name for p in run_dir.iterdir()] == [".run.lock"]

    launch.CollectingSubmititLauncher._collect(launcher, Killed(), ["loss=paper/rf"], lambda o: "digits/rf")
    assert '"type": "JobLost"' in (run_dir / "error.json").read_text()  # no live job there: recorded as before


def test_the_console_says_which_slurm_job_runs_the_sweep(monkeypatch, tmp_path, caplog):
    """The launcher's line for the submitted batch was INFO, which the console filter keeps for the log file: a SLURM
    sweep said nothing while it waited (hours), neither the job id to scancel nor where the jobs' output goes (the
    launcher's submitit_folder, default <sweep>/.submitit/%j, or the one configured)."""
    import logging
    from types import SimpleNamespace

    from src.utils.progress import ConsoleFilter

    jobs = [SimpleNamespace(job_id="45_0"), SimpleNamespace(job_id="45_1")]
    with caplog.at_level(logging.INFO):
        launch.say_submitted(jobs, f"{tmp_path}/.submitit/%j")
        launch.say_submitted(jobs, "/scratch/logs/%j/")
    first, second = caplog.records
    assert ConsoleFilter().filter(first)
    assert first.getMessage() == f"submitted 2 job(s) as SLURM job 45; their output: {tmp_path}/.submitit/<job " \
                                 "id>/, each run's log: <run dir>/run.log"
    assert "their output: /scratch/logs/<job id>/, each" in second.getMessage()


# ---- a relaunch while the earlier launch's jobs are queued -----------------------------------------------------------
def test_runs_whose_earlier_job_has_not_ended_are_found(monkeypatch, tmp_path):
    """Relaunching a sweep whose jobs are still queued submitted every job again: the second copies waited in the
    queue, then skipped the run or were refused by its lock, and the relaunch waited for them (hours on a busy
    cluster) for nothing. The launcher records each run's SLURM job and asks squeue about it first."""
    from src.launch import failures

    launch.record_slurm_jobs(tmp_path, {"digits/rf": "172_0", "digits/edm": "172_1"})
    launch.record_slurm_jobs(tmp_path, {"digits/eps_linear": "175"})  # a later launch adds its own
    states = {"172_0": "PENDING", "172_1": "COMPLETED", "175": None}
    monkeypatch.setattr(launch, "squeue_state", lambda job_id: states[job_id])
    names = ["digits/rf", "digits/edm", "digits/eps_linear", "digits/v_cos"]
    assert launch.queued_elsewhere(tmp_path, names) == {"digits/rf": ("172_0", "PENDING")}
    states["172_1"] = "REQUEUED"  # preempted and requeued: it still has the run
    assert launch.queued_elsewhere(tmp_path, names) == {"digits/rf": ("172_0", "PENDING"),
                                                        "digits/edm": ("172_1", "REQUEUED")}

    monkeypatch.setattr(failures, "FAILED", [])
    ret = launch.already_queued(["loss=paper/rf"], "digits/rf", "172_0", "PENDING")
    error = ("not submitted: SLURM job 172_0 of an earlier launch has this run (PENDING); wait for it to end (this "
             "command again then skips or resumes the run), or `scancel 172_0` first")
    assert ret.return_value == {"failed": True, "run_name": "digits/rf", "error": error, "queued": "172_0"}
    assert failures.FAILED == [("digits/rf", error)]
    (tmp_path / launch.SLURM_JOBS).write_text("{not json")  # damaged: nothing known, every job is submitted
    assert launch.queued_elsewhere(tmp_path, names) == {}


@pytest.mark.slow  # a sweep through src.run (13 s): the quick suite keeps the unit test of the relaunch above
def test_twins_of_a_run_still_queued_say_so_not_that_its_training_failed(tmp_path):
    """A sampler sweep relaunched while its first-wave job is still in SLURM: that job is not submitted again, and
    the jobs that share its training are not launched, naming the SLURM job instead of a failed training."""
    from src.data.embedded import prepare_embedded
    from src.launch.planned import read_planned_jobs

    prepare_embedded("digits", tmp_path / "cache" / "data")
    fake_slurm(tmp_path / "bin", '[ "$1" = --test-only ] && exit 0\necho "sbatch: error: refused" >&2; exit 1')
    (tmp_path / "bin/squeue").write_text("#!/bin/sh\necho RUNNING\n")  # job 41 still trains the first run
    sweep_dir = tmp_path / "root/outputs/multirun/default"
    sweep_dir.mkdir(parents=True)
    first, twin = "digits/rf/sampler=rf_time", "digits/rf/sampler=heun"  # the first wave: the sweep's first job
    launch.record_slurm_jobs(sweep_dir, {first: "41"})  # an earlier launch's job for the first run
    out = sweep(tmp_path, f"{tmp_path / 'bin'}:{os.environ['PATH']}", "sampler=rf_time,heun")
    assert set(read_planned_jobs(sweep_dir)) == {first, twin}
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"{first}: not submitted: SLURM job 41 of an earlier launch has this run (RUNNING)" in out.stderr
    assert (f"{twin}: not launched: the training it shares with {first} is in SLURM job 41 of an earlier launch; "
            "this command again, once that job is over, evaluates it") in out.stderr
    assert "failed; rerun the sweep" not in out.stderr



def test_submitits_sacct_warnings_are_said_once_while_the_launcher_waits(caplog):
    """On a cluster without accounting every sacct call fails: sacct prints to the console and submitit warns, every
    few minutes for days of a sweep. The launcher watches the jobs through squeue as well, so it says the first once,
    with what it means, and submitit's watcher asks sacct no more while the launcher waits."""
    import logging

    from submitit.slurm.slurm import SlurmJob

    submitit_log, watcher = logging.getLogger("submitit"), SlurmJob.watcher
    error = "Command '['sacct', '-o', 'JobID,State,NodeList']' returned non-zero exit status 1."
    with caplog.at_level(logging.WARNING), launch.sacct_warned_once():
        watcher.register_job("12345")
        assert watcher._make_command()[0] == "sacct"
        for call in (1, 2, 3):
            submitit_log.warning(f"Call #{call} - Bypassing sacct error {error}, status may be inaccurate.")
            assert watcher._make_command() is None
        submitit_log.warning("another warning")
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"sacct does not answer ({error}); the jobs are watched through squeue instead (a cluster "
                    "without accounting: expected)", "another warning"]
    assert not submitit_log.filters and watcher._make_command()[0] == "sacct"  # only while the launcher waits
    watcher._registered.discard("12345")


def test_a_boolean_launcher_count_is_refused():
    """YAML's true is an int to Python: hydra.launcher.nodes=true would be taken as one node, not named as a typo."""
    with pytest.raises(ConfigError, match=r"^hydra.launcher.nodes=True: not allowed \(nodes per job\)"):
        launch.check_slurm_params({**PARAMS, "nodes": True})


def test_a_time_out_signal_due_at_the_time_limit_itself_is_refused():
    """signal_delay_s = 60 x timeout_min: the signal comes as the job starts; a second less leaves it a second."""
    with pytest.raises(ConfigError, match="signal_delay_s=60 with hydra.launcher.timeout_min=1: the time-out signal"):
        launch.check_slurm_params({**PARAMS, "signal_delay_s": 60, "timeout_min": 1})
    launch.check_slurm_params({**PARAMS, "signal_delay_s": 59, "timeout_min": 1})


def test_a_refusal_of_node_sizes_shows_the_nodes_of_the_partition_asked_for(monkeypatch):
    """The nodes said are those of hydra.launcher.partition (sinfo -p), not every partition's; an sbatch that says
    nothing is said as such."""
    asked = []

    def sinfo(fmt, partition=None):
        asked.append(partition)
        return [f"{partition}: 2 node(s) of 8 CPUs"]

    monkeypatch.setattr(launch, "_sinfo", sinfo)
    error = launch.sbatch_refusal({**PARAMS, "partition": "gpu"}, "Requested node configuration is not available")
    assert asked == ["gpu"] and str(error).endswith("; the nodes: gpu: 2 node(s) of 8 CPUs")
    assert str(launch.sbatch_refusal(PARAMS, "\n")) == "hydra.launcher: refused by SLURM (no message); the nodes: " \
                                                        "None: 2 node(s) of 8 CPUs"


def test_setup_lines_that_are_not_shell_are_refused():
    """sbatch --test-only does not parse the script: `setup=["if then"]` queued every job of the sweep, each to fail at
    its start without a result (a syntax error in SLURM's log) and the sweep directory written."""
    with pytest.raises(ConfigError, match=r"^hydra.launcher.setup=\['if then'\]: not valid shell \(.*syntax error"):
        launch.check_slurm_params({**PARAMS, "setup": ["if then"]})
    with pytest.raises(ConfigError, match="unexpected EOF"):
        launch.check_slurm_params({**PARAMS, "setup": ["echo 'unclosed"]})
    launch.check_slurm_params({**PARAMS, "setup": ["module load cuda", "if true; then", "echo ok", "fi"]})
    launch.check_slurm_params({**PARAMS, "setup": None})
    # Patterns that `shopt -s extglob` allows: bash -n never runs the shopt, and refused them.
    launch.check_slurm_params({**PARAMS, "setup": ["shopt -s extglob", "rm -f /tmp/x/!(*.keep)"]})
    with pytest.raises(ConfigError, match="not valid shell"):  # without the shopt, they are a syntax error
        launch.check_slurm_params({**PARAMS, "setup": ["rm -f /tmp/x/!(*.keep)"]})
