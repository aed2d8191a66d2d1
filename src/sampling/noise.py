"""Common random numbers: the initial noise of prompt k is the same for every recipe and setting (docs/sampling.md#common-random-numbers)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _index_seed(seed: int, k: int, stream: int | None = None) -> int:
    """A 64-bit seed for prompt index k, mixed from (seed, k) by numpy's SeedSequence (no collisions by offsets).
    stream: another stream for the same (seed, k), independent of the initial noise's (None); an integer >= 1, since
    SeedSequence ignores trailing zeros in its entropy ([seed, k, 0] is [seed, k]: stream 0 would be the noise's)."""
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, int) or stream < 1):
        raise ValueError(f"_index_seed: stream must be an integer >= 1 (0 repeats the initial noise's), got {stream!r}")
    entropy = [seed, k] if stream is None else [seed, k, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def initial_noise(
    n: int, shape: tuple[int, ...], seed: int, start: int = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Noise for prompt indices start .. start + n - 1, shape (n, *shape), on CPU; row k depends only on (seed, k)."""
    for name, value in (("n", n), ("seed", seed), ("start", start)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"initial_noise: {name} must be an integer >= 0, got {value!r}")
    shape = tuple(int(s) for s in shape)
    out = torch.empty((n, *shape), dtype=dtype)
    gen = torch.Generator()
    for i in range(n):
        gen.manual_seed(_index_seed(seed, start + i))
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return out
