"""Lightning data module over the webdataset shards (embedded or precomputed real data).

Which samples a training step sees is a function of (seed, step, rank, world size) only, in memory and streaming
alike: step k draws the indices of its global batch from a generator seeded by (seed, k) (the data's own stream),
rank r of `world` takes rows [r B/world, (r+1) B/world) of it, and loader worker w of W produces the steps
k = w (mod W). So
- a run resumed at step k sees the batches an uninterrupted run sees from step k on (exact resume);
- ranks hold disjoint slices of the one global batch a single process would draw (DDP = one process);
- workers split the steps, never the samples of a step, and no two workers produce the same step;
- streaming (`in_memory=false`: each worker reads the samples it needs from the shard files) and in-memory
  training see identical batches, bit for bit.
Indices are drawn uniformly with replacement, as the in-memory path always has.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from src.data.shards import ShardSamples, load_eval_set, read_meta
from src.launch.preemption import submitit_signal
from src.training.streams import DATA, STREAMS, step_generator

log = logging.getLogger(__name__)


def global_batch_indices(seed: int, step: int, batch_size: int, n: int, streams: int = STREAMS) -> torch.Tensor:
    """The dataset indices of step `step`'s global batch (uniform, with replacement); streams: the run's version
    of step_generator."""
    return torch.randint(n, (batch_size,), generator=step_generator(seed, step, DATA, streams=streams))


class InMemorySamples:
    """A dict of equally long tensors, indexed like ShardSamples."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def batch(self, indices: torch.Tensor) -> dict:
        return {k: v[indices] for k, v in self.tensors.items()}


class StepIndexedBatches(IterableDataset):
    """Infinite batches for this rank from step `start_step` on; see the module docstring.

    source: a dict of tensors (in memory) or anything with `len()` and `batch(indices) -> dict` (ShardSamples).
    Under a DataLoader with W workers, worker w yields steps start + w, start + w + W, ...; the DataLoader takes
    one batch from each worker in turn, so the batches arrive in step order.
    """

    def __init__(self, source, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 streams: int = STREAMS):
        if batch_size % world:
            raise ValueError(f"data.batch_size={batch_size}: the global batch must divide over {world} ranks")
        self.source = InMemorySamples(source) if isinstance(source, dict) else source
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.rank, self.world, self.streams = rank, world, streams
        self.n = len(self.source)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's rows of step `step`'s global batch."""
        per_rank = self.batch_size // self.world
        indices = global_batch_indices(self.seed, step, self.batch_size, self.n, self.streams)
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.source.batch(self.indices(step))
            step += workers


def job_signals() -> set[signal.Signals]:
    """The signals a job's every process receives: Ctrl-C, scancel's SIGTERM and submitit's preemption signal."""
    return {signal.SIGINT, signal.SIGTERM, submitit_signal()} - {None}


def ignore_job_signals(worker_id: int | None = None) -> None:
    """Loader workers leave interrupts and preemption to the training process (their worker_init_fn).

    SLURM signals every process of a job (preemption: submitit's SIGUSR2, scancel: SIGTERM) and Ctrl-C reaches the
    whole process group. The training process answers each at a step boundary with a checkpoint
    (src/launch/preemption.py); a worker that died of the signal, or ran submitit's requeue handler itself, would
    fail the fit before that boundary. The workers stop when the training process shuts the loader down, or, if it
    is killed, when their watchdog sees it gone. A worker starts with these signals blocked (StepLoader.__iter__):
    one that came before this function ran waits, and is discarded here, once ignored, as the block is lifted.
    """
    signals = job_signals()
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


class StepLoader(DataLoader):
    """A DataLoader whose every iteration starts at the trainer's current step.

    The start is read here, in the main process, when iteration begins (after Lightning restored a checkpoint),
    and travels to the workers as a plain number. Workers are not persistent: a new iteration (a resumed fit, a new
    epoch) starts fresh workers at the new step, never workers that are still at the old one. An iteration lasts
    the whole fit (the stream is endless), so persistent workers would save nothing.
    """

    def __init__(self, dataset: StepIndexedBatches, start_step: Callable[[], int], num_workers: int = 0):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False,
                         pin_memory=torch.cuda.is_available(), prefetch_factor=2 if num_workers else None,
                         worker_init_fn=ignore_job_signals if num_workers else None)
        self._start_step = start_step

    def __iter__(self):
        self.dataset.start_step = int(self._start_step())
        if not self.num_workers:
            return super().__iter__()
        # The workers start here (forked with this thread's signal mask). Blocked, a job signal that reaches a worker
        # before its worker_init_fn (ignore_job_signals) ran waits instead of killing it; this process receives its
        # own copy of the signal as soon as the block is lifted below.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, job_signals())
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _FixedBatches(IterableDataset):
    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class ShardDataModule(L.LightningDataModule):
    """Training batches from `train_dir` (batch_size is global, split over ranks); a fixed validation batch.

    in_memory: load the training split once per rank (the embedded data); otherwise stream it from the shard files
    with `num_workers` loader processes per rank. Both give the same batches (module docstring).
    """

    def __init__(
        self,
        train_dir: str,
        eval_dir: str,
        batch_size: int,
        seed: int = 0,
        in_memory: bool = True,
        num_workers: int = 0,
        val_samples: int = 256,
        streams: int = STREAMS,
    ):
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} is not allowed; need >= 0")
        self.train_dir, self.eval_dir = train_dir, eval_dir
        self.batch_size, self.seed, self.streams = batch_size, seed, streams
        self.in_memory, self.num_workers, self.val_samples = in_memory, num_workers, val_samples
        self._train = None
        self._val: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            if self.in_memory:
                # Every rank holds the whole set (load_eval_set reads all shards, unsplit); ranks take their rows.
                data = load_eval_set(self.train_dir)
                self._train = {k: data[k] for k in ("x0", "context", "pooled")}
            else:
                self._train = ShardSamples(self.train_dir)  # the index of where each sample lies; no data read
                log.info("streaming %d training samples from %s with %d loader worker(s)",
                         len(self._train), self.train_dir, self.num_workers)
        if self._val is None:  # normalised as the training split, whatever the evaluation folder's statistics
            ev = load_eval_set(self.eval_dir, n=self.val_samples, stats=read_meta(self.train_dir))
            self._val = {k: ev[k] for k in ("x0", "context", "pooled")}

    def _global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        ds = StepIndexedBatches(self._train, self.batch_size, self.seed, 0, rank, world, self.streams)
        # In memory, the batch is a tensor index: workers would only add copies between processes.
        return StepLoader(ds, self._global_step, num_workers=0 if self.in_memory else self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_FixedBatches([self._val]), batch_size=None, num_workers=0)
