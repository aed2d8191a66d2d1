"""Streaming training from shard files (data.in_memory=false): the same batches as in memory, step for step.

Which samples a step sees depends only on (seed, step, rank, world size): loader workers split the steps, ranks
split each step's global batch, and a resumed run starts at its restored step (src/training/datamodule.py).
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from src.config import register_resolvers
from src.data import shards as shards_lib
from src.data.shards import INDEX_FILE, ShardSamples, build_index, load_eval_set, load_index, write_shards
from src.training.datamodule import ShardDataModule, StepIndexedBatches, StepLoader
from src.training.job import run_job
from tests.test_training import Interrupt, interrupt_at

register_resolvers()

N = 53  # samples, in shards of 10 (the last one short)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Latent-like training and evaluation shard folders (4x8x8 latents, 6x16 contexts, 8 pooled)."""
    root = tmp_path_factory.mktemp("streaming")
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", N), ("eval", 12)):
        write_shards(root / name, torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 6, 16, generator=g),
                     torch.randn(n, 8, generator=g), [f"caption {i}" for i in range(n)],
                     encoder_names=["enc"], samples_per_shard=10)
    return root


def in_memory(folder) -> dict:
    ev = load_eval_set(folder)
    return {k: ev[k] for k in ("x0", "context", "pooled")}


def assert_same_batches(a, b, steps: int) -> None:
    for step, x, y in zip(range(steps), a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (step, k)


def test_a_sample_read_from_its_shard_is_the_sample_in_memory(folders):
    samples, memory = ShardSamples(folders / "train"), in_memory(folders / "train")
    assert len(samples) == N
    idx = torch.tensor([52, 0, 9, 10, 10, 31])  # shard boundaries, the short last shard, a repeat
    assert_same_batches([samples.batch(idx)], [{k: v[idx] for k, v in memory.items()}], 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_loader_gives_the_in_memory_batches_from_any_start(folders, workers):
    memory = in_memory(folders / "train")
    stream = StepLoader(StepIndexedBatches(ShardSamples(folders / "train"), 8, seed=5), lambda: 7, workers)
    assert_same_batches(StepIndexedBatches(memory, 8, seed=5, start_step=7), stream, 6)
    # Iterating again (a resumed fit, a new epoch) starts fresh workers at the step current then.
    start = {"step": 7}
    stream = StepLoader(StepIndexedBatches(ShardSamples(folders / "train"), 8, seed=5), lambda: start["step"], workers)
    first = [b["x0"] for _, b in zip(range(3), stream)]
    start["step"] = 11
    again = [b["x0"] for _, b in zip(range(3), stream)]
    expect = [next(iter(StepIndexedBatches(memory, 8, seed=5, start_step=s)))["x0"] for s in (7, 8, 9, 11, 12, 13)]
    assert len(first + again) == 6 and all(torch.equal(x, y) for x, y in zip(first + again, expect))


def test_ranks_and_workers_split_steps_not_samples(folders):
    samples = ShardSamples(folders / "train")
    whole = StepIndexedBatches(samples, 8, seed=2)
    ranks = [StepLoader(StepIndexedBatches(samples, 8, seed=2, rank=r, world=2), lambda: 0, num_workers=2)
             for r in range(2)]
    for step, full, part0, part1 in zip(range(5), whole, *ranks):
        assert part0["x0"].shape[0] == part1["x0"].shape[0] == 4
        # Rank r holds rows 4r .. 4r+3 of the one global batch: disjoint positions, together one process's batch.
        assert torch.equal(torch.cat([part0["x0"], part1["x0"]]), full["x0"]), step
    assert whole.indices(3).tolist() != whole.indices(4).tolist()  # each step its own draw, whichever worker reads it


def test_a_steps_indices_are_drawn_from_the_data_stream_of_the_runs_version():
    """Uniform over all n samples (the last one too), from the DATA stream of the run's streams version: another
    stream or version would resume an existing run with other batches, which no resume test on today's code sees."""
    from src.training.datamodule import global_batch_indices
    from src.training.streams import DATA, step_generator

    for streams in (1, 2):
        for step in (0, 5):
            want = torch.randint(7, (16,), generator=step_generator(3, step, DATA, streams=streams))
            assert torch.equal(global_batch_indices(3, step, 16, 7, streams=streams), want), (streams, step)
            batches = StepIndexedBatches({"x0": torch.zeros(7, 1)}, 16, seed=3, streams=streams)
            assert torch.equal(batches.indices(step), want), (streams, step)
    assert set(torch.cat([global_batch_indices(0, k, 16, 5) for k in range(10)]).tolist()) == set(range(5))


def test_the_datamodule_gives_each_rank_its_rows_of_the_trainers_step(folders):
    from types import SimpleNamespace

    dm = ShardDataModule(str(folders / "train"), str(folders / "eval"), batch_size=8, seed=4, val_samples=4)
    dm.setup()
    whole = next(iter(StepIndexedBatches(in_memory(folders / "train"), 8, seed=4, start_step=3)))["x0"]
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=3)
        assert torch.equal(next(iter(dm.train_dataloader()))["x0"], whole[4 * rank:4 * rank + 4]), rank
    with pytest.raises(ValueError, match="data.batch_size=9: the global batch must divide over 2 ranks"):
        StepIndexedBatches({"x0": torch.zeros(3, 1)}, 9, seed=0, world=2)


def test_datamodule_streams_when_not_in_memory(folders):
    dm = ShardDataModule(str(folders / "train"), str(folders / "eval"), batch_size=8, in_memory=False, num_workers=2,
                         val_samples=4)
    dm.setup()
    assert isinstance(dm._train, ShardSamples)
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and not loader.persistent_workers
    with pytest.raises(ValueError, match="data.num_workers=-1"):
        ShardDataModule("a", "b", 8, num_workers=-1)


def test_the_evaluation_split_is_normalised_as_the_training_split(folders):
    """The model takes latents normalised by the training split's statistics, and the evaluation decodes with them:
    an evaluation folder written with its own (preprocessed without --stats-from; these folders are) gave the
    validation loss other inputs, and latent FID references un-normalised with the wrong statistics."""
    train, own = shards_lib.read_meta(folders / "train"), shards_lib.read_meta(folders / "eval")
    assert (own["latent_mean"], own["latent_std"]) != (train["latent_mean"], train["latent_std"])
    raw = load_eval_set(folders / "eval")["x0"] * own["latent_std"] + own["latent_mean"]
    dm = ShardDataModule(str(folders / "train"), str(folders / "eval"), batch_size=8, val_samples=4)
    dm.setup()
    expect = (raw[:4] - train["latent_mean"]) / train["latent_std"]
    torch.testing.assert_close(dm._val["x0"], expect, rtol=1e-5, atol=1e-5)
    ev = load_eval_set(folders / "eval", stats=train)
    torch.testing.assert_close(ev["x0"], (raw - train["latent_mean"]) / train["latent_std"], rtol=1e-5, atol=1e-5)
    assert ev["meta"] == own
    # The pixels it holds (identity autoencoder) are decoded with the statistics it was normalised by.
    torch.testing.assert_close(ev["images"], raw, rtol=1e-5, atol=1e-5)
    # What the evaluation decodes its FID references from: the decoder un-normalises with the training statistics.
    torch.testing.assert_close(shards_lib.decode_latents(ev["x0"], train), raw, rtol=1e-5, atol=1e-5)


# ---- training ---------------------------------------------------------------------------------------------------
def train(folders, tmp_path, name, *overrides):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "data=shards", f"data.train_dir={folders / 'train'}", f"data.eval_dir={folders / 'eval'}",
            "data.batch_size=8", "data.val_samples=4", "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
            "train.max_steps=8", "train.val_every=3", "train.ckpt_every=4", "train.ema_every=2",
            "optim.warmup_steps=1", "eval.enabled=false", "logger=csv", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu", f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides])
    run_job(cfg, tmp_path / name)
    ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["global_step"]


def test_streaming_run_interrupted_and_resumed_equals_uninterrupted_in_memory_run(folders, tmp_path, monkeypatch):
    """Two worker processes, validation every 3 steps, interrupted at step 6 (last checkpoint at 4), resumed."""
    memory, step_m = train(folders, tmp_path, "memory", "data.in_memory=true", "data.num_workers=0")

    interrupt_at(monkeypatch, 6)
    streaming = ["data.in_memory=false", "data.num_workers=2"]
    with pytest.raises(Interrupt):
        train(folders, tmp_path, "stream", *streaming)
    monkeypatch.undo()
    stream, step_s = train(folders, tmp_path, "stream", *streaming)

    assert step_m == step_s == 8
    assert memory.keys() == stream.keys() and any(k.startswith("ema_backbone.") for k in memory)
    for k in memory:
        assert torch.equal(memory[k], stream[k]), k


@pytest.mark.parametrize("first, second", [(3, 0), (0, 3)])
def test_a_streaming_run_resumes_exactly_under_another_number_of_loader_workers(folders, tmp_path, monkeypatch,
                                                                                first, second):
    """data.num_workers is a throughput setting, not in the fingerprint: a run interrupted at step 5 (last
    checkpoint at 4, which 3 workers do not divide) and resumed with another number of workers ends with the weights
    of an uninterrupted in-memory run."""
    memory, _ = train(folders, tmp_path, "memory", "data.in_memory=true", "data.num_workers=0")
    interrupt_at(monkeypatch, 5)
    with pytest.raises(Interrupt):
        train(folders, tmp_path, "stream", "data.in_memory=false", f"data.num_workers={first}")
    monkeypatch.undo()
    stream, step = train(folders, tmp_path, "stream", "data.in_memory=false", f"data.num_workers={second}")
    assert step == 8 and memory.keys() == stream.keys()
    for k in memory:
        assert torch.equal(memory[k], stream[k]), k

def test_shards_with_pax_headers_are_indexed_too(folders, tmp_path):
    """Shards written by other tools (PAX extended headers) fall back to tarfile's header parser."""
    import io
    import shutil
    import tarfile

    copy = tmp_path / "pax"
    shutil.copytree(folders / "train", copy)
    src, dst = folders / "train" / "shard-000001.tar", copy / "shard-000001.tar"
    with tarfile.open(src) as old, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as new:
        for member in old:
            data = old.extractfile(member).read()
            member.pax_headers = {"comment": "written elsewhere"}
            new.addfile(member, io.BytesIO(data))
    idx = torch.arange(N)
    assert load_index(copy, shards_lib.shard_paths(copy)) is None  # the copied index no longer fits that shard
    assert_same_batches([ShardSamples(copy).batch(idx)], [ShardSamples(folders / "train").batch(idx)], 1)


def test_shards_whose_samples_lack_a_training_member_are_named(folders, tmp_path):
    import io
    import tarfile

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(folders / "train" / "shard-000001.tar") as old, tarfile.open(shard, "w") as new:
        for member in old:
            if member.name != "000000013.pooled.npy":
                new.addfile(member, io.BytesIO(old.extractfile(member).read()))
    with pytest.raises(ValueError, match=rf"^{shard}: sample 000000013 lacks pooled.npy; not a training shard$"):
        build_index([str(shard)])


def test_the_writer_indexes_the_samples_so_streaming_starts_without_reading_tar_headers(folders, monkeypatch):
    """index.npz (written before meta.json) is what the header scan would find; with it no header is read."""
    train = folders / "train"
    paths = shards_lib.shard_paths(train)
    index, scanned = load_index(train, paths), build_index(paths)
    assert index is not None and index.keys() == scanned.keys()
    for key in index:
        assert (index[key] == scanned[key]).all(), key
    monkeypatch.setattr(shards_lib, "_scan_tar", lambda path: pytest.fail(f"read the headers of {path}"))
    idx = torch.tensor([52, 0, 9, 10, 10, 31])
    assert_same_batches([ShardSamples(train).batch(idx)], [{k: v[idx] for k, v in in_memory(train).items()}], 1)


@pytest.mark.parametrize("layout_checks_out", [True, False])
def test_the_writer_knows_where_it_wrote_each_sample(tmp_path, monkeypatch, layout_checks_out):
    """The writer's index comes from the sizes it wrote, not from reading its shards back; where a sample's layout
    does not check out against the tar stream (another header format), it scans the shards instead. Same index."""
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(23, 4, 8, 8, generator=g), torch.randn(23, 6, 16, generator=g), torch.randn(23, 8, generator=g),
            [f"caption {i}" for i in range(23)])
    scans = []
    real_scan = shards_lib._scan_tar
    monkeypatch.setattr(shards_lib, "_scan_tar", lambda path: scans.append(path) or real_scan(path))
    if not layout_checks_out:  # the writer's arithmetic misses where the stream ended (as for PAX headers)
        record = shards_lib.ShardWriter._record_layout
        monkeypatch.setattr(shards_lib.ShardWriter, "_record_layout", lambda self, pos, sample: record(self, pos + 1,
                                                                                                       sample))
    write_shards(tmp_path / "s", *args, encoder_names=["enc"], samples_per_shard=10)
    assert bool(scans) is not layout_checks_out
    paths = shards_lib.shard_paths(tmp_path / "s")
    index, scanned = load_index(tmp_path / "s", paths), build_index(paths)
    assert index is not None and all((index[k] == scanned[k]).all() for k in scanned)


@pytest.mark.parametrize("damage", ["missing", "truncated", "foreign"])
def test_a_folder_without_a_usable_index_is_scanned(folders, tmp_path, damage):
    """Folders written before index.npz existed, or whose index is damaged, read the tar headers instead."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders / "train", copy)
    index = copy / INDEX_FILE
    if damage == "missing":
        index.unlink()
    elif damage == "truncated":
        index.write_bytes(index.read_bytes()[:100])
    else:
        import numpy as np
        np.savez(index, something=np.zeros(3))
    assert load_index(copy, shards_lib.shard_paths(copy)) is None
    idx = torch.arange(N)
    assert_same_batches([ShardSamples(copy).batch(idx)], [in_memory(folders / "train")], 1)


def test_a_folder_of_more_shards_than_the_open_file_limit_streams(tmp_path):
    """Real folders hold thousands of shards (ImageNet 1,281, CC12M about 12,000 of 1,000 samples) and a step's
    random samples touch most of them: a reader keeping every shard it read open ran out of file descriptors
    (OSError: Too many open files, at a soft limit of 1,024) within the first steps. Here one-sample shards, 20 more
    than the descriptors left under a lowered limit."""
    import os
    import resource

    fds = list(map(int, os.listdir("/proc/self/fd")))
    limit = max(fds) + 1 + 72  # room for the reader's MAX_OPEN_SHARDS (64) and a few more
    n = limit - len(fds) + 20
    g = torch.Generator().manual_seed(3)
    write_shards(tmp_path / "many", torch.randn(n, 1, 2, 2, generator=g), torch.randn(n, 2, 4, generator=g),
                 torch.randn(n, 4, generator=g), ["c"] * n, encoder_names=["enc"], samples_per_shard=1)
    samples, idx = ShardSamples(tmp_path / "many"), torch.arange(n).flip(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        batch = samples.batch(idx)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        samples.close()
    assert_same_batches([batch], [{k: v[idx] for k, v in in_memory(tmp_path / "many").items()}], 1)


def test_a_shard_damaged_at_its_recorded_size_is_named_when_read(folders, tmp_path):
    """Bytes overwritten in place (a copy preallocated and cut short, a disk error) keep meta.json's sizes, so the
    checks before launching pass: the reader names the shard and the sample, not only 'bad magic bytes'."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders / "train", copy)
    shard = copy / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)  # the second half zeroed, the size kept
    shard.write_bytes(bytes(data))
    samples = ShardSamples(copy)
    samples.batch(torch.tensor([20]))  # the first sample of the shard is intact
    with pytest.raises(ValueError, match=rf"^{shard}: sample 29 at byte \d+ is not what index.npz records \(npy"):
        samples.batch(torch.tensor([29]))


def test_a_folder_whose_shards_hold_another_count_than_meta_json_is_refused(folders, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folders / "train", copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "count": N + 1}))
    with pytest.raises(ValueError, match=rf"the shards hold {N} samples, meta.json says {N + 1}; rebuild the folder"):
        ShardSamples(copy)


def test_loader_workers_leave_job_signals_to_the_training_process(folders, monkeypatch):
    """SLURM signals every process of a job and Ctrl-C the whole process group: the workers ignore SIGINT, SIGTERM
    and submitit's preemption signal, so the fit reaches its checkpoint at the next step boundary."""
    import os
    import signal
    import time

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # a submitit SLURM job: its preemption signal is SIGUSR2
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    memory = in_memory(folders / "train")
    loader = StepLoader(StepIndexedBatches(ShardSamples(folders / "train"), 8, seed=5), lambda: 0, 2)
    for when in ("while the workers start", "once they run"):
        it = iter(loader)
        batches = [next(it)] if when == "once they run" else []
        for worker in it._workers:  # while starting: before their worker_init_fn ran (the signals wait, blocked)
            for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
                os.kill(worker.pid, signum)
        time.sleep(0.5)
        assert all(w.is_alive() for w in it._workers), when
        batches += [next(it) for _ in range(6 - len(batches))]
        assert_same_batches(StepIndexedBatches(memory, 8, seed=5), batches, 6)
        del it


@pytest.mark.parametrize("key", ["train_dir", "eval_dir"])
@pytest.mark.parametrize("meta, problem", [("{not json", "meta.json is not JSON"),
                                           ("[]", "meta.json is not a JSON object"),
                                           ('{"count": 3}', r"is incomplete \(meta.json lacks complete: true\)")],
                         ids=["not json", "not an object", "not complete"])
def test_a_meta_json_that_is_not_a_shard_folders_is_a_config_error_naming_the_setting(folders, tmp_path, key, meta,
                                                                                      problem):
    """Before, json's own message (`Expecting property name ...: line 1 column 2 (char 1)`) named neither the
    setting nor the file, and the other two were not the job's one-line refusal naming the setting."""
    import shutil

    from src.config import ConfigError
    from src.training.prepare import check_data

    copy = tmp_path / "copy"
    shutil.copytree(folders / key.split("_")[0], copy)
    (copy / "meta.json").write_text(meta)
    dirs = {"train_dir": folders / "train", "eval_dir": folders / "eval", key: copy}
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=shards", f"data.train_dir={dirs['train_dir']}",
                                                        f"data.eval_dir={dirs['eval_dir']}", "data.val_samples=4"])
    with pytest.raises(ConfigError, match=rf"^data.{key}={copy}: shard folder {copy}('s)? .*{problem}") as info:
        check_data(cfg)
    assert "\n" not in str(info.value)
