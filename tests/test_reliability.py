"""Nothing lost or falsified on a rerun, and configuration errors before anything is created.

- a refused relaunch leaves every file of the finished run byte-identical (Hydra's per-job files and run.log too);
- configuration errors (loss, model, data, eval) create no run directory and no embedded data folder;
- csv/metrics.csv keeps every attempt's rows (a kill -9 and a resume lose no logged step);
- a truncated last.ckpt falls back to last.prev.ckpt and the run ends with the uninterrupted run's weights;
- temp files of an interrupted write are removed when the job starts again;
- Ctrl-C (SIGINT) saves a checkpoint at a step boundary, exits non-zero, and a rerun resumes.
"""

import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from src.config import ConfigError, parse_loss, register_resolvers
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
register_resolvers()

TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "train.max_steps=4", "train.val_every=2", "train.ckpt_every=2", "eval.n_samples=4", "eval.batch_size=4",
    "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", "logger=csv", "trainer.enable_progress_bar=false",
    "torch_threads=1",
]
# A longer run for interrupting: small steps, a checkpoint every 10, a logged training loss every step.
LONG = [*TINY, "train.max_steps=300", "train.ckpt_every=10", "train.val_every=100", "trainer.log_every_n_steps=1",
        "eval.enabled=false"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from src.data.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("cache")
    prepare_embedded("digits", cache / "data")  # once, before the subprocesses share it
    return cache


def cli(args, **kwargs):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True,
                    env=env, timeout=600, **kwargs)


def popen(args, log_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "src.run", *args], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


def wait_for(condition, proc, log_path, timeout=300):
    """Poll condition() until it holds; fail if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended (exit {proc.returncode}) first:\n{Path(log_path).read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{Path(log_path).read_text()[-3000:]}"
        time.sleep(0.01)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones included), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def backbone_weights(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("backbone.", "ema_backbone."))}


def compose_cfg(overrides):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# ---- a refused relaunch writes nothing -------------------------------------------------------------------------
@pytest.mark.slow
def test_refused_relaunch_leaves_the_finished_run_byte_identical(tmp_path, cache_dir):
    args = ["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=refuse",
            "loss=rf", "optim.lr=1e-3"]
    first = cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = tmp_path / "outputs/multirun/refuse"
    run = sweep / "digits/rf"
    assert (run / "results.json").is_file() and (run / ".hydra/config.yaml").is_file()
    before, sweep_before = tree_digest(run), tree_digest(sweep)

    # The same sweep with a changed training setting: refused, and the finished run is untouched.
    second = cli([*args[:-1], "optim.lr=3e-4"])
    assert second.returncode == 1
    assert "digits/rf: ConfigError:" in second.stderr and "different configuration (optim.lr)" in second.stderr
    assert tree_digest(run) == before
    assert "lr: 0.001" in (run / ".hydra/config.yaml").read_text()
    # Refused whole, the command changed nothing of the sweep either (multirun.yaml, failures.json, their times).
    assert tree_digest(sweep) == sweep_before
    # A bad value on the finished run is refused as on a fresh one: nothing rewritten (not even .hydra/).
    for bad, message in (("optim.fused=maybe", "optim.fused=maybe: not allowed"),
                         ("eval.settings=[]", "eval.settings=[]: must be a non-empty list")):
        out = cli([*args, bad])
        assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
        assert tree_digest(sweep) == sweep_before

    from src.ranking.aggregate import load_sweep

    loaded = load_sweep([sweep])
    assert list(loaded.runs["status"]) == ["done"] and not loaded.partial

    # A relaunch asking for more that fails in the job (best.ckpt damaged, found when the evaluation loads it): the
    # finished run keeps its files (no error.json, .hydra/ as it was; run.log gets the error); the sweep's
    # failures.json names the job.
    best = run / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes()[:1000])
    before = {k: v for k, v in tree_digest(run).items() if k not in ("run.log", ".run.lock")}  # the log, the lock
    failed = cli([*args, "eval.seed=5"])
    assert failed.returncode == 1
    assert "digits/rf: ValueError: " in failed.stderr and "best.ckpt: cannot be read as a checkpoint" in failed.stderr
    assert {k: v for k, v in tree_digest(run).items() if k not in ("run.log", ".run.lock")} == before
    assert "cannot be read as a checkpoint" in (run / "run.log").read_text()
    # The console says it in one line and where the traceback is; run.log holds the traceback.
    console = failed.stdout + failed.stderr
    assert "Traceback" not in console and f"(traceback in {run / 'run.log'})" in failed.stdout
    assert "Traceback (most recent call last)" in (run / "run.log").read_text()
    from src.launch.failures import read_sweep_failures

    assert "best.ckpt: cannot be read" in read_sweep_failures(sweep)["digits/rf"]["error"]
    # The report ranks the intact run and shows that its latest launch did not run.
    assert list(load_sweep([sweep]).runs["status"]) == ["done", "refused"]


# ---- configuration errors create nothing ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["loss=rf_lognorm", "loss.s=-1"], "loss: rf_lognorm: s=-1 is not allowed"),
    (["model.num_heads=3"], "model: num_heads=3 is not allowed with hidden_size=64"),
    (["model.patch_size=3"], "model: input_size=16 is not allowed; allowed: multiples of patch_size=3"),
    (["data.name=mnist"], "data.name=mnist: dataset='mnist' is not an embedded dataset"),
    (["data.image_size=20"], "data.image_size=20 is not allowed; allowed: a multiple of 8 from 8 to 64"),
    (["data=shards", "data.train_dir=/nonexistent", "data.eval_dir=/nonexistent"], "data.train_dir=/nonexistent"),
    (["eval.n_samples=1"], "eval.n_samples=1: must be an integer >= 2"),
    (["eval.ema=[1]"], "eval.ema.0=1: must be a boolean"),
    (["eval.clip.weights_path=/nonexistent.bin", "eval.clip.model_name=ViT-B-32"], "eval.clip.weights_path"),
    (["eval.clip.model_name=ViT-Bogus", f"eval.clip.weights_path={ROOT / 'assets/tiny_clip/tiny_clip.pt'}"],
     "eval.clip.model_name=ViT-Bogus: not an open_clip model; allowed: tiny-clip-16px, ViT-L-14, "),
    (["train.max_steps=0"], "train.max_steps=0: must be an integer >= 1"),
    # Settings that Lightning, torch or the evaluation would refuse only after the run directory exists (or after
    # the training): here before anything.
    (["optim.fused=maybe"], "optim.fused=maybe: not allowed; allowed: auto, true, false"),
    (["optim.betas=[2,3]"], "optim.betas=[2, 3]: not allowed; allowed: two numbers in [0, 1)"),
    (["optim.eps=0"], "optim.eps=0: not allowed; allowed: a number > 0"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1: not allowed; allowed: a number >= 0"),
    (["torch_threads=-2"], "torch_threads=-2: must be an integer >= 1"),
    (["paths.cache_dir="], "paths.cache_dir=: must be a folder (relative paths are taken from the directory"),
    (["trainer.devices=0"], "trainer.devices=0: not allowed; allowed: an integer >= 1, -1 (all), auto, or device"),
    (["trainer.precision=bogus"], "trainer.precision=bogus: not allowed; allowed: null (bf16-mixed on a GPU"),
    (["trainer.precision=bf16-true"], "trainer.precision=bf16-true: not allowed: the weights, their EMA and AdamW's "
                                      "state would be half precision"),
    (["trainer.accelerator=tpu"], "trainer.accelerator=tpu: not allowed; allowed: auto, cpu, gpu, cuda, mps"),
    (["logger.wandb.mode=bogus"], "logger.wandb.mode=bogus: not allowed; allowed: offline, online, disabled"),
    (["logger.wandb.enabled=maybe"], "logger.wandb.enabled=maybe: not allowed; allowed: true, false"),
    (["data.val_samples=100000"], "data.val_samples=100000: the evaluation split holds 297 samples"),
    (["data.in_memory=no"], "data.in_memory=no: must be a boolean (true or false)"),
    (["fail_fast=no"], "fail_fast=no: must be a boolean (true or false)"),  # was read as true: the sweep stopped
    (["reuse_training=no"], "reuse_training=no: must be a boolean (true or false)"),  # was read as true: reused
    (["verbose=no"], "verbose=no: must be a boolean (true or false)"),  # was read as true: library lines shown
    # An empty sweep_name made outputs/multirun the sweep's folder; ".." one outside it.
    (["sweep_name="], "sweep_name=: must name a folder inside "),
    (["sweep_name=../elsewhere"], "sweep_name=../elsewhere: must name a folder inside "),
    (["trainer.devices=3", "trainer.accelerator=cpu"],  # else found once the three ranks have started
     "data.batch_size=64: the global batch must divide over the 3 ranks (trainer.devices=3 x num_nodes=1); allowed: "
     "multiples of 3"),
    (["train.cond_groups=[{context_tokens: [0, 77], pooled_channels: [0, 8]}]"],  # the digits have 16 tokens
     "train.cond_groups.0.context_tokens=[0, 77]: not allowed; allowed: [start, end] with 0 <= start <= end <= 16"),
    (["train.cond_groups=[{context_tokens: [0, 16], pooled_channels: [0, 8], context_channel: [0, 8]}]"],
     "train.cond_groups.0.context_channel: no such key; a group has context_tokens, context_channels, pooled_chan"),
    (["sampler.name=bogus"], "sampler.name=bogus: sampler='bogus' is not allowed; choose one of rf_time"),
    (["eval.settings=5"], "eval.settings=5: must be a non-empty list"),
    (["eval.ema=[]"], "eval.ema=[]: must be a non-empty list"),
    ([f"eval.inception.weights_path={ROOT / 'README.md'}"], "eval.inception.weights_path=.*: not a weights file"),
    # Non-finite optimizer values passed "> 0" / ">= 0": the job failed in its run directory, naming no setting.
    (["optim.lr=inf"], "optim.lr=inf: must be a number > 0, finite"),
    (["optim.eps=inf"], "optim.eps=inf: not allowed; allowed: a number > 0, finite"),
    (["optim.weight_decay=nan"], "optim.weight_decay=nan: not allowed; allowed: a number >= 0, finite"),
    (["optim.warmup_steps=inf"], "optim.warmup_steps=inf: must be a number >= 0, finite"),
    # Lightning's refusal came in the run directory; the others Lightning read as truth values or every step.
    (["trainer.strategy=bogus"], "trainer.strategy=bogus: not allowed; allowed: auto, ddp, ddp_spawn"),
    (["trainer.deterministic=maybe"], "trainer.deterministic=maybe: not allowed; allowed: true, false, warn"),
    (["trainer.enable_progress_bar=maybe"], "trainer.enable_progress_bar=maybe: must be a boolean (true or false)"),
    (["trainer.log_every_n_steps=-1"], "trainer.log_every_n_steps=-1: must be an integer >= 0"),
    # An empty run_name trained in outputs/runs itself (a sweep: in the sweep's folder); ".." outside it.
    (["run_name="], "run_name=: must name a folder inside the sweep's folder"),
    (["run_name=../../elsewhere"], "run_name=../../elsewhere: must name a folder inside the sweep's folder"),
    (["model.mlp_ratio=nan"], "model: mlp_ratio=nan is not allowed; allowed: a positive finite number"),
    (["eval.clip.force_quick_gelu=maybe"], "eval.clip.force_quick_gelu=maybe: allowed values are true, false, null"),
    # Hydra's "Expected a callable target, got 'None' of type 'NoneType'" named no setting.
    (["model._target_=null"], "model._target_=None: not allowed; need the import path of a backbone class"),
    # Found when the evaluation started, after the training.
    (["sampler=native", "loss=eps_linear", "eval.settings=[{steps: 5000, cfg: 1.0}]"],
     "eval.settings.0.steps=5000: sampler=native: eps/linear has 1000 discrete levels; steps=5000 is not allowed"),
], ids=["loss", "model heads", "model patch", "data name", "data image size", "data shards", "eval n_samples", "eval ema",
        "eval weights", "eval clip model", "train", "optim fused", "optim betas", "optim eps", "optim weight decay",
        "torch threads", "cache dir", "trainer devices", "trainer precision", "trainer half weights",
        "trainer accelerator", "wandb mode", "wandb enabled", "val samples", "in memory", "fail fast", "reuse training",
        "verbose", "sweep name empty", "sweep name outside",
        "batch over ranks",
        "cond groups range", "cond groups key",
        "sampler", "eval settings",
        "eval ema empty", "inception file", "optim lr inf", "optim eps inf", "optim weight decay nan",
        "optim warmup inf", "trainer strategy", "trainer deterministic", "trainer progress bar",
        "trainer log every", "run name empty", "run name outside", "model mlp ratio nan", "eval quick gelu",
        "model target null", "native steps over levels"])
def test_config_errors_are_found_before_anything_is_built(tmp_path, overrides, message):
    """check_config (what the sweeper and the run-start callback call) raises one line; nothing was created."""
    from src.training.prepare import prepare_job

    cfg = compose_cfg([*overrides, f"paths.root_dir={tmp_path}"])
    pattern = message if ".*" in message else re.escape(message)
    with pytest.raises(ConfigError, match=pattern) as info:
        prepare_job(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no .cache/data, no run directory


def test_a_numeric_sweep_name_is_a_folder_name():
    """Hydra reads sweep_name=2024 as an int: a folder name all the same, not refused by the sweep_name check."""
    from src.training.prepare import check_values

    check_values(compose_cfg(["sweep_name=2024"]))


def test_config_error_via_the_cli_is_one_line_and_creates_nothing(tmp_path):
    out = cli(["loss=rf_lognorm", "loss.s=-1", f"paths.root_dir={tmp_path}"])
    assert out.returncode == 1
    assert out.stderr.strip() == "ConfigError: loss: rf_lognorm: s=-1 is not allowed; s must be > 0"
    assert list(tmp_path.iterdir()) == []


#: Runs a module as `python -m` would, with Lightning's packages refused on import.
WITHOUT_LIGHTNING = (
    "import runpy, sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
    "            raise ImportError('blocked: ' + name)\n"
    "sys.meta_path.insert(0, Block())\n"
    "module, sys.argv = sys.argv[1], sys.argv[1:]\n"
    "runpy.run_module(module, run_name='__main__')\n"
)


def test_refusals_before_launching_and_plans_do_not_import_lightning(tmp_path):
    """The job's checks (src.training.prepare), the launcher's and the planner import no Lightning: a refused
    sweep says so in a couple of seconds, not after the 4 s Lightning takes to import."""
    env = {**os.environ, "WANDB_MODE": "disabled"}

    def run(*args, **changes):
        return subprocess.run([sys.executable, "-c", WITHOUT_LIGHTNING, *args], cwd=ROOT, capture_output=True,
                              text=True, env={**env, **changes}, timeout=300)

    out = run("src.run", "-m", "loss=rf_lognorm", "loss.s=-1,-2", f"paths.root_dir={tmp_path}")
    assert out.returncode == 1 and "blocked" not in out.stderr, out.stderr[-2000:]
    assert "ConfigError: loss: rf_lognorm: s=-1 is not allowed; s must be > 0" in out.stderr
    out = run("src.run", "-m", "hydra/launcher=slurm_cpu", "loss=rf", f"paths.root_dir={tmp_path}",
              PATH=str(tmp_path))  # no SLURM here
    assert out.returncode == 1 and out.stderr.startswith("LaunchError: sbatch and srun not found"), out.stderr[-2000:]
    out = run("src.plan", "-m", "loss=rf,edm", f"paths.root_dir={tmp_path}")
    assert out.returncode == 0 and "2 jobs (2 to run; done: 0)" in out.stdout, out.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()


LOSS_OPTIONS = ("edm, edm_cos, edm_rf, eps_cos, eps_linear, recipe, rf, rf_cosmap, rf_lognorm, rf_mode, v_cos, "
                "v_linear")
PAPER_OPTIONS = ", ".join(f"paper/{p.stem}" for p in sorted((ROOT / "conf" / "loss" / "paper").glob("*.yaml")))
GRAMMAR = "the syntax: https://hydra.cc/docs/advanced/override_grammar/basic"
TRAIN_KEYS = ("max_steps, val_every, ckpt_every, ema_every, ema_decay, cond_dropout, cond_groups, val_levels, shift, "
              "loss_check_every")


@pytest.mark.parametrize("args, line", [
    (["loss=bogus"], f"loss=bogus: no such option in config group loss; allowed: {LOSS_OPTIONS}"),
    (["loss=paper/edm_0.60_1.21"], f"loss=paper/edm_0.60_1.21: no such option in config group loss; allowed: "
                                   f"{PAPER_OPTIONS}"),
    (["+sweep=bogus"], "sweep=bogus: no such option in config group sweep; allowed: backbones, paper_embedded, "
                       "paper_grid, paper_recipes, smoke, table1"),
    (["hydra/launcher=bogus"], "hydra/launcher=bogus: no such option in config group hydra/launcher; allowed: basic, "
                               "local, slurm, slurm_8gpu, slurm_cpu, submitit_local, submitit_slurm"),
    (["train.max_stepz=3"], f"train.max_stepz: no such setting (a typo?); the settings of train: {TRAIN_KEYS}"),
    (["model.depth.x=3"], "model.depth.x: no such setting (a typo?)"),
    (["~train.max_stepz"], "Could not delete from config. 'train.max_stepz' does not exist."),
    (["train.max_steps=[1"], f"train.max_steps=[1: not a valid override (no viable alternative at input '[1'); "
                             f"{GRAMMAR}"),
    (["hydra/launcher=slurm_cpu", "hydra.launcher.timeout_min=abc"],
     "hydra.launcher.timeout_min=abc: not a valid value (Value 'abc' of type 'str' could not be converted to Integer)"),
    (["hydra/launcher=slurm_cpu", "hydra.launcher.mem_gb=4GB"],
     "hydra.launcher.mem_gb=4GB: not a valid value (Value '4GB' of type 'str' could not be converted to Integer)"),
], ids=["option", "paper option", "sweep", "launcher", "key", "key under a value", "deletion", "syntax", "typed value",
        "launcher memory"])
def test_hydra_composition_errors_are_one_line_and_create_nothing(tmp_path, monkeypatch, capsys, args, line):
    """Hydra's own errors (an option or a setting that does not exist, an override it cannot parse) in one line
    naming the setting and what is allowed; Hydra prints them over many lines with its search path. src.run's cli()
    in this process (the command itself, and sweeps, whose sweeper Hydra loads as a plugin once per process:
    test_hydra_composition_errors_through_the_command)."""
    from src.run import cli as run_cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["src/run.py", *args, f"paths.root_dir={tmp_path}"])
    assert run_cli() == 1
    assert capsys.readouterr().err.strip() == line
    assert list(tmp_path.iterdir()) == [] and "HYDRA_FULL_ERROR" not in os.environ


def test_hydra_composition_errors_through_the_command(tmp_path):
    for args, line in ((["-m", "loss=rf,bogus"], f"loss=bogus: no such option in config group loss; allowed: "
                                                 f"{LOSS_OPTIONS}"),
                       (["-m", "train.max_stepz=1,2"], f"train.max_stepz: no such setting (a typo?); the settings "
                                                       f"of train: {TRAIN_KEYS}")):
        out = cli([*args, f"paths.root_dir={tmp_path}"])
        assert out.returncode == 1 and out.stderr.strip() == line
    assert list(tmp_path.iterdir()) == []
    out = cli([f"paths.root_dir={tmp_path}", "loss=rf", "-m", "loss=edm"])  # Hydra: an eight-line usage message
    assert out.returncode == 2 and out.stderr.strip() == (
        f"-m: Hydra's options go before the overrides (python -m src.run -m paths.root_dir={tmp_path} ...), here "
        "loss=edm follows it")
    assert list(tmp_path.iterdir()) == []
    from src.launch.validate import misplaced_option  # options before the overrides, or after all of them, are read

    assert misplaced_option(["-m", "loss=rf"]) is misplaced_option(["loss=rf", "--cfg", "job"]) is None


def test_hydra_full_error_keeps_hydras_own_report(tmp_path):
    out = warm.run([sys.executable, "-m", "src.run", "loss=bogus", f"paths.root_dir={tmp_path}"], cwd=ROOT,
                   capture_output=True, text=True, timeout=300,
                   env={**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"})
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "MissingConfigException" in out.stderr
    assert "Available options in 'loss'" in out.stderr


@pytest.mark.parametrize("module", ["src.plan", "src.evaluate"])
def test_hydra_composition_errors_of_plan_and_evaluate_are_one_line(tmp_path, module):
    if module == "src.evaluate":  # a run directory first; a sampler is what it may change
        (tmp_path / "config.yaml").write_text("{loss: {family: rf}, model: {}, data: {}, train: {}}\n")
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
        args, line = [str(tmp_path), "sampler=bogus"], "sampler=bogus: no such option in config group sampler; " \
                                                       "allowed: heun, native, rf_time"
    else:
        args, line = ["loss=bogus"], f"loss=bogus: no such option in config group loss; allowed: {LOSS_OPTIONS}"
    out = warm.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                   timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 2
    assert out.stderr.strip() == f"{module.split('.')[1]}: {line}"


def test_a_key_added_with_plus_is_a_typo_not_a_silent_no_op(tmp_path):
    out = cli(["+train.max_step=100", f"paths.root_dir={tmp_path}"])
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[0] == (
        "ConfigError: +train.max_step=100: train.max_step is not a setting of this configuration, so nothing would "
        "read it (a typo?); set an existing key without '+'")
    assert list(tmp_path.iterdir()) == []
    out = cli(["+trian.max_steps=100", f"paths.root_dir={tmp_path}"])  # a section that does not exist: trained
    assert out.returncode == 1  # the default run before, with the key read by nothing
    assert out.stderr.strip().splitlines()[0] == (
        "ConfigError: +trian.max_steps=100: trian is not a section of this configuration, so nothing would read it "
        "(a typo of train?); the sections: loss, model, data, sampler, optim, train, trainer, eval, logger, paths")
    assert list(tmp_path.iterdir()) == []


def test_jobs_that_failed_alike_are_one_line_of_the_summary():
    """The paper grid without its data printed 244 lines (a refusal and a summary line per job) for two causes."""
    from src.launch.failures import grouped

    cc12m = [("cc12m/rf", "ValueError: other"), ("cc12m/edm", "ConfigError: no cc12m"),
             ("cc12m/eps", "ConfigError: no cc12m")]
    failures = [(f"imagenet/r{i}", "ConfigError: no imagenet") for i in range(5)] + cc12m
    assert grouped(failures) == ["5 jobs (imagenet/r0, imagenet/r1, imagenet/r2 and 2 more): ConfigError: no imagenet",
                                 "cc12m/rf: ValueError: other", "2 jobs (cc12m/edm, cc12m/eps): ConfigError: no cc12m"]
    assert grouped([("a", "E: x")]) == ["a: E: x"] and grouped([]) == []


def test_a_group_of_failed_jobs_names_up_to_three_and_counts_only_those_it_leaves_out():
    from src.launch.failures import grouped

    jobs = [(f"d/r{i}", "E: x") for i in range(4)]
    assert grouped(jobs[:3]) == ["3 jobs (d/r0, d/r1, d/r2): E: x"]  # all three named: no "and 0 more"
    assert grouped(jobs) == ["4 jobs (d/r0, d/r1, d/r2 and 1 more): E: x"]


def test_sweep_with_config_errors_launches_none_of_them(tmp_path):
    """Every job is checked before the first is launched: invalid jobs get no directory, the data are not built."""
    out = cli(["-m", f"paths.root_dir={tmp_path}", "sweep_name=bad", "loss=rf_lognorm", "loss.s=-1,-2",
               "model.num_heads=3"])
    assert out.returncode == 1
    assert "2 job(s) failed:" in out.stderr
    assert "digits/loss=rf_lognorm,loss.s=-1: ConfigError: loss: rf_lognorm: s=-1 is not allowed" in out.stderr
    assert not (tmp_path / "outputs").exists()  # refused whole: no sweep directory, no multirun.yaml, no failures.json
    assert not (tmp_path / ".cache").exists()
    # Hydra's own default run directory, the job's number, is set only at launch (and names a run by its place in
    # the sweep): refused in one line for the jobs refused alike, not a traceback.
    out = cli(["-m", f"paths.root_dir={tmp_path}", "loss=rf,edm", "hydra.sweep.subdir=${hydra.job.num}"])
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.count("ConfigError: hydra.sweep.subdir=${hydra.job.num}: does not resolve before the job is "
                            "launched") == 1
    assert "2 job(s) failed:\n  2 jobs (digits/rf, digits/edm_-1.20_1.20): ConfigError: hydra.sweep.subdir=" in \
        out.stderr
    assert not (tmp_path / "outputs").exists()


def test_the_loss_config_is_parsed_once_per_distinct_config():
    first = parse_loss({"family": "rf_lognorm", "m": 0.0, "s": 1.0})
    assert parse_loss({"s": 1.0, "family": "rf_lognorm", "m": 0.0}) is first  # cached: one parse
    with pytest.raises(ConfigError, match="^loss: "):
        parse_loss({"family": "rf_mode", "s": 2.5})
    # A tuple compares True == 1.0: `-m loss.s=1.0,true` took 1.0's parse for true, which alone is refused.
    assert parse_loss({"family": "rf_mode", "s": 1.0}).slug
    with pytest.raises(ConfigError, match=r"^loss: rf_mode: s=True must be a finite real number"):
        parse_loss({"family": "rf_mode", "s": True})


def test_embedded_shapes_known_before_building_match_the_shards(cache_dir):
    """check_model builds the backbone for the shapes the embedded data will have, before they exist."""
    from src.data.shards import read_meta
    from src.training.prepare import DIM_KEYS, embedded_shapes

    meta = read_meta(next((Path(cache_dir) / "data").glob("digits-v*")) / "train")
    assert embedded_shapes("digits", 16) == {k: meta[k] for k in (*DIM_KEYS, "context_length")}


def test_a_context_split_past_the_data_context_is_refused_before_the_run():
    """model=mmdit3 model.context_split=20 on 16 context tokens: refused by the checks before any file is written,
    not a ValueError at the first training step (with a run directory and error.json)."""
    from hydra import compose, initialize_config_module

    from src.config import register_resolvers
    from src.training.prepare import check_model, embedded_shapes

    register_resolvers()
    shapes = embedded_shapes("digits", 16)
    for split in (15, 16, 20):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=["model=mmdit3", f"model.context_split={split}"])
        if split < shapes["context_length"]:
            check_model(cfg, shapes)
            continue
        with pytest.raises(ConfigError, match=re.escape(f"model.context_split={split} is not allowed; allowed: 1 to "
                                                        "15 (the data's context has 16 tokens")):
            check_model(cfg, shapes)


# ---- checkpoints: the previous last.ckpt kept, a corrupt one falls back ----------------------------------------
def test_previous_last_checkpoint_is_kept_and_an_unreadable_one_falls_back(tmp_path, caplog):
    from src.training.checkpoint_io import AtomicCheckpointIO, checkpoint_to_resume

    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.prev.ckpt").exists()
    io.save_checkpoint({"global_step": 2}, tmp_path / "last.ckpt")
    assert ckpt_step(tmp_path / "last.prev.ckpt") == 1 and ckpt_step(tmp_path / "last.ckpt") == 2
    assert checkpoint_to_resume(tmp_path) == tmp_path / "last.ckpt"

    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    assert checkpoint_to_resume(tmp_path, repair=False) == tmp_path / "last.prev.ckpt"
    with caplog.at_level(logging.WARNING):
        assert checkpoint_to_resume(tmp_path) == tmp_path / "last.ckpt"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and f"{tmp_path / 'last.ckpt'} is unreadable" in warning[0]
    assert "last.prev.ckpt" in warning[0] and "\n" not in warning[0]
    assert ckpt_step(tmp_path / "last.ckpt") == 1  # the previous one took its place

    (tmp_path / "last.prev.ckpt").write_bytes(b"")
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="no readable last.prev.ckpt"):
        checkpoint_to_resume(tmp_path)


def test_only_last_ckpt_keeps_a_previous_one_and_a_repair_keeps_it_too(tmp_path):
    """Saving best.ckpt (or any other checkpoint) leaves last.prev.ckpt alone: it is last.ckpt's fallback, not
    whatever file was saved before. A repaired last.ckpt is a copy of the previous one, which stays, so a second
    damage of last.ckpt before the next save still finds it."""
    from src.training.checkpoint_io import AtomicCheckpointIO, checkpoint_to_resume

    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, tmp_path / "last.ckpt")
    io.save_checkpoint({"global_step": 2}, tmp_path / "last.ckpt")
    io.save_checkpoint({"global_step": 7}, tmp_path / "best.ckpt")
    io.save_checkpoint({"global_step": 8}, tmp_path / "best.ckpt")
    assert ckpt_step(tmp_path / "last.prev.ckpt") == 1 and ckpt_step(tmp_path / "best.ckpt") == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt", "last.prev.ckpt"]
    (tmp_path / "last.ckpt").write_bytes(b"damaged")
    assert checkpoint_to_resume(tmp_path) == tmp_path / "last.ckpt" and ckpt_step(tmp_path / "last.ckpt") == 1
    (tmp_path / "last.ckpt").write_bytes(b"damaged again")
    assert checkpoint_to_resume(tmp_path, repair=False) == tmp_path / "last.prev.ckpt"
    assert ckpt_step(tmp_path / "last.prev.ckpt") == 1


def test_checkpoints_are_loaded_as_weights_only(tmp_path):
    """A checkpoint is unpickled with weights_only=True: one holding any other object is refused, not run."""
    import datetime
    import pickle

    from src.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    assert io.load_checkpoint(tmp_path / "last.ckpt")["global_step"] == 3
    torch.save({"global_step": 3, "when": datetime.date(2026, 1, 1)}, tmp_path / "other.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        io.load_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        io.load_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.slow
def test_killed_run_with_a_truncated_last_checkpoint_resumes_from_the_previous_one(tmp_path, cache_dir):
    """kill -9 mid-training, last.ckpt truncated, rerun: the warning names the file, the run resumes from
    last.prev.ckpt and ends with the weights and the training curve of an uninterrupted run."""
    reference = cli([*LONG, f"paths.root_dir={tmp_path / 'ref'}", f"paths.cache_dir={cache_dir}"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    ref_run = tmp_path / "ref/outputs/runs/digits/rf_lognorm_0.00_1.00"

    args = [*LONG, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    run = tmp_path / "outputs/runs/digits/rf_lognorm_0.00_1.00"
    log_path = tmp_path / "first.log"
    proc = popen(args, log_path)
    wait_for(lambda: (run / "checkpoints/last.prev.ckpt").is_file(), proc, log_path)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    last = run / "checkpoints/last.ckpt"
    killed_at = ckpt_step(last)
    previous = ckpt_step(run / "checkpoints/last.prev.ckpt")
    assert 0 < previous < killed_at < 300
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])

    second = cli(args)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert f"{last} is unreadable" in output and "resuming from the previous checkpoint" in output
    assert ckpt_step(last) == 300
    ref_weights, weights = backbone_weights(ref_run / "checkpoints/last.ckpt"), backbone_weights(last)
    assert ref_weights.keys() == weights.keys()
    assert all(torch.equal(ref_weights[k], weights[k]) for k in weights)

    # The training curve: every step the uninterrupted run logged, with the same values.
    from src.training.metrics_log import read_metrics

    ref_log, log = read_metrics(ref_run), read_metrics(run)
    ref_loss = ref_log.dropna(subset=["train/loss"]).set_index("step")["train/loss"]
    loss = log.dropna(subset=["train/loss"]).set_index("step")["train/loss"]
    assert len(ref_loss) == 300 and list(loss.index) == list(ref_loss.index)
    pd.testing.assert_series_equal(loss, ref_loss)
    raw = pd.read_csv(run / "csv/metrics.csv")
    assert set(raw["attempt"]) == {0, 1} and (raw["step"] < previous).any()  # the first attempt's rows kept


def test_read_metrics_joins_attempts():
    """Values a later attempt logged again replace the earlier ones at that step; other rows are kept."""
    from src.training.metrics_log import read_metrics

    rows = pd.DataFrame([
        {"attempt": 0, "step": 0, "train/loss": 1.0}, {"attempt": 0, "step": 1, "train/loss": 0.9},
        {"attempt": 0, "step": 2, "train/loss": 0.8}, {"attempt": 0, "step": 2, "val/loss": 0.7},
        {"attempt": 1, "step": 2, "train/loss": 0.8}, {"attempt": 1, "step": 3, "train/loss": 0.6},
        {"attempt": 2, "step": 3, "eval/fid": 0.1},  # an evaluation-only rerun
    ])
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rows.to_csv(Path(d) / "metrics.csv", index=False)
        log = read_metrics(Path(d) / "metrics.csv")
    assert list(log.dropna(subset=["train/loss"])["step"]) == [0, 1, 2, 3]
    assert list(log.dropna(subset=["train/loss"])["attempt"]) == [0, 0, 1, 1]
    assert log.dropna(subset=["val/loss"])["step"].tolist() == [2]
    assert log.dropna(subset=["eval/fid"])["step"].tolist() == [3]


def test_metrics_csv_after_a_row_cut_short_by_a_kill(tmp_path):
    """kill -9 during an append leaves a row without its newline: the resumed attempt's rows start on a line of
    their own (the cut row is dropped), so read_metrics still reads the file."""
    from src.training.metrics_log import ResumableCSVLogger, read_metrics

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv/metrics.csv").write_text("attempt,epoch,step,train/loss\n0,0,0,0.9\n0,0,1,0.8\n0,0,2,0.7")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"train/loss": 0.75}, step=2)
    logger.save()
    log = read_metrics(tmp_path)
    assert log[["step", "attempt", "train/loss"]].values.tolist() == [[0, 0, 0.9], [1, 0, 0.8], [2, 1, 0.75]]


def test_metrics_csv_rewrite_for_a_new_column_is_atomic(tmp_path, monkeypatch):
    """A new column (the evaluation's metrics after training) rewrites metrics.csv: a write that fails (or is killed)
    half-way leaves the earlier rows, not a truncated file."""
    import csv

    from src.training.metrics_log import ResumableCSVLogger

    (tmp_path / "csv").mkdir()
    before = "attempt,epoch,step,train/loss\n0,0,0,0.9\n0,0,1,0.8\n"
    (tmp_path / "csv/metrics.csv").write_text(before)
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.log_metrics({"eval/fid": 3.0}, step=1)

    def killed(self, rows):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    assert (tmp_path / "csv/metrics.csv").read_text() == before


# ---- temp files of interrupted writes -------------------------------------------------------------------------
KILLED_WRITE = """
import os, signal, sys
from src.training.checkpoint_io import AtomicCheckpointIO
import torch
real_save = torch.save
def save_then_die(obj, f):
    f.write(b"half a checkpoint"); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
AtomicCheckpointIO().save_checkpoint({"global_step": 1}, sys.argv[1])
"""


def test_temp_files_of_an_interrupted_write_are_removed_on_restart(tmp_path, cache_dir):
    from src.training.job import run_job
    from src.utils.io import is_temp_name

    run = tmp_path / "run"
    # A real kill -9 in the middle of a checkpoint write leaves its temp file...
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(run / "checkpoints/last.ckpt")], cwd=ROOT)
    assert killed.returncode == -signal.SIGKILL
    left = [p for p in (run / "checkpoints").iterdir() if is_temp_name(p.name)]
    assert len(left) == 1 and not (run / "checkpoints/last.ckpt").exists()
    # ... and so would one during an .npz write (uuid-style name); a file that is not a temp file stays.
    (run / "eval").mkdir()
    (run / "eval" / f".x.npz.{'a' * 32}.tmp").write_bytes(b"partial")
    (run / "eval" / "notes.tmp").write_text("mine")

    cfg = compose_cfg([*TINY, "eval.enabled=false", f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    assert run_job(cfg, run)["global_step"] == 4
    assert not [p for p in run.rglob("*") if is_temp_name(p.name)]
    assert (run / "eval/notes.tmp").read_text() == "mine"


# ---- Ctrl-C --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_saves_a_checkpoint_exits_non_zero_and_the_rerun_resumes(tmp_path, cache_dir):
    args = [*LONG, "train.ckpt_every=1000", f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}"]
    run = tmp_path / "outputs/runs/digits/rf_lognorm_0.00_1.00"
    log_path = tmp_path / "first.log"
    proc = popen(args, log_path)

    def training() -> bool:  # a few logged steps: the loop is running
        path = run / "csv/metrics.csv"
        return path.is_file() and len(path.read_text().splitlines()) > 3

    wait_for(training, proc, log_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    out = log_path.read_text()
    assert "caught SIGINT" in out and "checkpoint on SIGINT at step" in out
    step = ckpt_step(run / "checkpoints/last.ckpt")  # no periodic checkpoint was due (ckpt_every=1000)
    assert f"checkpoint on SIGINT at step {step}:" in out and 0 < step < 300
    assert "; rerun the command to resume" in out  # a single run said nothing of the way on
    assert not (run / "error.json").exists()  # interrupted, not failed

    second = cli([*args, "verbose=true"])  # Lightning's restore line is library chatter: shown when verbose
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restored all states from the checkpoint" in second.stdout + second.stderr
    assert ckpt_step(run / "checkpoints/last.ckpt") == 300


@pytest.mark.slow
def test_sigterm_in_a_sweep_saves_stops_non_zero_and_the_rerun_resumes(tmp_path, cache_dir):
    """`kill` (SIGTERM) of a multirun during training: last.ckpt at that step, the job says it stopped, the command
    exits 143 (a stop, not a finished sweep), and the same command resumes."""
    args = ["-m", *LONG, "train.ckpt_every=1000", f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
            "sweep_name=term", "loss=rf_lognorm"]
    run = tmp_path / "outputs/multirun/term/digits/rf_lognorm_0.00_1.00"
    log_path = tmp_path / "first.log"
    proc = popen(args, log_path)
    wait_for(lambda: (run / "csv/metrics.csv").is_file()
             and len((run / "csv/metrics.csv").read_text().splitlines()) > 3, proc, log_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    out = log_path.read_text()
    step = ckpt_step(run / "checkpoints/last.ckpt")
    assert 0 < step < 300 and f"checkpoint on SIGTERM at step {step}:" in (run / "run.log").read_text()
    assert "stopped after" in out and "rerun the command to resume" in out
    assert out.rstrip().endswith("stopped on SIGTERM (last.ckpt saved); rerun the command to resume"), out[-2000:]
    assert not (run / "error.json").exists()  # interrupted, not failed
    second = cli(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ckpt_step(run / "checkpoints/last.ckpt") == 300


def test_valid_trainer_and_strategy_settings_pass_the_checks():
    """What Lightning accepts is not refused: device indices, precision aliases, arguments of an instantiated
    strategy added with `+`; a precision alias fingerprints as the name it stands for."""
    from src.config import fingerprint
    from src.launch.validate import config_error
    from src.training.prepare import check_choices

    for overrides in (["trainer.devices=[0,1]"], ["trainer.devices='0,1'"], ["trainer.devices=auto"],
                      ["trainer.devices=-1"], ["trainer.precision=16"], ["trainer.precision=transformer-engine"]):
        check_choices(compose_cfg(overrides))
    for bad in (["trainer.devices=[]"], ["trainer.devices='a,b'"], ["trainer.num_nodes=0"]):
        with pytest.raises(ConfigError, match=bad[0].split("=")[0]):
            check_choices(compose_cfg(bad))
    added = ["trainer=fsdp", "+trainer.strategy.cpu_offload=true"]
    assert config_error(compose_cfg(added), added) is None
    error = config_error(compose_cfg(["+trainer.gradient_clip=1.0"]), ["+trainer.gradient_clip=1.0"])
    assert error is not None and "trainer.gradient_clip is not a setting" in str(error)
    assert fingerprint(compose_cfg(["trainer.precision=16"]))["trainer"]["precision"] == "16-mixed"
    assert fingerprint(compose_cfg(["trainer.precision=bf16"]))["trainer"]["precision"] == "bf16-mixed"
    assert fingerprint(compose_cfg([]))["trainer"]["precision"] is None


def test_added_keys_that_stay_allowed_are_not_refused():
    """`++key` (add or override), `+sweep=NAME` (a config group) and keys added under hydra are meant: only a `+key`
    under one of the configuration's own sections is read as a typo."""
    from src.launch.validate import check_added_keys

    check_added_keys(["++train.max_step=1", "+sweep=table1", "+hydra.job.env_set.X=1"])
    with pytest.raises(ConfigError, match=r"^\+train.max_step=1: train.max_step is not a setting"):
        check_added_keys(["+train.max_step=1"])


def test_a_top_level_key_added_with_plus_is_a_typo_not_a_silent_no_op():
    """`+torch_thread=1` (no section) added a key that nothing reads, and the run trained with torch's default."""
    from src.launch.validate import config_error

    overrides = ["+torch_thread=1"]
    error = config_error(compose_cfg(overrides), overrides)
    assert str(error) == ("+torch_thread=1: torch_thread is not a setting of this configuration, so nothing would "
                          "read it (a typo of torch_threads?); set an existing key without '+'")
    assert config_error(compose_cfg(["+sweep=smoke"]), ["+sweep=smoke"]) is None  # a config group adds no key
    # A key of its own that an interpolation reads is a setting: a run name's tag, or an oc.select with a default.
    for overrides in (["+tag=a", "run_name=${data.name}/${tag}"], ["+tag=a", "run_name=x${oc.select:tag,''}"]):
        assert config_error(compose_cfg(overrides), overrides) is None


def test_run_names_that_hydra_reads_as_numbers_name_folders():
    """`-m run_name=0.5,1.0` names folders 0.5 and 1.0 (Hydra's sweep subdir is their text): an int was taken, a float
    was refused as "must name a folder"."""
    from src.launch.validate import config_error

    for overrides in (["run_name=7"], ["run_name=0.5"]):
        assert config_error(compose_cfg(overrides), overrides) is None, overrides


def test_a_job_without_a_run_name_is_named_by_its_dataset_and_recipe_overrides():
    """An invalid recipe forms no run name: the summary names the job by its dataset and loss overrides (with its run
    tag), or by all its overrides when it sets no loss."""
    from omegaconf import OmegaConf

    from src.launch.validate import job_name

    cfg = OmegaConf.create({"run_name": "${no_such_key}", "data": {"name": "digits"}})
    assert job_name(cfg, ["loss=bogus", "optim.lr=1", "run_tag='/optim.lr=1'"]) == "digits/loss=bogus/optim.lr=1"
    assert job_name(cfg, ["loss=bogus", "+loss.s=2"]) == "digits/loss=bogus,+loss.s=2"
    assert job_name(cfg, ["optim.lr=1", "seed=2"]) == "optim.lr=1 seed=2"


def test_a_launch_without_gpus_per_node_still_knows_a_precision_that_is_set():
    """trainer.precision set is what every job trains at, wherever it runs: a relaunch into a run trained at another
    precision is refused before submitting, not left to each job."""
    from omegaconf import OmegaConf

    from src.launch.validate import launch_precision

    cfg = OmegaConf.create({"trainer": {"precision": "16-mixed", "accelerator": "gpu"},
                            "hydra": {"launcher": {"gpus_per_node": 0}}})
    assert launch_precision(cfg) == "16-mixed"
    cfg.trainer.precision = None
    assert launch_precision(cfg) is None  # no GPUs asked for (a partition may give them by default): the job checks
    # GPUs asked for in sbatch's other ways: null is bf16-mixed there, judged before launching.
    for launcher in ({"gres": "gpu:a100:4"}, {"gpus_per_task": 1}, {"additional_parameters": {"gres": "gpu:8"}},
                     {"additional_parameters": {"gpus": 8}}, {"additional_parameters": {"gpus-per-node": "4"}},
                     {"gres": "tmpdisk:10,gpu:2"}):
        cfg.hydra.launcher = {"gpus_per_node": 0, **launcher}
        assert launch_precision(cfg) == "bf16-mixed", launcher
    for launcher in ({"gres": "tmpdisk:10"}, {"gpus_per_task": None}, {"additional_parameters": {"requeue": True}}):
        cfg.hydra.launcher = {"gpus_per_node": 0, **launcher}
        assert launch_precision(cfg) is None, launcher


def test_a_sweeps_invalid_jobs_are_recorded_before_launching_and_fail_fast_launches_none(tmp_path, monkeypatch):
    """The sweeper's check of every job: the valid ones are kept (and planned, a job given twice once), the invalid
    ones go to the summary and to failures.json (a job without a run name marked nameless, replacing an earlier
    launch's nameless ones); under fail_fast a configuration error launches nothing, and a sweep refused whole
    writes nothing."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from src.launch import failures, validate

    class Loader:  # a job's configuration: its seed; seed=9 forms no run name (an invalid recipe)
        def load_sweep_config(self, sweep_config, overrides):
            seed = int(overrides[0].split("=")[1])
            return OmegaConf.create({"run_name": "${no_such_key}" if seed == 9 else f"r{seed}", "seed": seed,
                                     "hydra": {"sweep": {"dir": sweep_config.hydra.sweep.dir, "subdir": f"r{seed}"}}})

    monkeypatch.setattr(validate.HydraConfig, "instance", lambda: SimpleNamespace(cfg=None, set_config=lambda c: None))
    monkeypatch.setattr(validate, "config_error",
                        lambda cfg, overrides, multirun: ConfigError("seed: too big") if cfg.seed >= 5 else None)
    monkeypatch.setattr(validate, "refused_by_run_dir", lambda cfg: None)
    monkeypatch.setattr(failures, "FAILED", [])

    def check(sweep_dir, seeds, fail_fast=False):
        sweep = OmegaConf.create({"fail_fast": fail_fast, "hydra": {"sweep": {"dir": str(sweep_dir)}}})
        planned = {}
        return validate.check_sweep_jobs(Loader(), sweep, [[[f"seed={s}"] for s in seeds]], planned), planned

    failures.record_sweep_failure(tmp_path / "a", "loss=gone", "ConfigError: an earlier launch's", nameless=True)
    kept, planned = check(tmp_path / "a", [0, 5, 9, 0])  # seed=0 twice: one run, launched once
    assert kept == [[["seed=0"]]] and planned == {"r0": {"run_dir": "r0", "overrides": ["seed=0"]}}
    assert failures.FAILED == [("r5", "ConfigError: seed: too big"), ("seed=9", "ConfigError: seed: too big")]
    recorded = failures.read_sweep_failures(tmp_path / "a")
    assert sorted(recorded) == ["r5", "seed=9"] and recorded["seed=9"]["nameless"] and "nameless" not in recorded["r5"]
    assert check(tmp_path / "b", [0, 5], fail_fast=True)[0] == []
    assert check(tmp_path / "c", [5, 6])[0] == []
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_hydra_errors_in_one_line_for_a_top_level_key_an_invalid_key_and_a_config_with_no_options():
    """A typo of a top-level key names the configuration's own settings; a key Hydra refuses as a key is "no such
    setting", not a bad value; a missing config without options is said in Hydra's words (no empty "allowed:")."""
    from hydra.errors import CompactHydraException, ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, KeyValidationError

    from src.launch.validate import hydra_error_line

    def composition(cause, key, parent=None):
        cause.full_key, cause.parent_node = key, parent
        error = ConfigCompositionException("composition failed")
        error.__cause__ = cause
        return error

    assert hydra_error_line(composition(ConfigKeyError("missing"), "trian", OmegaConf.create({"a": 1, "b": 2}))) == \
        "trian: no such setting (a typo?); the settings of the configuration: a, b"
    assert hydra_error_line(composition(KeyValidationError("bad key"), "data.x")) == "data.x: no such setting (a typo?)"
    missing = MissingConfigException("Cannot find primary config 'nope'", missing_cfg_file="nope", options=[])
    assert hydra_error_line(missing) == "Cannot find primary config 'nope'"
    assert hydra_error_line(CompactHydraException(" \n")) is None


def test_ctrl_c_outside_training_is_one_line_and_status_1(tmp_path, monkeypatch, capsys):
    """Ctrl-C in an evaluation-only job (a relaunch with another evaluation setting, a reused training) is not inside
    Lightning's fit, which exits 1 itself: the command says so in one line with status 1, not a traceback."""
    from src import run

    def main():
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "main", main)
    monkeypatch.setattr(run, "FAILED", [])
    monkeypatch.setattr(sys, "argv", ["src/run.py", f"paths.root_dir={tmp_path}"])
    try:
        status = run.cli()
    except KeyboardInterrupt:  # what the command ended with: a traceback, the process killed by SIGINT
        status = "KeyboardInterrupt"
    assert status == 1
    assert capsys.readouterr().err == "interrupted (Ctrl-C); rerun the command to resume\n"
