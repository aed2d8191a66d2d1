"""Publish a rank report to Weights & Biases: offline unless WANDB_MODE or the user's W&B settings say otherwise."""
from __future__ import annotations

import configparser
import os
from pathlib import Path

import numpy as np

from src.launch.rundir import launch_configs
from src.ranking.paper import COLUMNS

DEFAULT_PROJECT = "flowsweep"


def wandb_mode() -> str | None:
    """None when WANDB_MODE is set (W&B reads it), else the mode in the user's W&B settings, else 'offline'."""
    if os.environ.get("WANDB_MODE"):
        return None
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    settings = configparser.ConfigParser()
    try:
        settings.read(config_dir / "settings")
    except configparser.Error:
        return "offline"
    return settings.get("default", "mode", fallback=None) or "offline"


def runs_wandb_target(run_dirs) -> tuple[str | None, str | None]:
    """(project, entity) the sweep's training runs logged to (logger.wandb of the first run directory's latest
    configuration with W&B on), so the report lands in their group; (None, None) when no run used W&B."""
    import yaml

    for run_dir in run_dirs:
        for path in launch_configs(run_dir):
            try:
                w = (yaml.safe_load(path.read_text()) or {})["logger"]["wandb"]
            except (OSError, yaml.YAMLError, KeyError, TypeError):
                continue
            if isinstance(w, dict) and w.get("enabled"):
                return w.get("project"), w.get("entity")
            break  # this run's latest launch did not use W&B
    return None, None


def publish_wandb(report, paths: dict[str, Path], project: str | None = None, label: str | None = None) -> str | None:
    """Log the rank tables, figures, sample sheets and the HTML report to one W&B run (group = sweep name); returns
    the run's files directory, None when W&B is disabled (WANDB_MODE=disabled: no run, no files). Sample sheets
    (samples_*.png, steps_cfg_*.png) go under samples/, other PNGs under figures/. label names the run (default: the
    sweep's name): a restricted report's (`aud-recipes=rf`), so that it is not taken for the full ranking."""
    import wandb

    from src.ranking.report import table1
    from src.utils.wandb_git import wandb_git_settings

    # Given explicitly, WANDB_MODE too: W&B's own reading of the environment is cached per process (wandb.setup).
    mode = os.environ.get("WANDB_MODE") or wandb_mode()
    # The training runs pass logger.wandb.project/entity explicitly (WANDB_PROJECT does not move them): the same here.
    run_project, entity = runs_wandb_target(report.sweep.runs["run_dir"]) if project is None else (None, None)
    run = wandb.init(
        project=project or run_project or os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
        entity=entity,
        group=report.sweep.name,
        job_type="rank-report",
        name=f"rank-report {label or report.sweep.name}",
        config={"sweeps": [str(r) for r in report.sweep.roots], "bootstrap_draws": report.draws, "seed": report.seed,
                "fifty_step": report.fifty_step_note, "report": label or report.sweep.name},
        # wandb_git_settings: the git remote URL without a token W&B would keep (src/utils/wandb_git.py).
        settings=wandb.Settings(console="off", **({"mode": mode} if mode else {}), **wandb_git_settings()),
    )
    if getattr(run, "disabled", False):  # a no-op run: its files directory is never created
        wandb.finish()
        return None
    try:
        shown = table1(report)
        pngs = {name: Path(p) for name, p in paths.items() if Path(p).suffix == ".png"}
        sample = lambda name: name.startswith(("samples_", "steps_cfg_"))  # noqa: E731
        html = Path(paths["report_html"]) if "report_html" in paths else None
        run.log({
            "rank_table": wandb.Table(columns=shown.headers, data=shown.rows),
            "average_rank_table": wandb.Table(dataframe=report.table.reset_index().astype(str)),
            **{f"{'samples' if sample(name) else 'figures'}/{name}": wandb.Image(str(p)) for name, p in pngs.items()},
            **({"report": wandb.Html(html, inject=False)} if html is not None and html.is_file() else {}),
        })
        for row in report.spearman.itertuples(index=False):
            if np.isfinite(row.spearman):
                run.summary[f"spearman_vs_paper/{row.column}"] = row.spearman
        best = report.table.index[0]
        run.summary["best_recipe"] = best
        for column in COLUMNS:
            run.summary[f"best_average_rank/{column}"] = float(report.table.loc[best, column])
        run.summary["partial_sweep"] = report.sweep.partial
        return str(run.dir)
    finally:
        wandb.finish()
