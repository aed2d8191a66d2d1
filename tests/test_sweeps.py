"""Named sweeps (sweeps/ is the config group `sweep` through the symlink conf/sweep) and planning mode (src/plan.py)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.types import RunMode
from omegaconf import OmegaConf

from src import plan
from src.config import register_resolvers
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))
register_resolvers()

# Shard data that does not exist, with its shapes given: the planner assumes them (no data preparation, fast).
FAKE_SHARDS = [
    "data=shards", "data.name=fake", "data.train_dir=/nonexistent/train", "data.eval_dir=/nonexistent/eval",
    "data.latent_channels=1", "data.latent_size=16", "data.context_dim=32", "data.pooled_dim=32",
]


def compose_via_module(overrides):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def compose_via_dir(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def as_dict(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


# ---- sweeps/ as a config source ---------------------------------------------------------------------------
def test_expected_sweeps_exist():
    assert {"paper_grid", "paper_embedded", "backbones", "smoke"} <= set(SWEEPS)


@pytest.mark.parametrize("name", SWEEPS)
@pytest.mark.parametrize("compose_fn", [compose_via_module, compose_via_dir], ids=["module", "dir"])
def test_sweep_is_a_multirun_with_its_own_name(name, compose_fn):
    cfg = compose_fn([f"+sweep={name}"])
    assert cfg.sweep_name == name
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.sweeper.params, "a sweep file must sweep something"
    assert cfg.hydra.sweep.dir.endswith(f"multirun/{name}")


def test_entry_point_finds_sweeps():
    out = warm.run([sys.executable, "-m", "src.run", "+sweep=backbones", "--cfg", "job"], cwd=ROOT,
                   capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sweep_name: backbones" in out.stdout


def test_paper_recipe_list_is_the_registry():
    from src.formulations import RECIPES, get_recipe

    cfg = compose_via_module(["+sweep=paper_recipes"])
    listed = [x.strip() for x in cfg.hydra.sweeper.params.loss.split(",")]
    expected = [f"paper/{get_recipe(n).slug}" for n in RECIPES]
    assert len(listed) == len(set(listed)) == 61
    assert listed == expected  # the paper's order, as scripts/gen_loss_configs.py --sweep prints it
    for name in listed:
        assert (ROOT / "conf" / "loss" / f"{name}.yaml").is_file(), name


# ---- the job lists --------------------------------------------------------------------------------------------
def expand(overrides):
    with plan._hydra_context():
        return plan.expand_jobs(overrides)[1]


@pytest.mark.parametrize(
    "sweep, key, values",
    [
        ("paper_embedded", "data", {"digits", "shapes"}),
        ("paper_grid", "data.name", {"imagenet", "cc12m"}),
    ],
)
def test_paper_grids_have_122_jobs(sweep, key, values):
    jobs = [as_dict(j) for j in expand([f"+sweep={sweep}"])]
    assert len(jobs) == 122
    assert {(j[key], j["loss"]) for j in jobs} == {(v, j["loss"]) for v in values for j in jobs}
    assert len({j["loss"] for j in jobs}) == 61


def test_backbone_and_smoke_job_lists():
    backbones = [as_dict(j) for j in expand(["+sweep=backbones"])]
    assert sorted(j["model"] for j in backbones) == sorted(["dit", "crossdit", "uvit", "mmdit", "mmdit3"])
    assert len(expand(["+sweep=smoke"])) == 6
    # A command-line value replaces the file's sweep of the same key (Hydra's rule).
    assert len(expand(["+sweep=smoke", "data=digits"])) == 3
    assert len(expand(["loss=rf,edm", "model=dit"])) == 2
    assert len(expand(["loss=rf"])) == 1  # no sweep: one run


def test_paper_grid_is_the_paper_setup_on_slurm(monkeypatch):
    monkeypatch.setenv("FLOWSWEEP_SHARDS", "/shards")
    cfg = compose_via_module(["+sweep=paper_grid"])
    assert cfg.model.depth == 15 and cfg.data.batch_size == 1024 and cfg.train.max_steps == 250000
    assert cfg.data.train_dir == "/shards/imagenet-256" and cfg.data.eval_dir == "/shards/coco2014-256"
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.flowsweep_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8  # SLURM starts one rank per GPU
    assert launcher.max_num_timeout > 0  # a run longer than the time limit is requeued and resumes
    assert launcher.nodes == 1 and launcher.timeout_min == 1440
    # conf/hydra/launcher/local.yaml's example: the local launcher replaces the sweep's SLURM launcher whole.
    local = compose_via_module(["+sweep=paper_grid", "hydra/launcher=local"]).hydra.launcher
    assert local._target_ == "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 1  # from SLURM_NTASKS_PER_NODE in the job


def test_backbone_runs_get_their_own_directories():
    p = plan.plan_sweep(["+sweep=backbones", *FAKE_SHARDS, "paths.root_dir=/r"])
    dirs = [str(j.run_dir) for j in p.jobs]
    assert len(set(dirs)) == 5
    assert "/r/outputs/multirun/backbones/fake/mmdit3/rf_lognorm_0.00_1.00" in dirs


# ---- FLOPs and GPU-hours ----------------------------------------------------------------------------------------
def forward_flops(model_name: str, depth: int) -> float:
    p = plan.plan_sweep([f"model={model_name}", f"model.depth={depth}", "model.hidden_size=64", "model.num_heads=2",
                         *FAKE_SHARDS])
    (job,) = p.jobs
    return job.fwd_flops_per_sample, job


@pytest.mark.parametrize("model_name, adaln_per_block", [("dit", 12), ("mmdit", 24)])
def test_counted_flops_per_block_match_the_transformer_formula(model_name, adaln_per_block):
    """One block more adds 24 h^2 T (QKV, projection, 4x MLP) + 4 T^2 h (attention) + adaLN on the vector."""
    h = 64
    a, job = forward_flops(model_name, 3)
    b, _ = forward_flops(model_name, 4)
    T = job.tokens
    assert job.image_tokens == 64 and job.text_tokens == plan.PAPER_SHAPES["context_length"]
    assert b - a == 24 * h * h * T + 4 * T * T * h + adaln_per_block * h * h


def test_plan_totals_and_gpu_hours():
    settings = "eval.settings=[{steps: 2, cfg: 1.0}, {steps: 3, cfg: 5.0}]"
    p = plan.plan_sweep(["loss=rf,edm", "model=dit", "data.batch_size=8", "train.max_steps=10", "train.val_every=5",
                         "data.val_samples=4", "eval.n_samples=4", settings, *FAKE_SHARDS],
                        peak_tflops=100, mfu=0.5)
    assert len(p.jobs) == 2
    for j in p.jobs:
        fwd = j.fwd_flops_per_sample
        assert j.train_flops == 3 * fwd * 8 * 10
        # validation: 2 times x 4 samples x 8 levels x raw/EMA; sampling: (2 + 2 x 3 guided) steps x 4 x raw/EMA
        assert j.eval_flops == pytest.approx(fwd * (2 * 4 * 8 * 2 + (2 + 6) * 4 * 2))
        assert j.status == "new"
    total = sum(j.total_flops for j in p.jobs)
    assert p.gpu_hours(total) == pytest.approx(total / (100e12 * 0.5) / 3600)
    text = plan.render(p)
    assert "2 jobs (2 to run; done: 0)" in text and "100 TFLOP/s peak and 50% utilisation" in text
    assert "no shards at data.train_dir=/nonexistent/train" in text  # assumptions are stated
    six = plan.plan_sweep(["model=dit", *FAKE_SHARDS], flops_method="6nt").jobs[0]
    assert six.fwd_flops_per_sample == plan.rule_of_thumb_flops(six.params, six.tokens, 2, 64)
    # Heun evaluates the network 2 steps - 1 times: (3 + 2 x 5 guided) evaluations per sample.
    heun = plan.plan_sweep(["loss=rf", "model=dit", "data.batch_size=8", "train.max_steps=10", "train.val_every=5",
                            "data.val_samples=4", "eval.n_samples=4", settings, "sampler=heun", *FAKE_SHARDS]).jobs[0]
    fwd = heun.fwd_flops_per_sample
    assert heun.eval_flops == pytest.approx(fwd * (2 * 4 * 8 * 2 + (3 + 10) * 4 * 2))


def test_rule_of_thumb_is_the_forward_third_of_6nt_plus_attention():
    """--flops 6nt: 2 N T for the forward (the backward's 4 N T are the training's 3x) and 4 d T^2 D for the QK^T and
    attention-times-V matmuls of every layer."""
    assert plan.rule_of_thumb_flops(params=1000, tokens=10, depth=3, hidden=8) == 2 * 1000 * 10 + 4 * 3 * 10**2 * 8
    assert plan.rule_of_thumb_flops(params=1000, tokens=10, depth=0, hidden=0) == 20_000  # a backbone of unknown size


def test_plan_counts_a_jobs_gpus_over_all_its_nodes():
    """GPUs per job (the wall clock divides each job's GPU-hours by them): SLURM's tasks per node x nodes, else the
    trainer's devices x num_nodes (a device list or "auto": one per node)."""
    from omegaconf import OmegaConf

    def cfg(launcher, devices=1, num_nodes=1):
        trainer = {"devices": devices, "num_nodes": num_nodes}
        return OmegaConf.create({"hydra": {"launcher": launcher}, "trainer": trainer})

    assert plan.job_gpus(cfg({"tasks_per_node": 8, "nodes": 4}, devices=2, num_nodes=3)) == 32
    assert plan.job_gpus(cfg({"nodes": 4}, devices=2, num_nodes=3)) == 6  # no tasks_per_node: the trainer's
    assert plan.job_gpus(cfg({}, devices="auto", num_nodes=2)) == 2


def test_plan_wall_clock_divides_a_jobs_gpu_hours_over_its_gpus():
    job = plan.JobPlan(index=0, overrides=[], run_dir=Path("/r/0"), model="MMDiT", params=1, image_tokens=1,
                       text_tokens=1, batch_size=8, steps=1, gpus=4, fwd_flops_per_sample=1.0,
                       train_flops=4 * 3600 * 50e12, eval_flops=0.0, status="new", mfu=0.5, mfu_source="given")
    p = plan.Plan([job], peak_tflops=100, flops_method="count", parallelism=2)
    assert p.job_hours(job, job.flops_left) == pytest.approx(4.0)  # 4 GPU-hours on 4 GPUs at once: 1 h
    assert "Wall clock with 1 job of 4 GPU(s) at once (array_parallelism): about 1 h." in plan.render(p)
    assert "request no GPU" not in plan.render(p)


def test_a_plan_of_jobs_asking_slurm_for_no_gpu_says_so():
    """hydra/launcher=slurm_cpu (gpus_per_node=null): the wall clock said "jobs of 1 GPU(s)" of jobs that get none."""
    from omegaconf import OmegaConf

    slurm = "hydra_plugins.flowsweep_launcher.SlurmLauncher"
    assert not plan.requests_gpus(OmegaConf.create({"_target_": slurm, "gpus_per_node": None}))
    assert plan.requests_gpus(OmegaConf.create({"_target_": slurm, "gpus_per_node": 8}))
    assert plan.requests_gpus(OmegaConf.create({"_target_": "hydra._internal.core_plugins.basic_launcher."
                                                             "BasicLauncher"}))
    job = plan.JobPlan(index=0, overrides=[], run_dir=Path("/r/0"), model="MMDiT", params=1, image_tokens=1,
                       text_tokens=1, batch_size=8, steps=1, gpus=1, fwd_flops_per_sample=1.0, train_flops=1e18,
                       eval_flops=0.0, status="new", mfu=0.5, mfu_source="given", requests_gpus=False)
    text = plan.render(plan.Plan([job], peak_tflops=100, flops_method="count", parallelism=2))
    assert "Wall clock with 1 job of 1 task(s) at once" in text and "GPU(s)" not in text
    assert "All jobs request no GPU (hydra.launcher.gpus_per_node=null)" in text


def test_plan_status_reads_run_directories(tmp_path):
    import torch

    from src.evaluation.run import wanted_for

    overrides = ["loss=rf,edm,eps_linear,v_cos", "model=dit", f"paths.root_dir={tmp_path}",
                 "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", "train.max_steps=5", *FAKE_SHARDS]
    jobs = plan.plan_sweep(overrides).jobs
    rf, edm, eps, v = (j.run_dir for j in jobs)
    (rf / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3}, rf / "checkpoints" / "last.ckpt")  # training interrupted at step 3 of 5
    edm.mkdir(parents=True)
    (edm / "error.json").write_text("{}")
    (eps / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 5}, eps / "checkpoints" / "last.ckpt")  # trained
    (eps / "eval").mkdir()
    np.savez(eps / "eval" / "a.npz", clip_scores=np.zeros(2))  # the record's arrays (read by the report)
    with plan._hydra_context():
        eps_cfg = plan._compose(jobs[2].overrides)
        [wanted] = wanted_for(eps_cfg)
    record = {**wanted, "arrays": "eval/a.npz", "clip_score": 0.2, "fid_clip": 1.0}
    (eps / "results.json").write_text(json.dumps([record]))
    v.mkdir(parents=True)
    p = plan.plan_sweep(overrides)
    assert [j.status for j in p.jobs] == ["resume", "failed", "done", "to train"]
    assert "4 jobs (3 to run; done: 1)" in plan.render(p)
    # Still to run: 2 of rf's 5 steps, edm's and v's whole training, every evaluation but the done job's.
    assert [j.train_left for j in p.jobs] == [pytest.approx(0.4), 1.0, 0.0, 1.0]
    left = sum((j.train_flops + j.val_flops) * share + j.eval_flops - j.val_flops
               for j, share in zip(p.jobs, (0.4, 1, 0, 1)) if j.status != "done")
    assert sum(j.flops_left for j in p.jobs) == pytest.approx(left)
    assert f"{p.gpu_hours(left):.4g} still to run" in plan.render(p)
    # Another evaluation setting: the finished run is to be evaluated, not done (and not retrained).
    for key in ("eval.n_samples=7", "eval.seed=5", "eval.shift=3.0", "eval.checkpoint=last", "eval.ema=[true,false]",
                "eval.settings=[{steps: 3, cfg: 1.0}]"):
        assert plan.plan_sweep([*overrides, key]).jobs[2].status == "to evaluate", key
    # A record whose arrays are gone does not count.
    (eps / "eval" / "a.npz").unlink()
    assert plan.plan_sweep(overrides).jobs[2].status == "to evaluate"
    # An unreadable last.ckpt and no readable last.prev.ckpt: the job fails naming it; with one, it resumes from it.
    (rf / "checkpoints" / "last.ckpt").write_bytes(b"torn")
    with plan._hydra_context():
        rf_cfg = plan._compose(jobs[0].overrides)
    assert plan.job_status(rf_cfg, rf) == "cannot resume (last.ckpt unreadable)"
    # Its relaunch fails naming the file: nothing of it is still to run until the checkpoints are deleted; the plan
    # names it apart with what it costs then (training anew).
    p = plan.plan_sweep(overrides)
    assert [j.status for j in p.jobs] == ["cannot resume (last.ckpt unreadable)", "failed", "to evaluate", "to train"]
    text = plan.render(p)
    assert "4 jobs (3 to run; done: 0; blocked: 1)" in text
    assert f"{sum(p.job_hours(j, j.flops_left) for j in p.jobs[1:]):.4g} still to run" in text
    assert "Blocked, not in 'still to run' (jobs 0): a relaunch fails naming the file in their status until it is " \
           f"restored or deleted; then they take {p.job_hours(p.jobs[0], p.jobs[0].total_flops):.4g} GPU-hours." in text
    torch.save({"global_step": 2}, rf / "checkpoints" / "last.prev.ckpt")
    assert plan.job_status(rf_cfg, rf) == "resume"


def test_plan_of_failed_runs_is_what_their_relaunch_does(tmp_path):
    """A relaunch removes error.json and goes on from what the directory holds (src/run.py _job): it resumes, only
    evaluates, skips a finished run; a directory of another configuration is refused, error.json or not; an unreadable
    results.json makes the job fail naming it. Validation belongs to the training: a trained run's relaunch samples
    only the records it lacks."""
    import torch

    from src.evaluation.run import wanted_for
    from src.training.prepare import _fingerprint_json

    overrides = ["loss=rf,edm,eps_linear,v_cos", "model=dit", f"paths.root_dir={tmp_path}", "train.val_every=1",
                 "data.val_samples=4", "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", "train.max_steps=5",
                 *FAKE_SHARDS]
    jobs = plan.plan_sweep(overrides).jobs
    rf, edm, eps, v = (j.run_dir for j in jobs)
    for run_dir, step in ((rf, 3), (edm, 5), (eps, 5), (v, 5)):
        (run_dir / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": step}, run_dir / "checkpoints" / "last.ckpt")
        (run_dir / "error.json").write_text("{}")
    (eps / "eval").mkdir()
    np.savez(eps / "eval" / "a.npz", clip_scores=np.zeros(2))
    with plan._hydra_context():
        eps_cfg, v_cfg = plan._compose(jobs[2].overrides), plan._compose(jobs[3].overrides)
        [wanted] = wanted_for(eps_cfg)
        stored = _fingerprint_json(v_cfg)
    (eps / "results.json").write_text(json.dumps([{**wanted, "arrays": "eval/a.npz", "clip_score": 0.2,
                                                   "fid_clip": 1.0}]))
    stored["train"]["ema_decay"] = 0.5  # v's directory holds a run of another configuration
    (v / "fingerprint.json").write_text(json.dumps(stored))
    p = plan.plan_sweep(overrides)
    assert [j.status for j in p.jobs] == ["failed: resume", "failed: to evaluate", "done",
                                          "refused: changed configuration"]
    # The launch refuses v's job before it writes anything (src/launch/validate.py refused_by_run_dir, the job's
    # check_fingerprint): nothing of it is still to run, though the sweep in all counts its training.
    assert [j.train_left for j in p.jobs] == [pytest.approx(0.4), 0.0, 0.0, 0.0] and p.jobs[3].flops_left == 0
    text = plan.render(p)
    assert "4 jobs (2 to run; done: 1; refused: 1)" in text
    assert f"{sum(p.job_hours(j, j.flops_left) for j in p.jobs[:2]):.4g} still to run" in text
    assert "Refused by a relaunch, not in 'still to run' (jobs 3): their directories hold a run of another " \
           f"configuration, or an unreadable fingerprint.json, or lie inside or around an earlier launch's run " \
           f"directory, or are a link to nothing or a file; trained anew in other directories (another " \
           f"sweep_name), they take {p.job_hours(p.jobs[3], p.jobs[3].total_flops):.4g} GPU-hours." in text
    r, e = p.jobs[:2]
    assert r.val_flops == r.fwd_flops_per_sample * 5 * 4 * 8 * 2  # 5 validations of 4 samples x 8 levels, raw and EMA
    assert r.flops_left == pytest.approx((r.train_flops + r.val_flops) * 0.4 + r.eval_flops - r.val_flops)
    assert e.flops_left == pytest.approx(e.fwd_flops_per_sample * 2 * 100)  # sampling only: 2 steps x 100 samples
    # Another setting added: only its records are sampled (3 steps, guided: 6 evaluations x 100 samples).
    eps_only = ["-m", *overrides, "loss=eps_linear"]
    [more] = plan.plan_sweep([*eps_only, "eval.settings=[{steps: 2, cfg: 1.0}, {steps: 3, cfg: 5.0}]"]).jobs
    assert more.status == "failed: to evaluate"
    assert more.flops_left == pytest.approx(more.fwd_flops_per_sample * 6 * 100)
    (eps / "results.json").write_text("[{")
    assert plan.job_status(eps_cfg, eps) == "failed: results.json unreadable"
    (eps / "error.json").unlink()
    assert plan.job_status(eps_cfg, eps) == "results.json unreadable"
    # A damaged fingerprint.json: that job is refused naming it (the sweep's others run), not the whole plan.
    (v / "fingerprint.json").write_text('{"loss')
    assert plan.job_status(v_cfg, v) == "refused: fingerprint.json unreadable"


def test_plan_of_a_run_relaunched_with_more_max_steps_is_an_extension(tmp_path):
    """A finished 3-step run relaunched with train.max_steps=5 alone goes on from its last checkpoint (README
    "Resume"): 'extend 3 -> 5 steps', still to run only the 2 steps left and the evaluation; fewer steps, or another
    setting changed with them, are refused as before."""
    import torch

    from src.training.prepare import _fingerprint_json

    overrides = ["loss=rf", "model=dit", f"paths.root_dir={tmp_path}", "train.val_every=1", "data.val_samples=4",
                 "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", *FAKE_SHARDS]
    [job] = plan.plan_sweep([*overrides, "train.max_steps=3"]).jobs
    (job.run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 3}, job.run_dir / "checkpoints" / "last.ckpt")
    with plan._hydra_context():
        (job.run_dir / "fingerprint.json").write_text(json.dumps(_fingerprint_json(plan._compose(job.overrides))))
    p = plan.plan_sweep([*overrides, "train.max_steps=5"])
    [longer] = p.jobs
    assert longer.status == "extend 3 -> 5 steps" and longer.train_left == pytest.approx(0.4)
    assert longer.flops_left == pytest.approx((longer.train_flops + longer.val_flops) * 0.4 + longer.sampling_flops)
    text = plan.render(p)
    assert "extend 3 -> 5 steps" in text and "1 job (1 to run; done: 0)" in text
    for more in (["train.max_steps=2"], ["train.max_steps=5", "train.ckpt_every=5"]):
        assert [j.status for j in plan.plan_sweep([*overrides, *more]).jobs] == ["refused: changed configuration"]


def test_plan_cli_launches_nothing(tmp_path, capsys):
    args = ["loss=rf,edm", "model=dit", f"paths.root_dir={tmp_path}", *FAKE_SHARDS]
    assert plan.main([*args, "--mfu", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "2 jobs" in out and "30% utilisation" in out
    import logging

    assert logging.root.manager.disable == logging.NOTSET  # the caller's logging as it was (a notebook's warnings)
    assert list(tmp_path.iterdir()) == []  # no sweep directory, no multirun.yaml
    assert plan.main([*args, "--mfu", "2"]) == 2
    assert "--mfu=2.0: must be in (0, 1]" in capsys.readouterr().err
    assert plan.main([*args, "--peak-tflops", "inf"]) == 2  # not a plan of 0 GPU-hours
    assert "--peak-tflops=inf: must be a finite number > 0" in capsys.readouterr().err
    # The job's own value checks: no plan of a job that could not run.
    assert plan.main([*args, "train.max_steps=-1"]) == 2
    assert "train.max_steps=-1: must be an integer >= 1" in capsys.readouterr().err
    # An embedded sweep is planned without building its data.
    assert plan.main(["+sweep=smoke", f"paths.root_dir={tmp_path}", "--mfu", "0.3"]) == 0
    assert "6 jobs" in capsys.readouterr().out and not (tmp_path / ".cache").exists()
    with pytest.raises(SystemExit):
        plan.main([*args, "--utilisation", "0.3"])


def test_a_plan_checks_the_slurm_launcher_s_values_as_the_launch_does(tmp_path, capsys):
    """hydra.launcher.gpus_per_node=0 (or nodes=0) was a ZeroDivisionError traceback from the wall-clock line, a
    negative array_parallelism an IndexError, and array_parallelism=0 dropped that line: src.run refuses all three."""
    args = ["+sweep=paper_grid", "loss=paper/rf", f"paths.root_dir={tmp_path}"]
    for override, line in (
            ("hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=0: not allowed (ranks per node)"),
            ("hydra.launcher.nodes=0", "hydra.launcher.nodes=0: not allowed (nodes per job)"),
            ("hydra.launcher.array_parallelism=-3", "hydra.launcher.array_parallelism=-3: not allowed"),
            ("hydra.launcher.array_parallelism=0", "hydra.launcher.array_parallelism=0: not allowed")):
        assert plan.main([*args, override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"plan: ConfigError: {line}") and err.count("\n") == 1, err


def test_a_plan_of_shards_without_a_folder_says_so_as_the_job_does(tmp_path, capsys):
    """`python -m src.plan experiment=paper` (data=shards, no data.train_dir): the job's own line, where the plan said
    "plan: MissingMandatoryValue: Missing mandatory value: data.train_dir"."""
    for args in (["experiment=paper"], ["data=shards"]):
        assert plan.main([*args, f"paths.root_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err == ("plan: ConfigError: data.train_dir is not set: a folder of shards "
                       "(python -m src.preprocess ...)\n")
    assert plan.main(["data=shards", "data.train_dir=/no/such/shards", f"paths.root_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == ("plan: ConfigError: data.eval_dir is not set: a folder of shards "
                                       "(python -m src.preprocess ...)\n")  # was MissingMandatoryValue


def test_a_plan_of_a_bad_recipe_or_an_unimportable_backbone_says_the_job_s_own_line(tmp_path, capsys):
    """The plan's line is the job's: it said "plan: InterpolationResolutionError: ConfigError raised while resolving
    interpolation: loss: ..." for a bad recipe, and Hydra's "Error locating target 'convnet.ConvNet', set env var
    HYDRA_FULL_ERROR=1 ..." for a backbone whose module is not on PYTHONPATH."""
    for args, line in ((["loss=rf_lognorm", "loss.s=-1"], "ConfigError: loss: rf_lognorm: s=-1 is not allowed; s must "
                                                          "be > 0"),
                       (["model._target_=not_a_module_here.ConvNet"], "ConfigError: model._target_=not_a_module_here."
                        "ConvNet: cannot import it (ModuleNotFoundError: No module named 'not_a_module_here'); the "
                        "module must be importable where the job runs (the working directory or PYTHONPATH)"),
                       (["model=mmdit3", "model.context_split=20"], "ConfigError: model.context_split=20 is not "
                        "allowed; allowed: 1 to 15 (the data's context has 16 tokens, the rest form the second text "
                        "stream), or null")):
        assert plan.main([*args, f"paths.root_dir={tmp_path}"]) == 2
        assert capsys.readouterr().err == f"plan: {line}\n"


def test_a_plan_refuses_a_plus_key_typo_a_run_name_outside_and_a_grid_as_the_launch_does(tmp_path, capsys):
    """The plan showed `+train.max_step=1` as a job of 500 steps, `run_name=../x` as a run directory outside the
    runs' folder and sampler=native at 5000 steps of eps/linear (1000 levels) as a job to run, all with exit 0,
    where src.run refuses them before anything is launched."""
    for args, line in ((["+train.max_step=1"], "ConfigError: +train.max_step=1: train.max_step is not a setting of "
                        "this configuration, so nothing would read it (a typo?); set an existing key without '+'"),
                       (["run_name=../x"], "ConfigError: run_name=../x: must name a folder inside the sweep's "
                        f"folder (or {tmp_path}/outputs/runs), e.g. the default "
                        "run_name='${data.name}/${recipe_slug:${loss}}${run_tag}'"),
                       (["sampler=native", "loss=eps_linear", "eval.settings=[{steps: 5000, cfg: 1.0}]"],
                        "ConfigError: eval.settings.0.steps=5000: sampler=native: eps/linear has 1000 discrete "
                        "levels; steps=5000 is not allowed, use steps <= 1000")):
        assert plan.main([*args, f"paths.root_dir={tmp_path}"]) == 2
        assert capsys.readouterr().err == f"plan: {line}\n"


def test_a_plan_of_a_sweep_plans_the_valid_jobs_and_names_the_refused_ones_as_src_run_does(tmp_path, capsys):
    """src.run refuses a sweep's invalid jobs before launch and runs the others; the plan stopped at the first
    invalid job ("plan: ConfigError: ...", exit 2) and planned none of the valid ones."""
    root = f"paths.root_dir={tmp_path}"
    line = "ConfigError: loss: rf_lognorm: s={} is not allowed; s must be > 0"
    assert plan.main(["-m", "loss=rf_lognorm", "loss.s=-1,1,-2", root, "--mfu", "0.3"]) == 1
    out = capsys.readouterr().out
    table, refused = out.split("Refused before launch", 1)
    assert "rf_lognorm_0.00_1.00" in table and "1 job (1 to run" in table and "s=-" not in table
    assert refused.splitlines()[1:] == [f"  digits/loss=rf_lognorm,loss.s=-1: {line.format(-1)}",
                                        f"  digits/loss=rf_lognorm,loss.s=-2: {line.format(-2)}"]
    assert "launches the others" in refused.splitlines()[0]
    assert plan.main(["-m", "loss=rf_lognorm", "loss.s=-1,1", root, "--mfu", "0.3", "fail_fast=true"]) == 1
    assert "with fail_fast=true launches no job" in capsys.readouterr().out
    # Every job refused: the command's error, a line per cause (jobs refused alike share one).
    assert plan.main(["-m", "loss=rf_lognorm", "loss.s=-1", "seed=0,1", root]) == 2
    assert capsys.readouterr().err == (f"plan: 2 jobs (digits/loss=rf_lognorm,loss.s=-1/seed=0, "
                                       f"digits/loss=rf_lognorm,loss.s=-1/seed=1): {line.format(-1)}\n")
    # A key no job's configuration has ends the command, as it ends src.run's.
    assert plan.main(["-m", "loss=edm,rf", "loss.s=1", root]) == 2
    assert capsys.readouterr().err.startswith("plan: loss.s: no such setting (a typo?)")


# ---- sweeping keys the run name does not hold ------------------------------------------------------------------
def test_swept_keys_outside_the_run_name_tag_each_job():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from src.launch.sweeper import NAME_KEYS, run_tag, swept_keys, tag_jobs

    parsed = OverridesParser.create().parse_overrides(
        ["loss=rf,edm", "loss.s=1,2", "data=digits,shapes", "optim.lr=1e-4,3e-4", "+x=a/b,c", "seed=0", "model=dit"])
    keys = swept_keys(parsed, NAME_KEYS)
    assert keys == ["optim.lr", "x"]  # loss and its parameters are in the recipe slug, data in the dataset name
    assert swept_keys(parsed, [*NAME_KEYS, "x"]) == ["optim.lr"]
    assert run_tag(["loss=rf", "optim.lr=0.0003", "+x=a/b", "seed=0"], keys) == "/optim.lr=0.0003,x=a_b"
    # Strings as themselves, not as the basic sweeper escapes or quotes them for Hydra's parser (sampler.name=a:B)
    assert run_tag(["sampler.name=ab2\\:AB2", '+x="c(d)"', "optim.lr=[1,2]"], ["sampler.name", "x", "optim.lr"]) == \
        "/sampler.name=ab2:AB2,x=c(d),optim.lr=[1,2]"
    assert tag_jobs([[["loss=rf"], ["loss=edm"]]], []) == [[["loss=rf"], ["loss=edm"]]]  # nothing to tag
    assert tag_jobs([[["optim.lr=0.1"]]], ["optim.lr"]) == [[["optim.lr=0.1", "run_tag='/optim.lr=0.1'"]]]


@pytest.mark.parametrize("value, shown", [
    ('"it\'s"', "it's"), ("'a\\'b'", "a'b"), ("${oc.env:HOME}", "${oc.env:HOME}"),
    ("'a b'", "a b"), ("'c,d'", "c,d"), ("'k=v'", "k=v"),
])
def test_a_swept_string_with_quotes_or_an_interpolation_is_its_run_tag_as_typed(value, shown):
    """The job's run_tag override is a quoted string of Hydra's grammar: a quote in the value ended it (the job
    failed to parse), a ${...} in it was resolved into the directory name (x=/root: a folder more)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from src.launch.sweeper import split_tagged

    batches = split_tagged(OverridesParser.create().parse_overrides([f"+x={value},plain"]), None)
    tag_override = batches[0][0][-1]
    tag = OverridesParser.create().parse_override(tag_override).value()
    assert OmegaConf.create({"run_tag": tag}).run_tag == f"/x={shown}"


def _jobs(*overrides, cfg=None, max_batch_size=None):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from src.launch.sweeper import split_tagged

    cfg = OmegaConf.create(cfg if cfg is not None else {"hydra": {"launcher": {}}})
    batches = split_tagged(OverridesParser.create().parse_overrides(list(overrides)), max_batch_size, cfg)
    return [[next(o.split("=", 1)[1] for o in job if o.startswith(k)) for k in ("loss=", "sampler=")]
            for job in batches[0]], [len(b) for b in batches]


def test_jobs_sharing_a_training_launch_in_two_waves():
    """A sampler sweep: the first job of each model in the first batch, the others (which evaluate its model) in a
    later one, so a launcher running a batch at once (a SLURM array) trains each model once."""
    first, sizes = _jobs("loss=rf,edm", "sampler=rf_time,native,heun")
    assert first == [["rf", "rf_time"], ["edm", "rf_time"]] and sizes == [2, 4]
    _, sizes = _jobs("loss=rf,edm", "sampler=rf_time,native,heun", max_batch_size=3)
    assert sizes == [2, 3, 1]  # no batch holds both waves
    _, sizes = _jobs("loss=rf", "sampler=native", "eval.n_samples=4,8")  # eval.* settings too
    assert sizes == [1, 1]
    # No reuse, no waves: the product order in one batch.
    product = [["rf", "rf_time"], ["rf", "native"], ["edm", "rf_time"], ["edm", "native"]]
    assert _jobs("loss=rf,edm", "sampler=rf_time,native", cfg={"reuse_training": False}) == (product, [4])
    multi_process = {"hydra": {"launcher": {"tasks_per_node": 2, "nodes": 1}}}  # rank 0 links, evaluates
    assert _jobs("loss=rf,edm", "sampler=rf_time,native", cfg=multi_process)[1] == [2, 2]
    assert _jobs("loss=rf,edm", "sampler=rf_time,native", "reuse_training=false") == (product, [4])
    assert _jobs("loss=rf,edm", "sampler=rf_time", "seed=0,1")[1] == [4]  # seeds: four models
    # A sampler in the run name (a sweep file's name_keys): each job has its own directory, no twin, one wave.
    named = {"name_keys": ["loss", "data", "sampler"], "hydra": {"launcher": {}}}
    assert _jobs("loss=rf,edm", "sampler=rf_time,native", "optim.lr=1e-4", cfg=named) == (product, [4])
    assert _jobs("loss=rf,edm", "sampler=rf_time,native", "optim.lr=1e-4,3e-4", cfg=named)[1] == [8]  # lr tagged
    assert _jobs("loss=rf,edm", "sampler=rf_time,native", "optim.lr=1e-4,3e-4")[1] == [4, 4]  # sampler tagged too


def test_plan_of_a_sampler_sweep_counts_each_training_once():
    args = ["loss=rf,edm", "sampler=rf_time,native", "model=dit", "paths.root_dir=/r", *FAKE_SHARDS]
    p = plan.plan_sweep(args, peak_tflops=100, mfu=0.5)
    assert [j.status for j in p.jobs] == ["new", "new", "to evaluate (after sampler=rf_time trains)",
                                          "to evaluate (after sampler=rf_time trains)"]
    assert [j.run_dir.parent.name for j in p.jobs] == ["rf", "edm_-1.20_1.20", "rf", "edm_-1.20_1.20"]
    train = sum(j.train_flops for j in p.jobs[:2])
    # Each model's validation once (its training's), every job's sampling.
    all_flops = train + sum(j.val_flops for j in p.jobs[:2]) + sum(j.eval_flops - j.val_flops for j in p.jobs)
    assert all(j.val_flops > 0 for j in p.jobs)
    text = plan.render(p)
    assert f"GPU-hours at 100 TFLOP/s peak and 50% utilisation: {p.gpu_hours(all_flops):.4g} in all, " \
           f"{p.gpu_hours(all_flops):.4g} still to run" in text
    assert f"training {plan._si(train)}," in text and text.count(" reused ") == 2
    # Wall clock on an array of 8: the two trainings side by side, then the two evaluations side by side.
    slurm = plan.plan_sweep([*args, "hydra/launcher=slurm_cpu", "hydra.launcher.array_parallelism=8"],
                            peak_tflops=100, mfu=0.5)
    wall = sum(slurm.gpu_hours(sum(j.flops_left for j in wave)) / 2 for wave in (slurm.jobs[:2], slurm.jobs[2:]))
    assert [j.wave for j in slurm.jobs] == [1, 1, 2, 2]
    assert f"(array_parallelism), in 2 waves: about {wall:.3g} h." in plan.render(slurm)
    off = plan.plan_sweep([*args, "reuse_training=false"], peak_tflops=100, mfu=0.5)
    assert [j.status for j in off.jobs] == ["new"] * 4 and all(j.trains_here for j in off.jobs)


def test_plan_wall_clock_counts_the_array_rounds():
    """Three equal jobs two at a time: the third starts when one of the first two ends (two jobs' time, not 1.5)."""
    p = plan.plan_sweep(["loss=rf,edm,eps_linear", "model=dit", "paths.root_dir=/r", "hydra/launcher=slurm_cpu",
                         "hydra.launcher.array_parallelism=2", *FAKE_SHARDS], peak_tflops=100, mfu=0.5)
    first = p.jobs[0]
    assert all(j.flops_left == first.flops_left for j in p.jobs)
    assert f"at once (array_parallelism): about {2 * p.gpu_hours(first.flops_left) / first.gpus:.3g} h." \
        in plan.render(p)


def test_plan_counts_a_reused_training_once_after_the_sweep_ran(tmp_path):
    """A directory that evaluated its twin's model (reused_training.json) trained nothing: "in all" still counts that
    model's training once, as before the sweep ran."""
    import torch

    args = ["-m", "loss=rf", "sampler=rf_time,native", "model=dit", f"paths.root_dir={tmp_path}", "train.max_steps=5",
            *FAKE_SHARDS]
    before = plan.plan_sweep(args, peak_tflops=100, mfu=0.5)
    for j in before.jobs:
        (j.run_dir / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": 5}, j.run_dir / "checkpoints" / "last.ckpt")
    native = before.jobs[1].run_dir
    (native / "reused_training.json").write_text(json.dumps({"checkpoints_from": str(before.jobs[0].run_dir)}))
    after = plan.plan_sweep(args, peak_tflops=100, mfu=0.5)
    assert [j.status for j in after.jobs] == ["to evaluate", "to evaluate"]
    assert [j.trains_here for j in after.jobs] == [True, False] and plan.render(after).count(" reused ") == 1
    assert sum(j.total_flops for j in after.jobs) == pytest.approx(sum(j.total_flops for j in before.jobs))


def test_plan_and_named_sweeps_keep_their_directories():
    dirs = [str(j.run_dir) for j in plan.plan_sweep(["+sweep=smoke", "paths.root_dir=/r"]).jobs]
    assert "/r/outputs/multirun/smoke/shapes/eps_linear" in dirs  # recipe and dataset sweeps: no tag
    p = plan.plan_sweep(["loss=rf,edm", "optim.lr=1e-4,3e-4", "model=dit", "paths.root_dir=/r", *FAKE_SHARDS])
    dirs = sorted(str(j.run_dir) for j in p.jobs)
    assert dirs == sorted(f"/r/outputs/multirun/default/fake/{r}/optim.lr={lr}"
                          for r in ("rf", "edm_-1.20_1.20") for lr in ("0.0001", "0.0003"))
    p = plan.plan_sweep(["+sweep=backbones", "optim.lr=1e-4,3e-4", "paths.root_dir=/r", *FAKE_SHARDS])
    assert "/r/outputs/multirun/backbones/fake/dit/rf_lognorm_0.00_1.00/optim.lr=0.0003" in {
        str(j.run_dir) for j in p.jobs}


def test_plan_of_a_single_run_names_the_single_runs_directory():
    """`python -m src.run loss=rf` (no -m) runs in hydra.run.dir (outputs/runs/...): the plan says that one."""
    [single] = plan.plan_sweep(["loss=rf", "paths.root_dir=/r"]).jobs
    assert str(single.run_dir) == "/r/outputs/runs/digits/rf"
    for multirun in ("-m", "--multirun"):
        [job] = plan.plan_sweep([multirun, "loss=rf", "paths.root_dir=/r"]).jobs
        assert str(job.run_dir) == "/r/outputs/multirun/default/digits/rf"


@pytest.mark.slow  # the quick suite's time budget; run tags are planned and tested quickly above; test_faults sweeps optim.lr through the CLI
def test_learning_rate_sweep_runs_each_value_in_its_own_directory_and_ranks_them(tmp_path):
    from src.ranking.aggregate import load_sweep

    args = ["-m", "loss=rf", "optim.lr=1e-4,3e-3", f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache",
            "model.depth=1", "model.hidden_size=32", "data.batch_size=16", "data.val_samples=16", "train.max_steps=2",
            "train.val_every=2", "train.ckpt_every=2", "eval.n_samples=4", "eval.batch_size=4",
            "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", "logger=csv",
            "trainer.enable_progress_bar=false", "torch_threads=1"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True,
                   env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "outputs/multirun/default/digits/rf"
    for lr in ("0.0001", "0.003"):
        run = sweep / f"optim.lr={lr}"
        assert json.loads((run / "fingerprint.json").read_text())["optim"]["lr"] == float(lr)
        assert (run / "results.json").is_file()
    records = load_sweep([tmp_path / "outputs/multirun/default"]).records
    assert sorted(records["recipe"].unique()) == ["rf [optim.lr=0.0001]", "rf [optim.lr=0.003]"]
    # The same command again: both runs are found complete and skipped.
    out = warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True,
                   env=env, timeout=600)
    assert out.returncode == 0 and (out.stdout + out.stderr).count("complete already, skipped") == 2
    # Another evaluation setting: both runs are evaluated again, not retrained, and the old records stay.
    checkpoint = (sweep / "optim.lr=0.0001" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    out = warm.run([sys.executable, "-m", "src.run", *args, "eval.n_samples=3"], cwd=ROOT, capture_output=True,
                   text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("results for eval.n_samples=3 missing: evaluating, training is done") == 2
    assert (sweep / "optim.lr=0.0001" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == checkpoint
    records = json.loads((sweep / "optim.lr=0.0001" / "results.json").read_text())
    assert sorted(r["n_samples"] for r in records) == [3, 4]


@pytest.mark.parametrize("model, tag, sampler, name", [
    ("src.models.MMDiT", "", "rf_time", "rf"),
    ("src.models.DiT", "", "rf_time", "rf [DiT]"),  # the backbone sweep
    ("src.models.MMDiT", "/optim.lr=0.0001", "rf_time", "rf [optim.lr=0.0001]"),
    ("src.models.DiT", "/optim.lr=0.0001", "rf_time", "rf [DiT, optim.lr=0.0001]"),
    ("src.models.DiT", "/model=dit,seed=1", "rf_time", "rf [model=dit]"),  # the tag names the backbone already
    ("src.models.MMDiT", "/seed=2", "rf_time", "rf"),  # training seeds pool as replicates of one entry
    ("src.models.MMDiT", "/sampler=native", "native", "rf [sampler=native]"),
    ("src.models.MMDiT", "", "native", "rf [sampler=native]"),  # evaluated with another sampler
])
def test_ranked_names_are_built_from_the_records_fields(model, tag, sampler, name):
    from omegaconf import OmegaConf

    from src.results import entry_name, run_fields

    cfg = OmegaConf.create({"model": {"_target_": model}, "run_tag": tag, "data": {"name": "digits"}, "seed": 0})
    record = {"recipe": "rf", **run_fields(cfg), "sampler": sampler}
    assert entry_name(record) == name
    if "seed" in tag:
        assert entry_name(record, drop=()).endswith("seed=" + tag.rsplit("=", 1)[1] + "]")


@pytest.mark.parametrize("command", [
    # conf/experiment/paper.yaml's usage: one recipe with the study's setup
    "experiment=paper loss=paper/rf_lognorm_0.00_1.00 data.name=imagenet data.train_dir=/x data.eval_dir=/y",
    # sweeps/backbones.yaml's usage: the backbone comparison at the study's setup on real shards
    "+sweep=backbones experiment=paper data=shards data.name=cc12m data.train_dir=/x data.eval_dir=/y",
])
def test_documented_paper_setup_commands_compose(command):
    jobs = plan.plan_sweep(command.split()).jobs
    assert jobs and all(j.steps == 250000 and j.batch_size == 1024 for j in jobs)


# ---- two jobs of one sweep naming one run directory ---------------------------------------------------------------
SAME_DIR = ["loss=rf_lognorm", "loss.m=0,0.0,0.5", "run_name=${data.name}/same"]  # 0 and 0.0: one value spelled twice


def test_plan_launches_a_run_directory_once(tmp_path, capsys):
    """loss.m=0 and 0.0 are one run (equal settings): planned once; loss.m=0.5 under a run_name that leaves out the
    recipe would share their directory with other settings: refused. The plan says both, as the sweeper does: the
    refused one among the jobs refused before launch, named as src.run names it, and src.run's exit status 1."""
    assert plan.main(["-m", *SAME_DIR, f"paths.root_dir={tmp_path}", *FAKE_SHARDS, "--mfu", "0.3"]) == 1
    out = capsys.readouterr().out
    assert "1 job (1 to run" in out
    assert "Not launched: fake/same: loss.m=0.0 is the same run as loss.m=0 (equal settings): launched once." in out
    table, refused = out.split("Refused before launch", 1)
    assert "loss.m=0.5" not in table
    assert refused.splitlines()[1].startswith(
        "  fake/same [loss.m=0.5]: run directory fake/same is also that of the job with loss.m=0, whose settings "
        "differ (loss.m); run_name must tell the jobs apart")
    # fail_fast=true: src.run launches none of the jobs (the refused one counts as an invalid job).
    assert plan.main(["-m", *SAME_DIR, f"paths.root_dir={tmp_path}", *FAKE_SHARDS, "--mfu", "0.3",
                      "fail_fast=true"]) == 1
    assert "with fail_fast=true launches no job" in capsys.readouterr().out
    # An invalid job takes no run directory (src.run checks the valid jobs' directories only): loss.s=-1's jobs are
    # refused for their recipe, and loss.s=1, loss.m=0 is planned in the directory they name, loss.m=0.5 refused.
    assert plan.main(["-m", "loss=rf_lognorm", "loss.s=-1,1", "loss.m=0,0.5", "run_name=${data.name}/same",
                      f"paths.root_dir={tmp_path}", *FAKE_SHARDS, "--mfu", "0.3"]) == 1
    out = capsys.readouterr().out
    table, refused = out.split("Refused before launch", 1)
    assert "1 job (1 to run" in table and "fake/same" in table
    assert "s=-1 is not allowed" in refused and "fake/same [loss.m=0.5]: run directory fake/same" in refused
    # A tagged key spelled two ways gets two tags ("50", "50.0"), hence two directories, for one training.
    assert plan.main(["-m", "optim.warmup_steps=50,50.0,60", f"paths.root_dir={tmp_path}", *FAKE_SHARDS,
                      "--mfu", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "2 jobs (2 to run" in out and "optim.warmup_steps=50.0 is the same run as optim.warmup_steps=50 (equal " \
        "settings, in fake/rf_lognorm_0.00_1.00/optim.warmup_steps=50): launched once." in out


def test_sweep_launches_a_run_directory_once_and_refuses_a_second_configuration_in_it(tmp_path):
    """Through the sweeper: the job spelling loss.m=0 as 0.0 is not launched a second time (on a SLURM array the two
    would write one directory at once); the job with other settings in that directory is refused before anything is
    launched, named in the summary and failures.json; the first job runs to the end."""
    from src.launch.failures import read_sweep_failures

    args = ["-m", *SAME_DIR, f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", "model.depth=1",
            "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=16",
            "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2", "eval.n_samples=4", "eval.batch_size=4",
            "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", "logger=csv", "torch_threads=1"]
    out = warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True,
                   env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "digits/same: loss.m=0.0 is the same run as loss.m=0 (equal settings): launched once" in console
    assert "job 1/1: digits/same" in console and "job 2/" not in console
    summary = out.stderr[out.stderr.index("1 job(s) failed:"):]
    assert "digits/same [loss.m=0.5]: run directory digits/same is also that of the job with loss.m=0" in summary
    sweep = tmp_path / "outputs/multirun/default"
    assert json.loads((sweep / "digits/same/fingerprint.json").read_text())["loss"]["m"] == 0
    assert (sweep / "digits/same/results.json").is_file() and not (sweep / "digits/same/error.json").exists()
    assert [v["error"] for v in read_sweep_failures(sweep).values()] == [summary.splitlines()[1].split(": ", 1)[1]]


def test_a_plan_says_why_a_job_shares_a_directory_under_the_default_run_name(tmp_path, capsys):
    """loss.m=0.001 and 0.002 differ, but the recipe's name rounds them alike and the sweeper tags no loss key: the
    refusal says so instead of blaming a run_name the user never set; a job given twice is said as such."""
    args = [f"paths.root_dir={tmp_path}", *FAKE_SHARDS, "--mfu", "0.3"]
    assert plan.main(["-m", "loss=rf_lognorm", "loss.m=0.001,0.002", *args]) == 1  # src.run refuses it: status 1
    out = capsys.readouterr().out
    assert "whose settings differ (loss.m); run_name must tell the jobs apart" in out
    assert "the recipe's name gives its parameters to two decimals: sweep with name_keys=[data,data.name]" in out
    assert plan.main(["-m", "seed=0,0", *args]) == 0
    out = capsys.readouterr().out
    assert "the same job given twice (equal settings): launched once." in out and "same overrides" not in out


def test_a_package_override_is_tagged_under_its_key():
    """`-m db@backup=a,b` sweeps the key db: each job's run_tag holds its value, or both jobs would share a
    directory."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from src.launch.sweeper import run_tag, swept_keys

    keys = swept_keys(OverridesParser.create().parse_overrides(["+x@y.z=a,b"]))
    assert keys == ["x"] and run_tag(["+x@y.z=a"], keys) == "/x=a"


@pytest.mark.parametrize("text", ["a\\'b", "c\\", "\\\\'", "d\\\\", "plain"])
def test_a_run_tag_with_backslashes_is_read_back_by_hydra_as_written(text):
    """Backslashes before a quote or the closing quote escape it in Hydra's grammar unless doubled: the tag would
    end early (the job fails to parse) or lose its backslashes (another directory name)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from src.launch.sweeper import _quoted

    assert OverridesParser.create().parse_override(f"run_tag={_quoted(text)}").value() == text


def test_a_sweep_without_name_keys_tags_no_recipe_or_dataset_key():
    """The default run name already names the recipe and the dataset: with no name_keys (no configuration, or one
    without the key) only the other swept keys are tagged."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from src.launch.sweeper import split_tagged

    overrides = OverridesParser.create().parse_overrides(["loss=rf,edm", "data=digits,shapes", "seed=0,1"])
    for cfg in (None, OmegaConf.create({"reuse_training": False})):
        jobs = [job for batch in split_tagged(overrides, None, cfg) for job in batch]
        assert {job[-1] for job in jobs} == {"run_tag='/seed=0'", "run_tag='/seed=1'"} and len(jobs) == 8


def test_a_refusal_names_five_differing_keys_and_counts_the_others():
    """Two configurations in one run directory: the refusal names the keys that differ, five of them, and how many
    more there are."""
    from omegaconf import OmegaConf

    from src.launch.validate import same_run_dir

    keys = "abcdef"

    def cfg(value):
        return OmegaConf.create({"hydra": {"sweep": {"subdir": "d"}}, **{k: value for k in keys}})

    runs = {}
    assert same_run_dir(cfg(1), ["x=1"], runs) is None
    same = same_run_dir(cfg(2), ["x=2"], runs)
    assert same.refused and "whose settings differ (a, b, c, d, e and 1 more)" in same.line


def test_a_run_directory_inside_or_around_an_earlier_launchs_is_refused(tmp_path):
    """The sweep relaunched with a key added (sampler=rf_time,ab2) put digits/rf/sampler=ab2 inside the earlier run
    digits/rf, and taken away the reverse: the rank report, which does not look inside a run directory, counted the
    inner runs as never started and ranked without them."""
    from src.launch.validate import nested_run_dir

    sweep = tmp_path / "sweep"
    (sweep / "digits/rf").mkdir(parents=True)
    (sweep / "digits/rf/results.json").write_text("[]")
    (sweep / "digits/edm/sampler=ab2").mkdir(parents=True)
    (sweep / "digits/edm/sampler=ab2/results.json").write_text("[]")
    assert str(nested_run_dir(sweep, sweep / "digits/rf/sampler=ab2")) == (
        "run directory digits/rf/sampler=ab2 would lie inside digits/rf, the run directory of an earlier launch of "
        "this sweep: the rank report does not look inside a run directory; use another sweep_name")
    assert "would hold digits/edm/sampler=ab2, the run directory" in str(nested_run_dir(sweep, sweep / "digits/edm"))
    for fine in ("digits/rf", "digits/edm/sampler=ab2", "digits/edm/sampler=heun", "digits/eps"):  # a relaunch, new
        assert nested_run_dir(sweep, sweep / fine) is None
    from omegaconf import OmegaConf  # the plan says so too, rather than "new"

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    assert plan.job_status(cfg, sweep / "digits/rf/sampler=ab2") == "refused: inside or around an earlier launch's " \
                                                                     "run directory"


# ---- Hydra's sweep functions and what the grid sweeper cannot launch -----------------------------------------------
def test_a_plan_expands_glob_over_a_config_group_as_the_launch_does():
    """`loss='glob(rf_*)'` ended the plan with `HydraException: ConfigLoader is not set` (its override parser had no
    config loader to list the group's options), where src.run launches the three rf_* recipes."""
    for swept, slugs in (("glob(rf_*)", ["rf_cosmap", "rf_lognorm_0.00_1.00", "rf_mode_1.29"]),
                         ("glob(*,exclude=[e*,rf*,recipe])", ["v_cos", "v_linear"])):
        jobs = plan.plan_sweep(["-m", f"loss={swept}", "model=dit", *FAKE_SHARDS, "paths.root_dir=/r"]).jobs
        assert [j.run_dir.name for j in jobs] == slugs


@pytest.mark.parametrize("args, line", [
    (["optim.lr=interval(1e-4,3e-4)"], "optim.lr=interval(1e-4,3e-4): interval() is a continuous range, which this "
     "grid sweeper cannot list as jobs; give the values (optim.lr=1e-4,3e-4), range(start,stop,step) or choice(...)"),
    (["+sweep=smoke,backbones"], "+sweep=smoke,backbones: a command runs one sweep, in one folder (sweep_name); run "
     "each sweep in a command of its own"),
    (["sweep_name=a,b"], "sweep_name=a,b: a command runs one sweep, in one folder (sweep_name); run each sweep_name "
     "in a command of its own"),
])
def test_a_sweep_the_grid_sweeper_cannot_launch_is_one_line_and_writes_nothing(tmp_path, capsys, args, line):
    """interval(...) ended src.run in Hydra's traceback (`BasicSweeper does not support sweep type : INTERVAL_SWEEP`)
    and the plan in that line, naming neither the key nor what works; `+sweep=smoke,backbones` ran one job per sweep
    file with none of its swept values and `sweep_name=a,b` put the jobs in two sweep folders, the sweep's records
    (multirun.yaml, jobs.json) in a third."""
    root = f"paths.root_dir={tmp_path}"
    assert plan.main(["-m", *args, root]) == 2
    assert capsys.readouterr().err == f"plan: {line}\n"
    out = warm.run([sys.executable, "-m", "src.run", "-m", *args, root], cwd=ROOT, capture_output=True, text=True,
                   timeout=120)
    assert (out.returncode, out.stderr) == (1, line + "\n")
    assert list(tmp_path.iterdir()) == []


def test_a_plan_refuses_a_sweep_over_hydra_s_own_keys_as_the_launch_does(tmp_path, capsys):
    """src.run refuses `hydra.sweep.dir=a,b` (Hydra: not supported) and launches nothing; the plan planned it."""
    assert plan.main(["-m", f"hydra.sweep.dir={tmp_path}/a,{tmp_path}/b", f"paths.root_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == ("plan: Sweeping over Hydra's configuration is not supported : "
                                       f"'hydra.sweep.dir={tmp_path}/a,{tmp_path}/b'\n")


def test_a_run_name_with_a_folder_over_255_bytes_is_refused_before_launch(capsys):
    """A swept value of 300 characters made a run tag over the file systems' 255 bytes per folder name: the plan
    planned it and src.run wrote the sweep's files, then ended at the job's mkdir (`OSError: [Errno 36] File name too
    long`), the other jobs not run. It is refused before launch like any invalid job; the others run."""
    long = "x" * 300
    p = plan.plan_sweep(["-m", f"logger.wandb.project={long},short", "model=dit", *FAKE_SHARDS, "paths.root_dir=/r"])
    assert [j.run_dir.name for j in p.jobs] == ["logger.wandb.project=short"]
    (refused,) = p.refused_before_launch
    assert refused.endswith("is 321 bytes, over the 255 a file system allows; sweep shorter values, or set a "
                            "shorter run_name")
    from src.config import ConfigError
    from src.training.prepare import check_run_name

    with pytest.raises(ConfigError, match="its folder é{40}... is 512 bytes"):
        check_run_name(OmegaConf.create({"run_name": "digits/" + "é" * 256, "paths": {"output_dir": "o"}}))
    check_run_name(OmegaConf.create({"run_name": "digits/" + "x" * 255, "paths": {"output_dir": "o"}}))
