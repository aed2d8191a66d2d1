"""Data parallel training on the CPU: two ranks (gloo) follow the one-process run step for step.

The global batch of every step and its times, noise and dropout are one draw, sliced per rank (datamodule, module),
in memory and streaming from the shard files alike,
and DDP averages the ranks' gradients of their slice means, which is the gradient of the global mean. So the runs
differ only by float summation order. Tolerance after 8 AdamW steps: relative 1e-6 on the validation losses (the
loss curve: validated after every step), absolute 1e-6 + relative 1e-5 on the weights. Measured on CPU: identical
validation losses, weights at most 3e-8 apart.
"""

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from src.config import register_resolvers
from src.training.datamodule import StepIndexedBatches
from src.training.job import run_job

register_resolvers()

TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "logger=csv", "trainer.enable_progress_bar=false", "eval.enabled=false", "trainer.accelerator=cpu",
    "train.max_steps=8", "train.val_every=1", "train.ckpt_every=4", "optim.warmup_steps=1",
]


def test_ranks_take_disjoint_slices_of_one_global_batch():
    data = {"x0": torch.arange(100).float()[:, None], "context": torch.zeros(100, 1), "pooled": torch.zeros(100, 1)}
    whole = [next(iter(StepIndexedBatches(data, 16, seed=3, start_step=s)))["x0"] for s in range(3)]
    for step in range(3):
        parts = [next(iter(StepIndexedBatches(data, 16, 3, step, rank=r, world=2)))["x0"] for r in range(2)]
        assert parts[0].shape[0] == parts[1].shape[0] == 8
        assert torch.equal(torch.cat(parts), whole[step])  # rank r gets rows r*8 .. r*8+7 of the global batch
        assert not torch.equal(parts[0], parts[1])


@pytest.mark.slow
@pytest.mark.parametrize("data", [[], ["data.in_memory=false", "data.num_workers=2"]], ids=["in_memory", "streaming"])
def test_two_ranks_match_one_process(tmp_path, data):
    """In memory, and streaming from the shard files with two loader workers per rank."""
    def run(name, overrides):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*TINY, f"paths.root_dir={tmp_path}",
                                                          f"paths.cache_dir={tmp_path / 'cache'}", *overrides])
        run_job(cfg, tmp_path / name)
        log = pd.read_csv(tmp_path / name / "csv" / "metrics.csv")
        val = log.dropna(subset=["val/loss_mean"]).set_index("step")[["val/loss_mean", "val_ema/loss_mean"]]
        state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return val, state

    one_val, one = run("one", ["trainer.devices=1", *data])
    # ddp_spawn: the ranks are processes started by this one (never Lightning's re-launch of the command line).
    two_val, two = run("two", ["trainer.devices=2", "trainer.strategy=ddp_spawn", *data])
    assert one["global_step"] == two["global_step"] == 8
    assert len(one_val) == 8  # the validation loss after every step: the loss curve
    pd.testing.assert_frame_equal(one_val, two_val, rtol=1e-6, atol=0)
    assert one_val["val/loss_mean"].iloc[-1] < one_val["val/loss_mean"].iloc[0]  # it trained
    a, b = one["state_dict"], two["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# ---- several nodes: the trainer takes its shape and its rank from the launcher's environment ----------------------
SLURM_2x4_RANK5 = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "5",
                   "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "run", "SLURM_JOB_ID": "42",
                   "SLURM_NODELIST": "gpu[01-02]"}
TORCHRUN_2x4_RANK5 = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "GROUP_WORLD_SIZE": "2", "RANK": "5",
                      "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu01",
                      "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env", [SLURM_2x4_RANK5, TORCHRUN_2x4_RANK5], ids=["slurm", "torchrun"])
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_two_node_job_gets_its_shape_and_rank_from_the_launcher(monkeypatch, tmp_path, env, trainer):
    """Two nodes x four ranks, this process rank 5: what trainer=ddp/fsdp make of SLURM's or torchrun's variables."""
    from src.training.job import build_trainer

    for key in [*SLURM_2x4_RANK5, *TORCHRUN_2x4_RANK5]:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer={trainer}", "trainer.accelerator=cpu"])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    trainer_ = build_trainer(cfg, tmp_path, callbacks=[], loggers=[])
    assert trainer_.world_size == 8 and trainer_.num_nodes == 2 and trainer_.num_devices == 4
    assert (trainer_.global_rank, trainer_.local_rank, trainer_.node_rank) == (5, 1, 1)
    # The launcher started every rank: Lightning starts none itself.
    assert trainer_.strategy.cluster_environment.creates_processes_externally


@pytest.mark.slow
def test_single_run_relaunched_by_lightning_matches_one_process(tmp_path):
    """`python -m src.run trainer=ddp trainer.devices=2` outside SLURM: Lightning re-launches the command for rank 1,
    which shares rank 0's run directory (not refused by its lock) and trains with it; weights as one process's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        env.pop(key, None)

    def run(name, *extra):
        args = [*TINY, f"paths.root_dir={tmp_path / name}", f"paths.cache_dir={tmp_path / 'cache'}",
                "verbose=true", *extra]  # Lightning's "Starting with 2 processes" is an INFO line
        out = subprocess.run([sys.executable, "-m", "src.run", *args], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        ckpt = tmp_path / name / "outputs/runs/digits/rf_lognorm_0.00_1.00/checkpoints/last.ckpt"
        return out.stdout + out.stderr, torch.load(ckpt, map_location="cpu", weights_only=True)

    _, one = run("one")
    log, two = run("two", "trainer=ddp", "trainer.devices=2")
    assert log.count("Starting with 2 processes") >= 1 and "RunDirBusy" not in log
    assert one["global_step"] == two["global_step"] == 8
    for k in one["state_dict"]:
        torch.testing.assert_close(one["state_dict"][k], two["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)
