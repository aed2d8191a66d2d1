"""The real-data path end to end, as a user runs it, every `make test`:

an image folder (with a corrupt file) -> `python -m src.preprocess` with a random tiny AutoencoderKL, CLIP and T5
saved to files -> `python -m src.run data=shards` streaming from the shards (two loader worker processes), two
recipes, evaluated through the same autoencoder -> `python -m src.ranking.report`. Every step is a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from src.data.shards import read_meta
from tests import warm
from tests.test_preprocess import RES, make_coco, make_imagenet, save_clip, save_t5, save_vae

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RECIPES = ("paper/rf_lognorm_0.00_1.00", "paper/eps_linear")
TRAIN = [  # a tiny backbone for a few steps, validated and checkpointed midway, one cheap sampler setting
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=8", "data.val_samples=4",
    "train.max_steps=6", "train.val_every=3", "train.ckpt_every=3", "optim.warmup_steps=1", "torch_threads=1",
    "logger=csv", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
    "eval.n_samples=4", "eval.batch_size=4", "eval.settings=[{steps: 2, cfg: 1.0}, {steps: 2, cfg: 5.0}]",
]


def cli(module: str, *args: str, timeout: int = 240) -> str:
    out = warm.run([sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                   timeout=timeout)
    assert out.returncode == 0, f"python -m {module} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """ImageNet-style training shards and COCO-style evaluation shards, made by the preprocessing CLI."""
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    clip = save_clip(root, "clip-a", 32, 24)
    vae, t5 = save_vae(root / "vae"), save_t5(root / "t5")
    train, mapping = make_imagenet(root / "imagenet", per_class=4)  # 12 images and a corrupt one
    coco, annotations = make_coco(root / "coco", n=5)
    common = ["--resolution", str(RES), "--autoencoder", vae, "--clip", *clip, "--t5", t5, "--t5-length", "8",
              "--chunk-size", "4", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress",
              "--cache-dir", str(root / "checksums")]  # not the repository's .cache
    cli("src.preprocess", "imagenet", "--root", str(train), "--class-names", str(mapping),
        "--out", str(root / "shards/imagenet"), *common)
    cli("src.preprocess", "coco", "--images", str(coco), "--annotations", str(annotations),
        "--stats-from", str(root / "shards/imagenet"), "--out", str(root / "shards/coco"), *common)
    return root


def data_args(shards: Path) -> list[str]:
    return ["data=shards", "data.name=imagenet", f"data.train_dir={shards / 'shards/imagenet'}",
            f"data.eval_dir={shards / 'shards/coco'}", f"paths.cache_dir={shards / 'cache'}"]


@pytest.fixture(scope="module")
def sweep(shards) -> Path:
    """The two recipes trained on the shards (streamed by two loader workers) and evaluated, by the sweep command."""
    out = shards / "out"
    cli("src.run", "-m", f"loss={','.join(RECIPES)}", *data_args(shards), "data.in_memory=false",
        "data.num_workers=2", "sweep_name=e2e", f"paths.root_dir={out}", *TRAIN, timeout=300)
    return out / "outputs/multirun/e2e"


def test_preprocess_stream_train_evaluate_rank(shards, sweep):
    train_dir = shards / "shards/imagenet"
    meta = read_meta(train_dir)
    assert meta["count"] == 12 and meta["skipped"] == 1  # the corrupt image was skipped, and logged
    assert meta["autoencoder"] != "identity" and meta["shapes"]["latent"] == [4, RES // 2, RES // 2]

    run_dirs = sorted(p.parent for p in sweep.glob("imagenet/*/results.json"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        last = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 6
        assert f"streaming 12 training samples from {train_dir} with 2 loader worker(s)" in (run_dir / "run.log").read_text()
        records = json.loads((run_dir / "results.json").read_text())
        assert len(records) == 4  # 2 sampler settings x {EMA, raw}
        for r in records:
            assert r["dataset"] == "imagenet" and r["n_samples"] == 4
            assert torch.isfinite(torch.tensor([r["clip_score"], r["fid_clip"]])).all()

    report = shards / "report"
    cli("src.ranking.report", str(sweep), "--out", str(report), "--bootstrap", "20")
    text = "\n".join(p.read_text() for p in report.glob("*.md"))
    assert "rf/lognorm(0.00, 1.00)" in text and "eps/linear" in text


def test_another_autoencoder_evaluates_again_and_a_missing_one_is_refused_before_training(shards, sweep, tmp_path,
                                                                                            capsys):
    """The autoencoder decodes every sample and reference image, so records name it by content: re-evaluating with
    another one (eval.autoencoder_path) computes the records and reference statistics again and replaces them. A
    missing one is refused in one line before anything is trained or rewritten."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(next(sweep.glob("imagenet/rf_*")), run)
    before = json.loads((run / "results.json").read_text())
    decoder = before[0]["decoder"]
    assert decoder.startswith("AutoencoderKL:vae:") and {r["decoder"] for r in before} == {decoder}
    references = set((shards / "cache/reference").iterdir())
    torch.manual_seed(5)
    other = save_vae(tmp_path / "vae")  # folder name "vae" too: known by its content, not its name
    text = cli("src.evaluate", str(run), f"eval.autoencoder_path={other}")
    assert "results for the autoencoder (eval.autoencoder_path)=AutoencoderKL:vae:" in text
    after = json.loads((run / "results.json").read_text())
    assert len(after) == len(before) and len({r["decoder"] for r in after}) == 1 and after[0]["decoder"] != decoder
    assert [r["fid_clip"] for r in after] != [r["fid_clip"] for r in before]
    assert len(set((shards / "cache/reference").iterdir()) - references) == 1  # the new reconstructions' statistics

    # The refusals, in this process (the command lines around them are the ones above): src.evaluate's main, and the
    # job's checks before anything is written (what python -m src.run's job runs first).
    from hydra import compose, initialize_config_module

    from src.config import ConfigError
    from src.evaluate import main as evaluate_main
    from src.training.prepare import prepare_job

    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    gone = f"eval.autoencoder_path={tmp_path / 'gone'}"
    message = f"{gone}: the shards hold AutoencoderKL:vae latents"
    assert evaluate_main([str(run), gone]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["loss=rf", *data_args(shards), f"paths.root_dir={tmp_path}",
                                                       *TRAIN, gone])
    with pytest.raises(ConfigError, match=re.escape(message)):
        prepare_job(cfg, tmp_path / "new")
    assert not (tmp_path / "new").exists()
