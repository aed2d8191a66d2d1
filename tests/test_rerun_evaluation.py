"""Rerunning a finished run with another evaluation setting recomputes exactly the evaluation (never the training),
gives the new numbers, keeps the old records apart, and the planner calls the run "to evaluate", not "done"."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src import plan
from src.config import ConfigError
from src.evaluate import evaluate
from src.training import job
from tests import warm
from tests.test_training import make_cfg

ROOT = Path(__file__).resolve().parents[1]
# The smoke sweep's sizes (sweeps/smoke.yaml): a depth-1 backbone for a few steps, 8 samples, one cheap setting.
# A learning rate too high on purpose (and no EMA lag): the lowest validation loss is at an early step, so best.ckpt
# and last.ckpt differ.
BASE = ["train.max_steps=4", "train.val_every=1", "train.ckpt_every=2", "optim.lr=0.3", "optim.warmup_steps=0",
        "train.ema_decay=0.0", "eval.n_samples=8", "eval.batch_size=8", "eval.settings=[{steps: 2, cfg: 5.0}]",
        "eval.ema=[false]", "torch_threads=1"]


def _files(run_dir: Path) -> dict[str, tuple[str, int]]:
    """Every checkpoint's sha256 and mtime."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted((run_dir / "checkpoints").glob("*.ckpt"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished, evaluated run (and its cache), copied by each test."""
    root = tmp_path_factory.mktemp("trained")
    cfg = make_cfg(root, root / "cache", BASE)
    out = job.run_job(cfg, root / "run")
    assert out["global_step"] == 4
    return root


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def other_clip(tmp_path_factory) -> Path:
    """A second feature extractor: the tiny CLIP's architecture, randomly initialised, saved to its own file."""
    import open_clip

    from src.text import tiny_clip

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("clip") / "random_tiny_clip.pt"
    torch.save(open_clip.create_model(tiny_clip.MODEL_NAME).state_dict(), path)
    return path


def _cfg(trained: Path, overrides=()):
    return make_cfg(trained, trained / "cache", [*BASE, *overrides])


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a trainer was built: the rerun retrained")

    monkeypatch.setattr(job, "build_trainer", refuse)
    monkeypatch.setattr(job, "build_backbone", refuse)


CASES = [
    ("eval.n_samples=6", "n_samples", 6, "eval.n_samples=6"),
    ("eval.seed=99", "eval_seed", 99, "eval.seed=99"),
    ("eval.shift=3.0", "shift", 3.0, "eval.shift=3.0"),
    ("eval.checkpoint=last", "checkpoint", "last", "eval.checkpoint=last"),
    ("CLIP", "feature_extractor", None, "eval.clip="),
    # Heun: native equals rf_time on rf recipes (the same grid), Heun changes every family's samples.
    ("sampler=heun", "sampler", "heun", "sampler=heun"),
]


@pytest.mark.parametrize("override, field, value, message", CASES)
def test_changed_evaluation_setting_evaluates_again_without_training(trained, run, other_clip, monkeypatch, caplog,
                                                                    override, field, value, message):
    if override == "CLIP":
        from src.text import tiny_clip

        override = [f"eval.clip.model_name={tiny_clip.MODEL_NAME}", f"eval.clip.weights_path={other_clip}"]
    overrides = override if isinstance(override, list) else [override]
    before = json.loads((run / "results.json").read_text())
    checkpoints = _files(run)
    cfg = _cfg(trained, overrides)
    assert plan.job_status(cfg, run) == "to evaluate"
    assert plan.job_status(_cfg(trained), run) == "done"

    _no_training(monkeypatch)
    with caplog.at_level(logging.INFO, logger="src.training.job"):
        out = job.run_job(cfg, run)
    assert out == {"run_dir": str(run), "skipped": False, "evaluated_only": True}
    lines = [r.getMessage() for r in caplog.records if "missing: evaluating, training is done" in r.getMessage()]
    assert len(lines) == 1 and f"results for {message}" in lines[0], lines
    assert _files(run) == checkpoints  # no checkpoint written or touched

    after = json.loads((run / "results.json").read_text())
    assert after[: len(before)] == before  # the old records stay, kept apart by their settings
    [new] = after[len(before):]
    [old] = before
    if value is not None:
        assert new[field] == value
    assert new[field] != old[field]
    assert new["fid_clip"] != old["fid_clip"]  # new numbers
    assert (run / new["arrays"]).is_file() and new["arrays"] != old["arrays"]
    if field == "checkpoint":
        assert new["checkpoint_step"] == 4 and old["checkpoint_step"] < 4  # best.ckpt is an earlier step here
    assert plan.job_status(cfg, run) == "done"
    # Complete now: the same command again does nothing.
    assert job.run_job(_cfg(trained, overrides), run)["skipped"] is True


def test_legacy_records_are_evaluated_again(trained, run, monkeypatch):
    """Records of today's schema before this change (no tags, sampler, eval_seed, fid_features, ...) describe
    another FID feature definition: the run is to evaluate, and the evaluation runs without training."""
    records = json.loads((run / "results.json").read_text())
    legacy = [{k: v for k, v in r.items() if k not in ("tags", "train_seed", "backbone", "sampler", "eval_seed",
                                                       "feature_extractor", "fid_features", "checkpoint")}
              | {"seed": r["eval_seed"]} for r in records]
    (run / "results.json").write_text(json.dumps(legacy))
    cfg = _cfg(trained)
    assert plan.job_status(cfg, run) == "to evaluate"
    _no_training(monkeypatch)
    assert job.run_job(cfg, run)["evaluated_only"] is True
    after = json.loads((run / "results.json").read_text())
    assert len(after) == 2 and after[0] == legacy[0] and after[1]["fid_features"] == "clip_raw"
    assert plan.job_status(cfg, run) == "done"


def test_records_naming_weights_by_their_path_are_evaluated_again(trained, run, other_clip, monkeypatch):
    """The committed tiny CLIP keeps the name its records had (its sidecar's sha256 is its content's): default runs
    stay complete. Records written when a configured file was named by its path ("<model>:<path>") cannot say which
    weights they measured: the run is to evaluate, and it evaluates without training."""
    from src.text import tiny_clip
    from src.text.checkpoints import read_sidecar

    [record] = json.loads((run / "results.json").read_text())
    assert record["feature_extractor"] == f"tiny_clip:{read_sidecar(tiny_clip.WEIGHTS_PATH)['sha256'][:12]}"
    cfg = _cfg(trained, [f"eval.clip.model_name={tiny_clip.MODEL_NAME}", f"eval.clip.weights_path={other_clip}"])
    _no_training(monkeypatch)
    assert job.run_job(cfg, run)["evaluated_only"] is True
    records = json.loads((run / "results.json").read_text())
    sha = hashlib.sha256(other_clip.read_bytes()).hexdigest()
    assert records[-1]["feature_extractor"] == f"{tiny_clip.MODEL_NAME}:{sha[:12]}"
    records[-1]["feature_extractor"] = f"{tiny_clip.MODEL_NAME}:{other_clip.resolve()}"  # as written before
    (run / "results.json").write_text(json.dumps(records))
    assert plan.job_status(cfg, run) == "to evaluate"
    assert job.run_job(cfg, run)["evaluated_only"] is True
    after = json.loads((run / "results.json").read_text())
    assert len(after) == 3 and after[:2] == records and plan.job_status(cfg, run) == "done"


def _clip_file(path: Path, seed: int) -> Path:
    """A tiny CLIP of another random initialisation (the tiny CLIP's architecture) saved at path."""
    import open_clip

    from src.text import tiny_clip

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model(tiny_clip.MODEL_NAME).state_dict(), path)
    return path


def _clip_args(path: Path) -> list[str]:
    from src.text import tiny_clip

    return [f"eval.clip.model_name={tiny_clip.MODEL_NAME}", f"eval.clip.weights_path={path}"]


def _own_cache(trained: Path, tmp_path: Path, name: str = "cache") -> Path:
    """A copy of the trained run's cache (its data and reference statistics), for a test to change."""
    shutil.copytree(trained / "cache", tmp_path / name)
    return tmp_path / name


@pytest.mark.slow  # the quick suite's time budget; `make test-slow` runs it
def test_weights_files_of_one_name_are_two_feature_extractors(trained, run, tmp_path):
    """a/clip.pt and b/clip.pt hold different weights: b's FID is measured against b's own reference statistics,
    not the ones cached for a (the cache was keyed by the file's name: the auditor's FID 123.59 for 75.67)."""
    a, b = _clip_file(tmp_path / "a" / "clip.pt", 1), _clip_file(tmp_path / "b" / "clip.pt", 2)
    cache = _own_cache(trained, tmp_path)
    for path in (a, b):
        out = _cli(str(run), *_clip_args(path), f"paths.cache_dir={cache}")
        assert out.returncode == 0 and "missing: evaluating" in out.stderr, out.stderr[-3000:]
    _, rec_a, rec_b = json.loads((run / "results.json").read_text())
    # b alone, in another copy of the run with a cache that never saw a: the same FID.
    alone = tmp_path / "alone"
    shutil.copytree(trained / "run", alone)
    evaluate(alone, [*_clip_args(b), f"paths.cache_dir={_own_cache(trained, tmp_path, 'cache_b')}"])
    truth = json.loads((alone / "results.json").read_text())[-1]
    assert rec_b["fid_clip"] == pytest.approx(truth["fid_clip"], rel=1e-4)
    assert rec_b["feature_extractor"] == truth["feature_extractor"] != rec_a["feature_extractor"]
    assert rec_a["reference_arrays"] != rec_b["reference_arrays"]


@pytest.mark.slow  # the quick suite's time budget (the Inception twin below runs in it)
def test_weights_replaced_at_the_same_path_are_evaluated_again(trained, run, tmp_path):
    """A weights file overwritten in place is another feature extractor: the rerun evaluates (it said "results
    complete, nothing to do" and served the old FID); its checksum is remembered under the cache folder."""
    path, cache = _clip_file(tmp_path / "clip.pt", 1), _own_cache(trained, tmp_path)
    out = _cli(str(run), *_clip_args(path), f"paths.cache_dir={cache}")
    assert out.returncode == 0, out.stderr[-3000:]
    first = json.loads((run / "results.json").read_text())[-1]
    _clip_file(path, 3)  # the same path and size, other weights
    cfg = _cfg(trained, _clip_args(path))
    assert plan.job_status(cfg, run) == "to evaluate"
    out = _cli(str(run), *_clip_args(path), f"paths.cache_dir={cache}")
    assert out.returncode == 0, out.stderr[-3000:]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"results for eval.clip=tiny-clip-16px:{sha[:12]} missing: evaluating" in out.stderr, out.stderr
    new = json.loads((run / "results.json").read_text())[-1]
    assert new["feature_extractor"] == f"tiny-clip-16px:{sha[:12]}" != first["feature_extractor"]
    assert new["fid_clip"] != first["fid_clip"] and new["reference_arrays"] != first["reference_arrays"]
    assert json.loads((cache / "weights_sha256.json").read_text())[str(path.resolve())]["sha256"] == sha
    assert plan.job_status(cfg, run) == "done"


def test_a_damaged_reference_cache_is_computed_again(trained, run, tmp_path, caplog):
    """A truncated reference-statistics file (BadZipFile, and the evaluation stopped) is a cache miss: one warning
    line naming it, the statistics computed again, the file replaced."""
    from src.utils.io import load_npz

    cache = f"paths.cache_dir={_own_cache(trained, tmp_path)}"
    evaluate(run, ["eval.seed=98", cache])
    reference = Path(json.loads((run / "results.json").read_text())[-1]["reference_arrays"])
    intact = load_npz(reference)
    reference.write_bytes(reference.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="src.metrics.reference"):
        evaluate(run, ["eval.seed=99", cache])
    [line] = [r.getMessage() for r in caplog.records if r.name == "src.metrics.reference"]
    assert line.startswith(f"reference cache {reference} is unreadable (BadZipFile") and "\n" not in line
    np.testing.assert_array_equal(load_npz(reference)["features"], intact["features"])
    last = json.loads((run / "results.json").read_text())[-1]
    assert last["eval_seed"] == 99 and Path(last["reference_arrays"]) == reference


class _FakeInception:
    """Stands in for torch-fidelity's network (what matters here is which weights file, not Inception): features
    scaled by the file's one number, named by the file's content as the real extractor is."""

    def __init__(self, weights_path, device="cpu", config_key=""):
        self.scale = float(torch.load(weights_path, map_location="cpu", weights_only=True)["w"])
        self.id = f"fake-inception:{hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()[:16]}"

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :6].float().cpu() * self.scale


def test_inception_weights_replaced_at_the_same_path_are_evaluated_again(trained, run, tmp_path, monkeypatch, caplog):
    """Records name the Inception weights behind fid_inception by content: a file replaced in place makes the run to
    evaluate (it counted as complete with the old Inception FID), as does a record from before the field; turning
    Inception off leaves the run complete."""
    import src.metrics.inception

    monkeypatch.setattr(src.metrics.inception, "InceptionFeatureExtractor", _FakeInception)
    weights, cache = tmp_path / "inception.pth", f"paths.cache_dir={_own_cache(trained, tmp_path)}"
    torch.save({"w": torch.tensor(1.0)}, weights)
    overrides = [f"eval.inception.weights_path={weights}"]
    evaluate(run, [*overrides, cache])
    [first] = json.loads((run / "results.json").read_text())
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert first["inception_extractor"] == f"inception-v3-2048:{sha[:12]}" and first["fid_inception"] > 0
    assert plan.job_status(_cfg(trained, overrides), run) == "done"

    torch.save({"w": torch.tensor(2.0)}, weights)  # the same path, other weights
    assert plan.job_status(_cfg(trained, overrides), run) == "to evaluate"
    with caplog.at_level(logging.INFO, logger="src.evaluate"):
        evaluate(run, [*overrides, cache])
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert any(f"results for eval.inception=inception-v3-2048:{sha[:12]} missing" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    [second] = json.loads((run / "results.json").read_text())  # the same settings: it replaced the first
    assert second["inception_extractor"] == f"inception-v3-2048:{sha[:12]}"
    assert second["fid_inception"] == pytest.approx(4 * first["fid_inception"], rel=1e-6)
    assert second["fid_clip"] == pytest.approx(first["fid_clip"], rel=1e-6)
    assert plan.job_status(_cfg(trained, overrides), run) == "done"
    assert plan.job_status(_cfg(trained), run) == "done"  # Inception off: the record is complete as it is
    del second["inception_extractor"]  # as written before the field
    (run / "results.json").write_text(json.dumps([second]))
    assert plan.job_status(_cfg(trained, overrides), run) == "to evaluate"


@pytest.mark.parametrize("damage", [b'[{"clip_score": 0.3', b'{"not": "a list"}', b'[{"a": 1}]'],
                         ids=["truncated", "not a list", "not records"])
def test_a_damaged_results_file_is_named_kept_and_replaced_once_deleted(trained, run, monkeypatch, damage):
    """results.json damaged by something else (this project writes it atomically): the job fails in one line that
    names the file and what to do, and leaves it as it is; once deleted, the rerun evaluates again without training."""
    (run / "results.json").write_bytes(damage)
    checkpoints = _files(run)
    cfg = _cfg(trained)
    assert plan.job_status(cfg, run) == "results.json unreadable"  # not "to evaluate": the job fails naming it
    with pytest.raises(ValueError) as info:
        job.run_job(cfg, run)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{run / 'results.json'}: ")
    assert message.endswith("delete it and rerun the command to evaluate the run again (its training is kept)")
    assert (run / "results.json").read_bytes() == damage and _files(run) == checkpoints
    (run / "results.json").unlink()
    _no_training(monkeypatch)
    assert job.run_job(_cfg(trained), run)["evaluated_only"] is True
    assert len(json.loads((run / "results.json").read_text())) == 1 and _files(run) == checkpoints


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return warm.run([sys.executable, "-m", "src.evaluate", *args], cwd=ROOT, capture_output=True, text=True,
                    env=env, timeout=300)


def test_evaluate_samples_under_the_jobs_torch_settings(run, monkeypatch):
    """src.evaluate set only the thread count; a job evaluates after _torch_settings, which on a GPU also sets TF32
    matmuls: a record computed by either differed in float rounding (the samples of 50 steps, their metrics)."""
    seen = []
    monkeypatch.setattr(job, "_torch_settings", lambda cfg: seen.append(cfg.get("torch_threads")))
    evaluate(run)
    assert seen == [1]


def test_evaluate_cli_re_evaluates_a_finished_run(trained, run):
    checkpoints = _files(run)
    before = json.loads((run / "results.json").read_text())
    out = _cli(str(run), "eval.seed=7", "eval.ema=[true,false]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "results for eval.seed=7 missing: evaluating" in out.stderr
    after = json.loads((run / "results.json").read_text())
    assert after[:1] == before and sorted((r["eval_seed"], r["ema"]) for r in after[1:]) == [(7, False), (7, True)]
    assert _files(run) == checkpoints
    assert "n=8" in out.stdout and out.stdout.count("clip_score") == 2
    assert "[root]" not in out.stderr and "Loading" not in out.stderr  # open_clip's lines: in run.log, as in a job
    assert "Loading" in (run / "run.log").read_text()
    # The stored configuration is the run's own: training keys were not taken from today's defaults.
    stored = (run / "config.yaml").read_text()
    assert "max_steps: 4" in stored and "hidden_size: 32" in stored


def test_evaluate_cli_refuses_training_keys_and_runs_without_checkpoints(run, tmp_path, capsys):
    out = _cli(str(run), "optim.lr=0.5")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "optim.lr: only eval.*, sampler.* and paths.* may change" in out.stderr
    # Bad values and unknown keys: the checks of src.run, one line, before anything is loaded or written.
    before = (run / "results.json").read_bytes()
    from src.evaluate import main as evaluate_main

    for override, message in (("eval.n_samples=1", "eval.n_samples=1: must be an integer >= 2"),
                              ("eval.settings=5", "eval.settings=5: must be a non-empty list"),
                              ("eval.settings=[{steps: 2, cfg: 5.0, shift: 3.0}]",
                               "eval.settings.0.shift: no such key"),
                              ("eval.settings={steps: 2, cfg: 1}", "eval.settings={steps: 2, cfg: 1}: must be a list"),
                              ("eval.clip=null",
                               "eval.clip=null: eval.clip is a group of settings (force_quick_gelu, "),
                              ("sampler.name=bogus", "sampler.name=bogus: sampler='bogus' is not allowed"),
                              ("eval.n_sample=6", "eval.n_sample: no such setting; eval.* has "),
                              ("+eval.n_sample=6", "eval.n_sample: no such setting; eval.* has ")):
        assert evaluate_main([str(run), override]) == 2  # the command's main, in this process (one CLI call above)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (override, err)
    assert (run / "results.json").read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    assert evaluate_main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint" in err
    assert evaluate_main([str(tmp_path)]) == 2  # the folder holding runs (a sweep's) is not one
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}: no config.yaml (nor .hydra/config.yaml): not a run directory" in err
    absent = f"--config-dir {tmp_path / 'absent'}: no such folder"
    for argv, message in (([str(run), "--config-dir", str(tmp_path / "absent")], absent),
                          ([str(run), f"--config-dir={tmp_path / 'absent'}"], absent),
                          ([str(run), "--config-dir"], "--config-dir: needs a folder"),
                          (["--config-dir", str(tmp_path)], "usage: python -m src.evaluate RUN_DIR")):
        assert evaluate_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert (run / "results.json").read_bytes() == before


def test_evaluate_cli_says_in_one_line_what_ctrl_c_kept(run, monkeypatch, capsys):
    import src.evaluate as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "evaluate", interrupted)
    assert cli.main([str(run)]) == 1
    err = capsys.readouterr().err
    assert err == ("evaluate: interrupted; the settings evaluated so far are kept in results.json, rerun the command "
                   "to evaluate the rest\n")


def test_evaluate_cli_prints_the_null_metrics_of_diverged_samples(monkeypatch, capsys):
    """Samples that are not finite are recorded with null CLIP score and FID; the command's summary formatted them as
    numbers, a TypeError traceback after the evaluation had written them."""
    import src.evaluate as cli

    record = {"setting": "2 steps, cfg 1.0", "ema": True, "n_samples": 8, "clip_score": None, "fid_clip": None}
    monkeypatch.setattr(cli, "evaluate", lambda *args, **kwargs: [record, {**record, "clip_score": 0.25,
                                                                           "fid_clip": 3.5, "ema": False}])
    assert cli.main(["some_run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("ema  n=8     clip_score null (not finite)  fid_clip null (not finite)"), out
    assert out[1].endswith("raw  n=8     clip_score 0.2500  fid_clip 3.5000"), out


def test_evaluate_holds_the_run_lock_and_clears_what_interrupted_writes_left(run, capsys):
    """A job (or another src.evaluate) holding the run is not joined: one line, nothing written. Once free, the
    temp files a killed evaluation left are removed, as a job's launch removes them."""
    import fcntl

    from src.evaluate import main as evaluate_main
    from src.launch.rundir import LOCK_FILE

    arrays = run / json.loads((run / "results.json").read_text())[0]["arrays"]
    left = [run / f".results.json.{'a' * 32}.tmp", arrays.with_name(f".{arrays.name}.k3x_9q2z.tmp")]
    for path in left:
        path.write_bytes(b"partial")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}
    with open(run / LOCK_FILE, "a+") as held:  # another process's lock (flock: per open file, so this conflicts)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('{"host": "node7", "pid": 1234}')
        held.flush()
        assert evaluate_main([str(run), "eval.seed=7"]) == 2
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run} is in use by another job" in err and "node7" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE} == before
    assert evaluate_main([str(run)]) == 0  # complete already: nothing sampled, the leftovers still cleared
    assert not any(p.exists() for p in left)
    assert (run / "results.json").stat().st_mtime_ns == before[run / "results.json"]


def _fail(*args, **kwargs):
    raise RuntimeError("sampling failed")


def test_the_report_ranks_what_the_latest_re_evaluation_asked_for(run, monkeypatch):
    """After `python -m src.evaluate RUN eval.n_samples=6` the report ranks (and counts complete) the 6-sample
    records, as its refusal of mixed settings advises, until the next launch asks for its own settings again."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from src.launch.rundir import EVAL_REQUEST, save_job_config
    from src.ranking.aggregate import load_sweep

    def ranked():
        sweep = load_sweep([run.parent])
        return sorted(sweep.records["n_samples"]), list(sweep.runs["status"])

    assert ranked() == ([8], ["done"])
    with pytest.raises(ConfigError, match="eval.n_samples=1: must be an integer >= 2"):
        evaluate(run, ["eval.n_samples=1"])
    assert not (run / EVAL_REQUEST).exists()  # a refused command changes nothing
    monkeypatch.setattr("src.evaluation.evaluate.evaluate_backbone", _fail)
    with pytest.raises(RuntimeError, match="sampling failed"):
        evaluate(run, ["eval.n_samples=6"])
    assert not (run / EVAL_REQUEST).exists() and ranked() == ([8], ["done"])  # nor does a failed one
    monkeypatch.undo()
    evaluate(run, ["eval.n_samples=6"])
    assert ranked() == ([6], ["done"])
    evaluate(run, [])  # back to the run's own settings: complete already, and ranked again
    assert ranked() == ([8], ["done"])
    evaluate(run, ["eval.n_samples=6"])
    monkeypatch.setattr(HydraConfig, "instance", lambda: SimpleNamespace(cfg=OmegaConf.create(
        {"hydra": {"overrides": {"task": []}}})))
    save_job_config(run, OmegaConf.load(run / "config.yaml"))  # a launch: its own settings are the latest request
    assert not (run / EVAL_REQUEST).exists() and ranked() == ([8], ["done"])


def _set_step(path: Path, step: int) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["global_step"] = step
    torch.save(ckpt, path)


def test_records_of_an_earlier_checkpoint_are_evaluated_again(trained, run, monkeypatch, caplog):
    """Records scored before training went on (an unfinished run evaluated, then resumed: best.ckpt is of a later
    step now) are not this model's: the run is to evaluate, and the evaluation adds this step's without training (the
    earlier step's stay in results.json, kept apart by checkpoint_step, as a run trained longer keeps them)."""
    records = json.loads((run / "results.json").read_text())
    ckpt_step = records[0]["checkpoint_step"]
    for r in records:
        r["checkpoint_step"] = ckpt_step - 1
    (run / "results.json").write_text(json.dumps(records))
    cfg = _cfg(trained)
    assert plan.job_status(cfg, run) == "to evaluate"
    _no_training(monkeypatch)
    with caplog.at_level(logging.INFO, logger="src.training.job"):
        assert job.run_job(cfg, run)["evaluated_only"] is True
    assert f"results for checkpoint step {ckpt_step} (the stored records are of step {ckpt_step - 1}) missing" \
        in caplog.text
    old, new = json.loads((run / "results.json").read_text())
    assert [old] == records and new["checkpoint_step"] == ckpt_step and new["arrays"] != old["arrays"]
    assert new["fid_clip"] == pytest.approx(records[0]["fid_clip"])  # the same model scored again: the same numbers
    assert plan.job_status(cfg, run) == "done"


def test_the_report_does_not_count_records_of_an_earlier_checkpoint_as_current(trained, run, monkeypatch):
    """The job and the planner call a run whose records are of an earlier step of its checkpoint "to evaluate"; the
    rank report applied the completeness rule without the step and called it done, ranking the records as current.
    Now it is partial there too, until the evaluation replaces them."""
    from src.ranking.aggregate import load_sweep

    records = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps([{**r, "checkpoint_step": r["checkpoint_step"] - 1} for r in records]))
    cfg = _cfg(trained)
    assert plan.job_status(cfg, run) == "to evaluate"
    assert list(load_sweep([run.parent]).runs["status"]) == ["partial"]
    _no_training(monkeypatch)
    assert job.run_job(cfg, run)["evaluated_only"] is True
    assert list(load_sweep([run.parent]).runs["status"]) == ["done"]


def test_evaluate_cli_refuses_a_run_whose_training_is_not_finished(run, capsys):
    """Its results would be of an intermediate model, kept as the run's own after it resumes."""
    from src.evaluate import main as evaluate_main

    _set_step(run / "checkpoints" / "last.ckpt", 2)
    before = (run / "results.json").read_bytes()
    assert evaluate_main([str(run), "eval.seed=7"]) == 2  # the command's main, in this process
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip() == (
        f"evaluate: ConfigError: {run}: training is not finished (last.ckpt is of step 2 of train.max_steps=4); rerun "
        f"its python -m src.run command to resume it, which evaluates at the end")
    assert (run / "results.json").read_bytes() == before


def _edit_best_state(last: Path, **changes) -> None:
    """Change the best-checkpoint callback's state stored in last.ckpt (as an older run, or one never validated,
    wrote it)."""
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    [key] = [k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint{")]
    for name, value in changes.items():
        if value is None:
            ckpt["callbacks"][key].pop(name)
        else:
            ckpt["callbacks"][key][name] = value
    torch.save(ckpt, last)


def test_a_lost_best_checkpoint_is_named_not_replaced_by_last(trained, run, monkeypatch, caplog):
    """best.ckpt deleted after validation chose it: evaluating last.ckpt in its place served another model's numbers
    as "best". Records of the chosen step stay its results (done); an evaluation that needs the file fails in one line
    naming it (the planner says so); records scored from last.ckpt in its place are not current; a run no validation
    chose a checkpoint for still evaluates last.ckpt."""
    from src.evaluation.run import MissingBestCheckpoint, select_checkpoint

    best, last = run / "checkpoints" / "best.ckpt", run / "checkpoints" / "last.ckpt"
    step = torch.load(best, map_location="cpu", weights_only=True)["global_step"]
    assert step < 4  # best and last differ here (BASE)
    states = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
    [state] = [v for k, v in states.items() if k.startswith("ModelCheckpoint{")]
    assert state["best_model_step"] == step  # under ModelCheckpoint's own key: older runs resume their best score
    best.unlink()
    cfg, more = _cfg(trained), _cfg(trained, ["eval.seed=5"])
    assert plan.job_status(cfg, run) == "done"  # its records were scored from the chosen step
    with pytest.raises(MissingBestCheckpoint) as info:
        select_checkpoint(run, "best")
    message = str(info.value)
    assert "\n" not in message and message.startswith(
        f"{best}: missing, though validation chose it (step {step}, val_ema/loss_mean ")
    assert message.endswith("); restore it, or evaluate last.ckpt with eval.checkpoint=last")
    assert select_checkpoint(run, "last") == last
    before = (run / "results.json").read_bytes()
    assert plan.job_status(more, run) == "best.ckpt missing"
    _no_training(monkeypatch)
    with caplog.at_level(logging.INFO), pytest.raises(MissingBestCheckpoint,
                                                      match=f"^{best}: missing, though validation chose it"):
        job.run_job(more, run)
    assert "evaluating" not in caplog.text  # named before the job says it evaluates
    assert (run / "results.json").read_bytes() == before
    from src.evaluate import evaluate  # python -m src.evaluate RUN eval.seed=5: the same, before its "evaluating"

    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(MissingBestCheckpoint,
                                                      match=f"^{best}: missing, though validation chose it"):
        evaluate(run, ["eval.seed=5"])
    assert "evaluating" not in caplog.text and "missing" not in caplog.text
    assert (run / "results.json").read_bytes() == before
    assert plan.job_status(_cfg(trained, ["eval.checkpoint=last"]), run) == "to evaluate"

    records = json.loads(before)  # scored from last.ckpt in its place, as before this check
    (run / "results.json").write_text(json.dumps([{**r, "checkpoint_step": 4} for r in records]))
    assert plan.job_status(cfg, run) == "best.ckpt missing"
    (run / "results.json").write_bytes(before)
    _edit_best_state(last, best_model_step=None)  # a run checkpointed before the step was kept: records unknown
    assert plan.job_status(cfg, run) == "best.ckpt missing"
    with pytest.raises(MissingBestCheckpoint, match=r"chose it \(val_ema/loss_mean [0-9.]+\); restore it"):
        job.run_job(cfg, run)
    _edit_best_state(last, best_model_path="")  # no validation ever chose one: last.ckpt is evaluated
    assert select_checkpoint(run, "best") == last


@pytest.mark.parametrize("damage", ["cut", "yaml"])
def test_damaged_run_files_are_named_in_one_line(trained, run, damage):
    """A damaged config.yaml (src.evaluate) or fingerprint.json, best.ckpt (src.run's job): one line naming the file
    and the way out, nothing written."""
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("\n".join(text.splitlines()[:4]) if damage == "cut" else "loss: {family: [\n")
    out = _cli(str(run), "eval.seed=7")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"evaluate: ConfigError: {run / 'config.yaml'}: not a ")
    assert out.stderr.rstrip().endswith("restore it")


def test_damaged_fingerprint_and_checkpoint_are_named(trained, run):
    (run / "fingerprint.json").write_text('{"loss": {"fam')
    # The plan says what the job does.
    assert plan.job_status(_cfg(trained), run) == "refused: fingerprint.json unreadable"
    with pytest.raises(ConfigError, match=r"fingerprint.json: not valid JSON .*: restore it, or move the directory"):
        job.run_job(_cfg(trained), run)
    shutil.copy(trained / "run" / "fingerprint.json", run / "fingerprint.json")
    best = run / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes()[:1000])
    assert plan.job_status(_cfg(trained), run) == "done"  # nothing to evaluate: the job skips it
    assert plan.job_status(_cfg(trained, ["eval.seed=5"]), run) == "best.ckpt unreadable"
    with pytest.raises(ValueError, match=r"best.ckpt: cannot be read as a checkpoint \(.*\); restore it, or evaluate "
                                         r"the other one with eval.checkpoint=last$"):
        job.run_job(_cfg(trained, ["eval.seed=5"]), run)


def _damage_inside(path: Path) -> None:
    """Zero a stretch of the file's middle: its zip directory (at the end) still reads, its arrays do not."""
    data = bytearray(path.read_bytes())
    data[200:1200] = bytes(1000)
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", [_truncate, _damage_inside], ids=["truncated", "damaged inside"])
def test_a_damaged_arrays_file_makes_its_record_missing(trained, run, monkeypatch, damage):
    """The report reads each record's arrays (the bootstrap): a truncated file, or one overwritten in part that keeps
    its zip directory (its CRCs tell), is evaluated again, not served."""
    [record] = json.loads((run / "results.json").read_text())
    arrays = run / record["arrays"]
    damage(arrays)
    cfg = _cfg(trained)
    assert plan.job_status(cfg, run) == "to evaluate"
    _no_training(monkeypatch)
    assert job.run_job(cfg, run)["evaluated_only"] is True
    assert np.load(arrays)["clip_scores"].shape[0] == 8
    assert plan.job_status(cfg, run) == "done"


def test_the_report_lists_a_damaged_arrays_file_instead_of_failing(trained, run):
    """The bootstrap keeps the record's values, naming the file (as for a missing one); the sample sheets fall
    back to the grid PNG; the run is partial."""
    from src.evaluation.grids import read_grid, read_prompts
    from src.ranking.aggregate import load_sweep
    from src.ranking.bootstrap import bootstrap_metrics

    [record] = json.loads((run / "results.json").read_text())
    arrays = run / record["arrays"]
    png = arrays.with_suffix(".png")
    clean = read_grid(arrays, None)
    _damage_inside(arrays)  # the per-sample scores and features, stored first
    data = bytearray(arrays.read_bytes())
    data[-3000:-1500] = bytes(1500)  # and the grid's samples, stored last
    arrays.write_bytes(bytes(data))
    assert np.array_equal(read_grid(arrays, png), clean)  # cut from the PNG
    assert read_prompts(arrays, png) is None or len(read_prompts(arrays, png)) == 8  # read or none, never raised
    sweep = load_sweep([run.parent])
    assert list(sweep.runs["status"]) == ["partial"]
    draws = bootstrap_metrics(sweep.records, 3, seed=0)
    assert list(draws.fixed) == [0] and draws.fixed[0].startswith(f"unreadable file {arrays.resolve()} (BadZipFile")


def test_run_config_keeps_the_runs_recipe_and_backbone(tmp_path):
    """The run's loss and model replace today's defaults whole: an EDM run is not merged into rf_lognorm's m, s."""
    from omegaconf import OmegaConf

    from src.evaluate import load_run_config

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    stored = {"loss": {"family": "edm", "p_mean": 0.0, "p_std": 0.6},
              "model": {"_target_": "src.models.DiT", "depth": 1, "hidden_size": 32, "num_heads": 2},
              "data": {"name": "digits"}, "train": {"max_steps": 4}, "run_name": "digits/edm_0.00_0.60"}
    OmegaConf.save(OmegaConf.create(stored), run / ".hydra" / "config.yaml")
    cfg = load_run_config(run, ["eval.n_samples=4"])
    assert OmegaConf.to_container(cfg.loss) == stored["loss"]
    assert OmegaConf.to_container(cfg.model) == stored["model"]
    assert cfg.eval.n_samples == 4


def test_evaluate_reads_overrides_as_src_run_does(tmp_path):
    """eval.settings=[{steps:2,cfg:1.0}] (Hydra's grammar, which src.run takes) was read as YAML by src.evaluate: a
    mapping with the key 'steps:2', refused as "eval.settings.0.steps:2: no such key"."""
    from omegaconf import OmegaConf

    from src.config import ConfigError
    from src.evaluate import load_run_config

    run = tmp_path / "run"
    run.mkdir()
    stored = {"loss": {"family": "rf"}, "model": {"depth": 1}, "data": {"name": "digits"}, "train": {"max_steps": 4},
              "run_name": "digits/rf"}
    OmegaConf.save(OmegaConf.create(stored), run / "config.yaml")
    cfg = load_run_config(run, ["eval.settings=[{steps:2,cfg:1.0}]", "sampler.name=ab2:AB2", "eval.ema=[true]",
                                "eval.clip.weights_path=/models/clip.bin", "+eval.seed=7"])
    assert OmegaConf.to_container(cfg.eval.settings) == [{"steps": 2, "cfg": 1.0}]
    assert (cfg.sampler.name, list(cfg.eval.ema), cfg.eval.clip.weights_path, cfg.eval.seed) == (
        "ab2:AB2", [True], "/models/clip.bin", 7)
    assert cfg.eval.clip.model_name is None  # the rest of the group as it was
    with pytest.raises(ConfigError, match=r"^eval.n_samples=4,8: one value per setting here"):
        load_run_config(run, ["eval.n_samples=4,8"])
    with pytest.raises(ConfigError, match=r"^eval.settings=\[\{steps: 2: not a valid override \("):
        load_run_config(run, ["eval.settings=[{steps: 2"])


def test_evaluate_help_shows_its_examples_as_commands(capsys):
    """The help's example that continues over two lines keeps its backslash and line break (a shell command)."""
    from src.evaluate import main as evaluate_main

    assert evaluate_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "eval.clip.model_name=ViT-L-14-quickgelu \\\n        eval.clip.weights_path=/models/clip_l14.pt" in out


def test_evaluate_refused_by_a_busy_run_says_only_that(run, capsys, caplog, monkeypatch):
    """While a job works in the run (resuming its training, or evaluating), src.evaluate's one line is that it is in
    use: not a "results ... missing: evaluating" (or "complete") line before the refusal, nor "training is not
    finished" of the training the job is resuming."""
    import fcntl

    from src.evaluate import main as evaluate_main
    from src.launch.rundir import LOCK_FILE

    with open(run / LOCK_FILE, "a+") as held:  # another process's lock (flock: per open file, so this conflicts)
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write('{"host": "node7", "pid": 1234}')
        held.flush()
        with caplog.at_level(logging.INFO, logger="src.evaluate"):
            assert evaluate_main([str(run), "eval.seed=7"]) == 2
            assert evaluate_main([str(run)]) == 2
        monkeypatch.setattr(job, "training_finished", lambda cfg, run_dir: False)  # a job resuming the training
        assert evaluate_main([str(run)]) == 2
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    said = [r.getMessage() for r in caplog.records if r.name == "src.evaluate"]
    assert not any("missing: evaluating" in m or "nothing to do" in m for m in said), said
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(f"{run} is in use by another job" in line for line in err), err
    monkeypatch.undo()
    (run / "checkpoints" / "best.ckpt").unlink()  # refused once the lock is held: run.log is left as it was
    (run / "run.log").write_text("the run's log\n")
    assert evaluate_main([str(run), "eval.seed=7"]) == 2
    assert "best.ckpt: missing" in capsys.readouterr().err and (run / "run.log").read_text() == "the run's log\n"


def test_each_ema_setting_samples_with_its_own_weights_from_the_checkpoint(run, monkeypatch):
    """eval.ema=[true,false]: the EMA records are sampled with the checkpoint's ema_backbone.* tensors and the raw ones
    with its backbone.* tensors. (This run trains with ema_decay=0, so its two copies are equal: the EMA copy in the
    checkpoint is made different first, else sampling either copy for both would pass.)"""
    from src.evaluation import evaluate as evaluation
    from src.evaluation.run import select_checkpoint

    path = select_checkpoint(run, "best")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in ckpt["state_dict"].items():
        if k.startswith("ema_backbone.") and v.is_floating_point():
            ckpt["state_dict"][k] = v + 0.5
    torch.save(ckpt, path)
    seen = {}

    def capture(backbone, *args, ema, **kwargs):
        seen[ema] = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        return []

    monkeypatch.setattr(evaluation, "evaluate_backbone", capture)
    evaluate(run, ["eval.seed=7", "eval.ema=[true,false]"])
    state = ckpt["state_dict"]
    assert sorted(seen) == [False, True]
    for ema, prefix in ((True, "ema_backbone."), (False, "backbone.")):
        expected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        assert seen[ema].keys() == expected.keys()
        assert all(torch.equal(seen[ema][k], expected[k]) for k in expected), f"ema={ema}: other weights sampled"
    assert any(not torch.equal(seen[True][k], seen[False][k]) for k in seen[True])  # the check can tell them apart


def test_evaluating_a_finished_run_again_gives_the_jobs_own_records_and_arrays(run, tmp_path):
    """src.evaluate of a finished run whose records and arrays were removed samples what the job's evaluation
    sampled after training, bit for bit: the same best.ckpt (an earlier step than last.ckpt here), prompts, noise
    and metrics, whatever state the process's global generators are in."""
    before = json.loads((run / "results.json").read_text())
    assert before and {r["checkpoint_step"] for r in before} != {4}  # best.ckpt, not the final step
    arrays = {r["arrays"]: dict(np.load(run / r["arrays"])) for r in before}
    for path in (run / "results.json", run / "eval_request.yaml"):
        path.unlink(missing_ok=True)
    shutil.rmtree(run / "eval")
    torch.manual_seed(12345)  # other global generator state than the job's
    after = evaluate(run)
    keys = ("setting", "ema", "checkpoint_step", "n_samples", "eval_seed", "clip_score", "fid_clip", "arrays")
    assert [{k: r[k] for k in keys} for r in after] == [{k: r[k] for k in keys} for r in before]
    for name, saved in arrays.items():
        again = np.load(run / name)
        for k in ("clip_scores", "features", "grid"):
            np.testing.assert_array_equal(again[k], saved[k], err_msg=f"{name}: {k}")


def test_an_evaluation_on_a_full_disk_is_one_line_and_exit_1_with_the_run_s_files_kept(run, monkeypatch, capsys):
    """A write the file system refuses (ENOSPC) is not bad input: exit 1, as src.run and src.preprocess end on it (it
    was 2, the status of a bad setting), in one line naming the file and the cause, and results.json as it was."""
    import errno

    from src.evaluate import main as evaluate_main
    from src.utils import io

    before = (run / "results.json").read_bytes()

    def full(path, write, before_replace=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "atomic_write", full)
    assert evaluate_main([str(run), "eval.seed=7"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: OSError: [Errno 28] No space left on device: ")
    assert (run / "results.json").read_bytes() == before
