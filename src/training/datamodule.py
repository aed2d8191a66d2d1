"""Lightning data module over the webdataset shards (embedded or precomputed real data)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from src.data.shards import load_eval_set, make_loader
from src.training.module import step_generator


class StepIndexedBatches(IterableDataset):
    """Infinite batches from in-memory tensors; the global batch of step k depends only on (seed, k).

    Rank r of `world` takes its slice of that global batch, so any number of ranks trains on the same samples.
    Iteration starts at `start_step()`, so a run resumed from a checkpoint sees the same batches as an
    uninterrupted one.
    """

    def __init__(self, tensors: dict, batch_size: int, seed: int, start_step: Callable[[], int],
                 rank: int = 0, world: int = 1):
        self.tensors, self.batch_size, self.seed, self.start_step = tensors, batch_size, seed, start_step
        self.rank, self.world = rank, world
        self.n = next(iter(tensors.values())).shape[0]

    def __iter__(self) -> Iterator[dict]:
        step = self.start_step()
        per_rank = self.batch_size // self.world
        while True:
            # Offset 17 keeps the data's stream apart from the step's own draws (t, noise, dropout).
            g = step_generator(self.seed, step + 17)
            idx = torch.randint(self.n, (self.batch_size,), generator=g)[self.rank * per_rank : (self.rank + 1) * per_rank]
            yield {k: v[idx] for k, v in self.tensors.items()}
            step += 1


class _FixedBatches(IterableDataset):
    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class ShardDataModule(L.LightningDataModule):
    """Training batches from `train_dir` (batch_size is global, split over ranks); a fixed validation batch."""

    def __init__(
        self,
        train_dir: str,
        eval_dir: str,
        batch_size: int,
        seed: int = 0,
        in_memory: bool = True,
        num_workers: int = 0,
        val_samples: int = 256,
    ):
        super().__init__()
        self.train_dir, self.eval_dir = train_dir, eval_dir
        self.batch_size, self.seed = batch_size, seed
        self.in_memory, self.num_workers, self.val_samples = in_memory, num_workers, val_samples
        self._train: dict | None = None
        self._val: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.in_memory and self._train is None:
            # Every rank holds the whole set (load_eval_set reads all shards, unsplit); ranks differ by seed.
            data = load_eval_set(self.train_dir)
            self._train = {k: data[k] for k in ("x0", "context", "pooled")}
        if self._val is None:
            ev = load_eval_set(self.eval_dir, n=self.val_samples)
            self._val = {k: ev[k] for k in ("x0", "context", "pooled")}

    def _global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(f"data.batch_size={self.batch_size}: the global batch must divide over {world} ranks")
        per_rank = self.batch_size // world
        if self.in_memory:
            ds = StepIndexedBatches(self._train, self.batch_size, self.seed, self._global_step, rank, world)
            return DataLoader(ds, batch_size=None, num_workers=0)
        loader = make_loader(
            self.train_dir, batch_size=per_rank, shuffle=True, seed=self.seed + self._global_step,
            resampled=True, epoch_batches=None, num_workers=self.num_workers,
        )
        return loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_FixedBatches([self._val]), batch_size=None, num_workers=0)
