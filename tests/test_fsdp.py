"""FSDP (trainer=fsdp) on the CPU over gloo: sharded training, EMA on shards, full checkpoints, resume, evaluation.

The slow tests launch the documented command, `torchrun --nproc_per_node 2 -m src.run trainer=fsdp ...`, and compare
it with one process: as under DDP (tests/test_ddp.py) the ranks see one global draw per step, so the runs differ
only by float summation order. Tolerance: absolute 1e-6 + relative 1e-5 on weights and EMA weights, 1e-4 of each
tensor's largest entry on AdamW's moments (measured after 8 steps: weights 3e-8 apart, moments 6e-7).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.config import ConfigError, register_resolvers
from src.launch.checks import check_launch
from src.evaluation.run import unsharded_backbone
from src.launch.strategies import FSDPStrategy, backbone_wrap_policy, build_strategy
from src.models import BACKBONES
from src.training.ema import ema_update, make_ema_copy

register_resolvers()
ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if "_d" not in p.stem)
DATA = dict(latent_channels=1, latent_size=8, context_dim=16, pooled_dim=16)


def model_cfg(name: str):
    with initialize_config_module(config_module="conf", version_base="1.3"):  # defaults: model/base/backbone.yaml
        model = compose(config_name=f"model/{name}").model
    cfg = OmegaConf.create({"data": DATA, "model": model})
    cfg.model.depth, cfg.model.hidden_size = 2, 32
    return cfg.model


def model_inputs(n=3):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g),
            torch.randn(n, 12, 16, generator=g), torch.randn(n, 16, generator=g))


@pytest.mark.parametrize("name", MODELS)
def test_evaluation_backbone_is_built_from_the_config_and_holds_the_checkpoint(name):
    """The evaluation never copies the trained module (a sharded wrapper under FSDP): it builds the architecture."""
    torch.manual_seed(0)
    trained = instantiate(model_cfg(name))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))  # no zero-initialised output hides a missing weight
    fresh = unsharded_backbone(model_cfg(name), torch.device("cpu"))
    assert type(fresh) is BACKBONES[name]
    assert not any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()])
    fresh.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*model_inputs()), trained.eval()(*model_inputs()))


def test_fsdp_strategy_is_accepted_on_the_cpu():
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer=fsdp"])
    strategy = build_strategy(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False)
    assert trainer.strategy is strategy and trainer.strategy.root_device.type == "cpu"


@pytest.mark.parametrize("override, message", [
    ("trainer.strategy.sharding_strategy=ZERO9", "trainer.strategy.sharding_strategy=ZERO9: allowed: FULL_SHARD"),
    ("trainer.strategy.state_dict_type=sharded", "trainer.strategy.state_dict_type=sharded: allowed: full"),
    ("trainer.strategy.use_orig_params=false", "trainer.strategy.use_orig_params=False: allowed: true"),
])
def test_fsdp_settings_outside_the_tested_ones_are_refused(override, message):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        good = compose(config_name="config", overrides=["trainer=fsdp"])
        bad = compose(config_name="config", overrides=["trainer=fsdp", override])
    check_launch(good, multirun=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_launch(bad, multirun=False)


# ---- the EMA update on shards, two processes ---------------------------------------------------------------------
class Pair(torch.nn.Module):
    """The two backbones of FormulationModule, as FSDP wraps them."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.ema_backbone = make_ema_copy(backbone)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_ema_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pair = Pair(instantiate(model_cfg("mmdit")))
    with torch.no_grad():
        for p in pair.backbone.parameters():
            p.add_(torch.randn_like(p))  # the trained weights moved away from the EMA copy
    total = sum(p.numel() for p in pair.backbone.parameters())
    wrapped = FSDP(pair, auto_wrap_policy=backbone_wrap_policy(), use_orig_params=True, device_id=torch.device("cpu"))
    assert isinstance(wrapped.backbone, FSDP) and isinstance(wrapped.ema_backbone, FSDP)
    local = sum(p.numel() for p in wrapped.backbone.parameters())  # this rank's shard of the flat parameters
    for _ in range(3):
        ema_update(wrapped.ema_backbone, wrapped.backbone, 0.9)
    cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, cfg):
        state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    if rank == 0:
        torch.save({"state": state, "local": local, "total": total}, out)
    dist.destroy_process_group()


def test_ema_update_on_shards_equals_the_unsharded_update(tmp_path):
    out = tmp_path / "sharded.pt"
    mp.start_processes(_sharded_ema_worker, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    assert got["local"] < got["total"]  # each rank held a shard, not a replica

    torch.manual_seed(0)
    pair = Pair(instantiate(model_cfg("mmdit")))
    with torch.no_grad():
        for p in pair.backbone.parameters():
            p.add_(torch.randn_like(p))
    for _ in range(3):
        ema_update(pair.ema_backbone, pair.backbone, 0.9)
    want = pair.state_dict()
    assert got["state"].keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=1e-6, msg=k)
    # The update did something: the EMA copy is now between its start and the trained weights.
    assert all(not torch.equal(want[k], want["ema_" + k]) for k in want if k.startswith("backbone.") and "weight" in k)


# ---- the documented command, two ranks ---------------------------------------------------------------------------
TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "logger=csv", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "torch_threads=1",
    "train.max_steps=12", "train.val_every=4", "train.ckpt_every=4", "train.ema_every=2", "optim.warmup_steps=1",
    "eval.n_samples=4", "eval.batch_size=4", "eval.settings=[{steps: 2, cfg: 1.0}]",
]
RUN = Path("outputs/runs/digits/rf_lognorm_0.00_1.00")


def run_command(prefix: list[str], root: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    # verbose=true: Lightning's INFO lines ("Starting with 2 processes", "Restored all states") reach the console
    args = [*prefix, *TINY, f"paths.root_dir={root}", f"paths.cache_dir={cache}", "verbose=true", *extra]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), *args]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("one")
    out = run_command([sys.executable, "-m", "src.run"], root, cache)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / RUN


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("fsdp")
    out = run_command(torchrun("-m", "src.run", "trainer=fsdp"), root, cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Starting with 2 processes" in out.stdout + out.stderr
    return root / RUN


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def val_curve(run_dir: Path) -> pd.DataFrame:
    log = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return log.dropna(subset=["val/loss_mean"]).set_index("step")[["val/loss_mean", "val_ema/loss_mean"]]


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process(one_process, fsdp):
    a, b = checkpoint(one_process), checkpoint(fsdp)
    assert a["global_step"] == b["global_step"] == 12
    # A full single-file checkpoint, keyed like the one-process run's: loadable without FSDP.
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    emas = [k for k in a["state_dict"] if k.startswith("ema_backbone.")]
    assert emas and any(not torch.equal(a["state_dict"][k], a["state_dict"][k[4:]]) for k in emas)
    # AdamW's moments, gathered from the shards and keyed by parameter index as a plain optimizer keys them.
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            scale = sa[i][name].abs().max().item()
            assert (sb[i][name] - sa[i][name]).abs().max().item() <= 1e-4 * scale, f"{i}.{name}"
    pd.testing.assert_frame_equal(val_curve(one_process), val_curve(fsdp), rtol=1e-5, atol=0)
    # Evaluation ran on rank 0 from the selected checkpoint.
    ra = {(r["steps"], r["ema"]): r for r in pd.read_json(one_process / "results.json").to_dict("records")}
    rb = {(r["steps"], r["ema"]): r for r in pd.read_json(fsdp / "results.json").to_dict("records")}
    assert ra.keys() == rb.keys() and len(ra) == 2
    for key in ra:
        assert ra[key]["checkpoint_step"] == rb[key]["checkpoint_step"]
        assert rb[key]["clip_score"] == pytest.approx(ra[key]["clip_score"], rel=1e-3)


@pytest.mark.slow
def test_gradient_clipping_under_fsdp_clips_as_one_process(tmp_path, cache):
    """trainer.gradient_clip_val under trainer=fsdp: the norm is taken over every rank's shards, and the run ends as
    one process that clips (Lightning's FSDP precision plugin refused norm clipping at the first step)."""
    # AdamW's eps 1: the update's size follows the gradient's, so clipping to 0.01 changes the weights.
    clip = ["trainer.gradient_clip_val=0.01", "optim.eps=1.0", "eval.enabled=false"]
    runs = {}
    one_process = [sys.executable, "-m", "src.run"]
    for name, prefix in (("one", one_process), ("fsdp", torchrun("-m", "src.run", "trainer=fsdp")),
                         ("unclipped", one_process)):
        out = run_command(prefix, tmp_path / name, cache, *(clip if name != "unclipped" else clip[1:]))
        assert out.returncode == 0, out.stderr[-3000:]
        runs[name] = checkpoint(tmp_path / name / RUN)["state_dict"]
    for k, v in runs["one"].items():
        torch.testing.assert_close(runs["fsdp"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(runs["unclipped"][k], v, rtol=1e-3, atol=1e-5) for k, v in runs["one"].items())


@pytest.mark.slow
@pytest.mark.parametrize("interrupted", ["fsdp", "one process"])
def test_interrupted_run_resumes_under_fsdp(tmp_path, cache, fsdp, interrupted):
    """Stopped at step 10 (last checkpoint: step 8), under FSDP or in one process; `torchrun ... trainer=fsdp` resumes
    and ends as the straight FSDP run: exactly after an FSDP checkpoint, within the tolerance above after switching
    from one process (the checkpoint is the same single file under every strategy)."""
    script = [str(ROOT / "tests" / "fsdp_interrupted.py"), "10"]
    if interrupted == "fsdp":
        out = run_command(torchrun(*script, "trainer=fsdp"), tmp_path, cache)
    else:
        out = run_command([sys.executable, *script], tmp_path, cache)
    assert out.returncode != 0
    run_dir = tmp_path / RUN
    assert checkpoint(run_dir)["global_step"] == 8 and not (run_dir / "results.json").exists()

    out = run_command(torchrun("-m", "src.run", "trainer=fsdp"), tmp_path, cache)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Restored all states from the checkpoint" in out.stdout + out.stderr
    a, b = checkpoint(fsdp), checkpoint(run_dir)
    assert b["global_step"] == 12 and (run_dir / "results.json").is_file()
    for k, v in a["state_dict"].items():
        if interrupted == "fsdp":
            assert torch.equal(b["state_dict"][k], v), k
        else:
            torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
