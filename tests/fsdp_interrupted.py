"""`python -m src.run` whose training stops (raises) at a given step on every rank: an interrupted run under torchrun.

Usage: torchrun ... tests/fsdp_interrupted.py STEP key=value ...   (used by tests/test_fsdp.py)
"""

import sys

from src.training import module


class Interrupted(Exception):
    pass


def main() -> int:
    stop_at = int(sys.argv.pop(1))
    original = module.FormulationModule.training_step

    def training_step(self, batch, batch_idx):
        if self.global_step == stop_at:
            raise Interrupted(f"stopped at step {stop_at}")
        return original(self, batch, batch_idx)

    module.FormulationModule.training_step = training_step
    from src.run import cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
