"""The training seed through the job's own path (run_job, as src.run runs each job of a sweep in one process): the
same seed gives the same initial and final weights and losses also when a job with another seed ran in the process
before (nothing leaks from job to job), and another seed changes the initialisation, the batches, the training
times and the noise (docs/training.md)."""

import pandas as pd
import pytest
import torch

from src.training import job as job_lib
from src.training import module as module_lib
from src.training.job import run_job
from tests.test_training import final_state, make_cfg

STEPS = ["train.max_steps=3", "train.val_every=3", "train.ckpt_every=3", "eval.enabled=false",
         "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_a_seed_reaches_init_batches_times_and_noise_and_the_same_seed_repeats_after_another(tmp_path, cache_dir,
                                                                                            monkeypatch):
    seen: dict[str, dict] = {}
    current = {"name": ""}
    build, step = job_lib.build_backbone, module_lib.FormulationModule.training_step

    def recording_build(cfg):
        backbone = build(cfg)
        seen[current["name"]] = {"init": {k: v.clone() for k, v in backbone.state_dict().items()}, "steps": []}
        return backbone

    def recording_step(self, batch, batch_idx):
        seen[current["name"]]["steps"].append(batch["x0"].clone())
        return step(self, batch, batch_idx)

    monkeypatch.setattr(job_lib, "build_backbone", recording_build)
    monkeypatch.setattr(module_lib.FormulationModule, "training_step", recording_step)
    for name, seed in (("first", 0), ("other", 1), ("again", 0)):
        current["name"] = name
        run_job(make_cfg(tmp_path, cache_dir, [*STEPS, f"seed={seed}"]), tmp_path / name)

    def losses(name):
        return pd.read_csv(tmp_path / name / "csv" / "metrics.csv")["train/loss"].dropna().tolist()

    first, other, again = seen["first"], seen["other"], seen["again"]
    for k in first["init"]:  # the same seed after another job: the same initial weights, batches, final weights
        assert torch.equal(first["init"][k], again["init"][k]), k
    assert all(torch.equal(a, b) for a, b in zip(first["steps"], again["steps"], strict=True))
    (a, _), (b, _) = final_state(tmp_path / "first"), final_state(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a) and losses("first") == losses("again")

    random_init = [k for k in first["init"] if first["init"][k].std() > 0 and k != "pos_embed"]  # (sin-cos: fixed)
    same = [k for k in random_init if torch.equal(first["init"][k], other["init"][k])]
    assert len(random_init) > 10 and not same, same
    assert all(not torch.equal(a, b) for a, b in zip(first["steps"], other["steps"], strict=True))  # batches
    assert losses("first") != losses("other")


def test_another_seed_draws_other_training_times_and_noise():
    """The step streams (src/training/streams.py) the training step draws its times, dropout and noise from."""
    from src.training.streams import NOISE, TIMES, step_generator

    for stream in (TIMES, NOISE):
        draws = [torch.randn(8, generator=step_generator(seed, 5, stream)) for seed in (0, 0, 1)]
        assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
