"""Report figures (matplotlib, no pyplot state): Pareto fronts, average ranks, metrics versus sampling steps."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from src.ranking.aggregate import control_settings, setting_label
from src.ranking.paper import COLUMNS
from src.utils.io import atomic_write_bytes

MAX_NAMED_POINTS = 8  # above this many recipes per panel, points show only their front index


def save_figure(fig: Figure, path: Path | str, dpi: int = 110) -> Path:
    """Write a figure as PNG atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_pareto_fronts(ranked: pd.DataFrame, ncols: int = 4) -> Figure:
    """One panel per control setting: FID (x, lower better) vs CLIP score (y, higher better), fronts numbered."""
    settings = control_settings(ranked)
    n = max(len(settings), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.6 * nrows))  # fixed spacing: constrained layout is slow on many panels
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    max_front = int(ranked["front"].max()) if len(ranked) else 1
    cmap = _colormap("viridis_r")
    for ax, setting in zip(axes, settings.itertuples(index=False)):
        same = (ranked["dataset"] == setting.dataset) & (ranked["setting"] == setting.setting)
        part = ranked[same & (ranked["ema"] == setting.ema)]
        named = part["recipe"].nunique() <= MAX_NAMED_POINTS
        for front, group in part.groupby("front"):
            color = cmap((front - 1) / max(max_front - 1, 1))
            group = group.sort_values("fid_clip")
            ax.step(group["fid_clip"], group["clip_score"], where="post", color=color, alpha=0.5, lw=1)
            ax.scatter(group["fid_clip"], group["clip_score"], color=color, s=28, zorder=3)
            for row in group.itertuples(index=False):
                text = f"{front}: {row.recipe}" if named else str(front)
                ax.annotate(text, (row.fid_clip, row.clip_score), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(setting_label(setting.dataset, setting.setting, setting.ema), fontsize=8)
        ax.set_xlabel("FID (CLIP features), lower better", fontsize=7)
        ax.set_ylabel("CLIP score, higher better", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.margins(x=0.2, y=0.1)  # room for the labels of the extreme points
    for ax in axes[len(settings):]:
        ax.set_axis_off()
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=1 - 0.5 / (3.6 * nrows), wspace=0.3, hspace=0.45)
    fig.suptitle("Non-dominated fronts per control setting (front index at each point)", fontsize=10)
    return fig


def plot_average_ranks(table: pd.DataFrame) -> Figure:
    """Average rank per recipe for all / 5-step / 50-step settings, with bootstrap intervals where present."""
    recipes = list(table.index)
    fig = Figure(figsize=(7.5, 0.35 * len(recipes) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(recipes))
    for k, column in enumerate(COLUMNS):
        values = table[column].to_numpy(float)
        yk = y + (k - 1) * 0.22
        points = ax.plot(values, yk, "o", ms=4, label=column)[0]
        if f"{column} lo" in table:
            # The interval is drawn as is: a percentile interval of a rank need not contain the point value.
            ax.hlines(yk, table[f"{column} lo"], table[f"{column} hi"], color=points.get_color(), lw=1.5)
    ax.set_yticks(y, recipes, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("average rank (mean non-dominated front), lower better")
    ax.legend(fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)
    return fig


def steps_cfg(records: pd.DataFrame) -> float | None:
    """The CFG scale with the most distinct step counts (the steps sweep; 5.0 in the study), ties to the largest."""
    if records.empty:
        return None
    counts = records.groupby("cfg")["steps"].nunique()
    return float(counts[counts == counts.max()].index.max())


def plot_metrics_vs_steps(records: pd.DataFrame, cfg: float | None = None) -> Figure:
    """CLIP score and FID versus sampling steps per recipe at one CFG scale; EMA solid, raw weights dashed."""
    cfg = steps_cfg(records) if cfg is None else float(cfg)
    part = records[np.isclose(records["cfg"], cfg)] if cfg is not None else records
    datasets = sorted(part["dataset"].unique()) or ["(none)"]
    fig = Figure(figsize=(9, 3.2 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    recipes = sorted(part["recipe"].unique())
    colors = {r: _colormap("tab20")(i % 20) for i, r in enumerate(recipes)}
    for row_axes, dataset in zip(axes, datasets):
        data = part[part["dataset"] == dataset]
        for (recipe, ema), group in data.groupby(["recipe", "ema"]):
            group = group.sort_values("steps")
            style = dict(color=colors[recipe], ls="-" if ema else "--", marker="o", ms=3)
            row_axes[0].plot(group["steps"], group["clip_score"], label=recipe if ema else None, **style)
            row_axes[1].plot(group["steps"], group["fid_clip"], **style)
        for ax, name in zip(row_axes, ("CLIP score (higher better)", "FID, CLIP features (lower better)")):
            ax.set_xscale("log")
            ticks = sorted(data["steps"].unique())
            if ticks:
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
            ax.set_xlabel("sampling steps")
            ax.set_title(f"{dataset}: {name}", fontsize=9)
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="outside right upper")
    cfg_text = f"CFG {cfg:g}" if cfg is not None else "no records"
    fig.suptitle(f"Metrics versus sampling steps at {cfg_text} (EMA solid, raw dashed)", fontsize=10)
    return fig


def _colormap(name: str):
    """A matplotlib colormap by name."""
    from matplotlib import colormaps

    return colormaps[name]
