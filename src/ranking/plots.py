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

# Okabe and Ito's colour-blind-safe palette; every series also gets its own marker, so colour is never the only cue.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
# Fronts: front 1 stands out (dark vermillion, large filled marker, thick solid line); later fronts are cooler and
# lighter, and beyond the fifth they are grey.
FRONT_STYLES = (("#D55E00", "*"), ("#0072B2", "s"), ("#009E73", "^"), ("#CC79A7", "D"), ("#E69F00", "v"))
LATER_FRONT = ("#7f7f7f", "o")
TEXT = {"title": 12, "label": 11, "tick": 10, "note": 9}  # font sizes (points) at the saved size


def front_style(front: int) -> tuple[str, str]:
    """(colour, marker) of a front index (1-based)."""
    return FRONT_STYLES[front - 1] if 1 <= front <= len(FRONT_STYLES) else LATER_FRONT


def series_style(i: int) -> tuple[str, str]:
    """(colour, marker) of the i-th recipe: Okabe-Ito colours, then tab10's, each with its own marker."""
    colours = OKABE_ITO if i < len(OKABE_ITO) else tuple(_colormap("tab10").colors)
    return colours[i % len(colours)], MARKERS[i % len(MARKERS)]


def save_figure(fig: Figure, path: Path | str, dpi: int = 110) -> Path:
    """Write a figure as PNG atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_pareto_fronts(ranked: pd.DataFrame, ncols: int = 3) -> Figure:
    """One panel per control setting: FID (x, lower better) vs CLIP score (y, higher better), fronts numbered.

    Each front has its own colour and marker (front 1: large vermillion stars on a thick line); a legend explains
    them once, under the title.
    """
    settings = control_settings(ranked)
    n = max(len(settings), 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    panel_w, panel_h, head_in, foot_in = 5.0, 4.2, 1.25, 0.1  # inches; head: title and legend above the panels
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + head_in + foot_in))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, setting in zip(axes, settings.itertuples(index=False)):
        same = (ranked["dataset"] == setting.dataset) & (ranked["setting"] == setting.setting)
        part = ranked[same & (ranked["ema"] == setting.ema)]
        named = part["recipe"].nunique() <= MAX_NAMED_POINTS
        # Entries whose CLIP score or FID is not finite (diverged samples) have no point: named in the panel instead.
        bad = ~np.isfinite(part[["clip_score", "fid_clip"]].to_numpy(float)).all(axis=1)
        if bad.any():
            front = int(part["front"][bad].max())
            names = ", ".join(sorted(part["recipe"][bad])) if named else f"{int(bad.sum())} entries"
            ax.text(0.02, 0.02, f"{front}: {names} (not finite, not drawn)", transform=ax.transAxes,
                    fontsize=TEXT["note"], ha="left", va="bottom", color=front_style(front)[0], wrap=True)
            part = part[~bad]
        for front, group in part.groupby("front"):
            front = int(front)
            color, marker = front_style(front)
            first = front == 1
            group = group.sort_values("fid_clip")
            ax.step(group["fid_clip"], group["clip_score"], where="post", color=color, alpha=0.9 if first else 0.5,
                    lw=2.2 if first else 1.0, ls="-" if first else "--", zorder=2)
            ax.scatter(group["fid_clip"], group["clip_score"], color=color, marker=marker, s=140 if first else 50,
                       edgecolors="black", linewidths=0.6, zorder=4 if first else 3)
            lo, hi = part["fid_clip"].min(), part["fid_clip"].max()
            for row in group.itertuples(index=False):
                text = f"{front}: {row.recipe}" if named else str(front)
                right = hi > lo and row.fid_clip > (lo + hi) / 2  # labels point inwards, away from the panel edge
                ax.annotate(text, (row.fid_clip, row.clip_score), fontsize=TEXT["note"], xytext=(-6 if right else 6, 4),
                            textcoords="offset points", ha="right" if right else "left",
                            fontweight="bold" if first else "normal")
        ax.set_title(setting_label(setting.dataset, setting.setting, setting.ema), fontsize=TEXT["label"])
        ax.set_xlabel("FID (CLIP features), lower better", fontsize=TEXT["label"])
        ax.set_ylabel("CLIP score, higher better", fontsize=TEXT["label"])
        ax.tick_params(labelsize=TEXT["tick"])
        ax.grid(alpha=0.25)
        ax.margins(x=0.25, y=0.12)  # room for the labels of the extreme points
    for ax in axes[len(settings):]:
        ax.set_axis_off()
    height = panel_h * nrows + head_in + foot_in
    fig.subplots_adjust(left=0.85 / (panel_w * ncols), right=1 - 0.2 / (panel_w * ncols),
                        bottom=(0.6 + foot_in) / height, top=1 - head_in / height, wspace=0.3, hspace=0.42)
    fig.suptitle("Non-dominated fronts per control setting (front index at each point)", fontsize=TEXT["title"] + 1,
                 y=1 - 0.12 / height, va="top")
    from matplotlib.lines import Line2D

    shown = sorted({min(int(f), len(FRONT_STYLES) + 1) for f in ranked["front"]}) if len(ranked) else [1]
    handles = [Line2D([], [], color=front_style(f)[0], marker=front_style(f)[1], ls="-" if f == 1 else "--",
                      ms=12 if f == 1 else 7, markeredgecolor="black",
                      label=f"front {f}" if f <= len(FRONT_STYLES) else f"front {f}+") for f in shown]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height), ncols=len(handles),
               fontsize=TEXT["label"], frameon=False)
    return fig


def plot_average_ranks(table: pd.DataFrame) -> Figure:
    """Average rank per recipe for all / 5-step / 50-step settings, with bootstrap intervals where present."""
    recipes = list(table.index)
    fig = Figure(figsize=(8.5, 0.45 * len(recipes) + 1.8), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(recipes))
    for k, column in enumerate(COLUMNS):
        values = table[column].to_numpy(float)
        yk = y + (k - 1) * 0.22
        color, marker = series_style(k)
        ax.plot(values, yk, marker, color=color, ms=7, markeredgecolor="black", markeredgewidth=0.5, ls="none",
                label=column, zorder=3)
        if f"{column} lo" in table:
            # The interval is drawn as is: a percentile interval of a rank need not contain the point value.
            ax.hlines(yk, table[f"{column} lo"], table[f"{column} hi"], color=color, lw=2)
    ax.set_yticks(y, recipes, fontsize=TEXT["label"])
    ax.tick_params(axis="x", labelsize=TEXT["tick"])
    ax.invert_yaxis()
    ax.set_xlabel("average rank (mean non-dominated front), lower better", fontsize=TEXT["label"])
    ax.legend(fontsize=TEXT["note"] + 1, loc="best")
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
    fig = Figure(figsize=(11, 3.8 * len(datasets) + 0.4), layout="constrained")
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    recipes = sorted(part["recipe"].unique())
    styles = {r: series_style(i) for i, r in enumerate(recipes)}
    for row_axes, dataset in zip(axes, datasets):
        data = part[part["dataset"] == dataset]
        for (recipe, ema), group in data.groupby(["recipe", "ema"]):
            group = group.sort_values("steps")
            color, marker = styles[recipe]
            style = dict(color=color, ls="-" if ema else "--", marker=marker, ms=6 if ema else 4,
                         markeredgecolor="black", markeredgewidth=0.4, alpha=1.0 if ema else 0.7)
            row_axes[0].plot(group["steps"], group["clip_score"], label=recipe if ema else None, **style)
            row_axes[1].plot(group["steps"], group["fid_clip"], **style)
        for ax, name in zip(row_axes, ("CLIP score (higher better)", "FID, CLIP features (lower better)")):
            ax.set_xscale("log")
            ticks = sorted(data["steps"].unique())
            if ticks:
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
            ax.set_xlabel("sampling steps", fontsize=TEXT["label"])
            ax.tick_params(labelsize=TEXT["tick"])
            ax.set_title(f"{dataset}: {name}", fontsize=TEXT["label"])
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=TEXT["note"] + 1, loc="outside right upper")
    cfg_text = f"CFG {cfg:g}" if cfg is not None else "no records"
    fig.suptitle(f"Metrics versus sampling steps at {cfg_text} (EMA solid, raw dashed)", fontsize=TEXT["title"])
    return fig


def _colormap(name: str):
    """A matplotlib colormap by name."""
    from matplotlib import colormaps

    return colormaps[name]
