"""Entry point: `python -m src.run [-m] key=value ...` trains and evaluates recipes (Hydra multirun = a sweep).

A failing job in a multirun writes error.json into its run directory and the sweep goes on; the command ends
with a summary of the failed jobs and a non-zero exit. Configuration errors are one line, before any work.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from src.config import ConfigError, register_resolvers
from src.utils.io import atomic_write_json

register_resolvers()
log = logging.getLogger(__name__)

#: Jobs of this process that failed: (run name, one-line error). Read after Hydra returns.
FAILED: list[tuple[str, str]] = []


def _finish_wandb() -> None:
    # A W&B run left open would swallow the next multirun job's logs (PITFALLS).
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    from src.training.job import run_job

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    error_file = run_dir / "error.json"
    error_file.unlink(missing_ok=True)
    try:
        return run_job(cfg, run_dir)
    except Exception as e:  # recorded per job so the rest of the sweep goes on
        one_line = f"{type(e).__name__}: {e}".splitlines()[0]
        atomic_write_json(error_file, {"type": type(e).__name__, "error": str(e), "traceback": traceback.format_exc()})
        if not isinstance(e, ConfigError):
            log.error("%s failed:\n%s", cfg.run_name, traceback.format_exc())
        FAILED.append((str(cfg.run_name), one_line))
        if cfg.fail_fast and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        return None
    finally:
        _finish_wandb()


def cli() -> int:
    main()
    if FAILED:
        print(f"{len(FAILED)} job(s) failed:", file=sys.stderr)
        for name, err in FAILED:
            print(f"  {name}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
