"""The training's random streams: generators whose draws depend only on (seed, stream, global step).

Every random draw of a training step (timesteps, noise, conditioning dropout, the embedded datasets' batch indices,
the validation noise) comes from one of these, so a resumed run draws what an uninterrupted one draws and DDP over
any number of ranks sees the draws of one process (docs/training.md). Pure torch and numpy: the run directory's
checks read STREAMS without importing Lightning.
"""

from __future__ import annotations

import numpy as np
import torch


#: The random streams of training (step_generator): a step's times and dropout decisions, its noise, its batch's
#: data indices, and the fixed validation noise (its step: the validation batch's index).
TIMES, NOISE, DATA, VALIDATION = 0, 1, 2, 3
#: How new runs seed their streams (fingerprint.json "streams"; a run made before the key keeps version 1).
#: 2: (seed, stream, step) mixed by numpy's SeedSequence, so no two of them share a stream.
#: 1: seed * 1_000_003 + step, streams told apart by offsets of the seed or the step: they overlapped (on the CPU
#: seed s's noise was seed s + 3's times, its validation noise seed s + 1's first steps' times, and a step's data
#: indices the times of the step 17 later). Kept so that such runs resume exactly.
STREAMS = 2
_V1_OFFSETS = {TIMES: (0, 0), NOISE: (3, 0), DATA: (0, 17), VALIDATION: (1, 0)}  # (seed, step) offsets


def step_generator(seed: int, step: int, stream: int = TIMES, device: torch.device | str = "cpu",
                   streams: int = STREAMS) -> torch.Generator:
    """A generator whose draws depend only on (seed, stream, step), for the `streams` version of the run."""
    g = torch.Generator(device=device)
    if streams == 1:
        seed_offset, step_offset = _V1_OFFSETS[stream]
        g.manual_seed(((seed + seed_offset) * 1_000_003 + step + step_offset) % (2**63 - 1))
    elif streams == 2:
        g.manual_seed(int(np.random.SeedSequence([seed, stream, step]).generate_state(1, dtype=np.uint64)[0]))
    else:
        raise ValueError(f"streams={streams}: allowed versions are 1 and 2")
    return g
