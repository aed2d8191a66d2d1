"""The rank report of a sweep (docs/ranking.md#ranking): python -m src.ranking.report [SWEEP_DIR ...] [--out DIR] [...].

Writes into reports/<sweep name>/ (or --out): report.md (Table 1 and Table 2 forms, notes), report.html
(tables and figures embedded), CSVs of every table, and PNG figures; prints Table 1 to the terminal.

The training seeds of a recipe are replicates of one entry (see src/ranking/aggregate.py): fronts per control
setting on the seed-mean CLIP score and FID; the bootstrap resamples seeds and evaluation samples, so the
intervals, the first-front probabilities and the separability verdicts include training-seed variance.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from src.ranking.aggregate import (
    LEGACY_SAMPLER, SETTING_KEY, STATUS_WORDS, Sweep, average_ranks, bare_recipe, check_eval_settings,
    check_fid_features, check_sweep_overlap, check_training_settings, describe_column, describe_fifty_step,
    fifty_step_scales, load_sweep, missing_settings, pool_seeds, rank_table, restrict_datasets, restrict_recipes,
    restrict_sampler, restrict_train_seeds, seed_counts, seed_order, setting_groups, setting_label,
)
from src.ranking.agreement import noise_ceiling, seed_agreement, spearman_brown
from src.ranking.bootstrap import RankBootstrap, bootstrap_ranks, check_settings, inseparable_pairs, resolve_workers
from src.ranking.paper import COLUMNS, PAPER_TABLE1, paper_name, paper_ranks, spearman_vs_paper
from src.ranking.samples import sample_figures
from src.ranking.plots import plot_average_ranks, plot_metrics_vs_steps, plot_pareto_fronts, save_figure
from src.ranking.tables import Table, fmt
from src.utils.io import atomic_write_bytes, file_lock, is_temp_name

DEFAULT_MULTIRUN = Path("outputs/multirun")
DEFAULT_REPORTS = Path("reports")
DEFAULT_DRAWS = 200
TABLE2_STEPS = 25  # the paper's Table 2 compares metrics at 25 sampling steps, EMA weights
FEWER_SEEDS = "\u2020"  # marks an entry with fewer training seeds than the most any entry has
FEATURE_NAMES = {"clip_raw": "raw (un-normalised) CLIP image embeddings, as the paper",
                 "clip_l2norm": "L2-normalised CLIP image embeddings (results written before FID moved to raw "
                                "embeddings; not the paper's definition, re-evaluate with `python -m src.evaluate "
                                "RUN_DIR`)"}


class NoResultsError(RuntimeError):
    """No results.json records under the searched directories."""


@dataclass
class RankReport:
    """Everything the report shows: ranked records, the average-rank table, notes and bootstrap draws."""

    sweep: Sweep
    records: pd.DataFrame  # one row per entry, training seed and control setting (after --sampler)
    ranked: pd.DataFrame  # per entry ('recipe') and control setting: seed-mean metrics, n_seeds, front
    table: pd.DataFrame  # per entry: averages, 'n <column>', 'P(front 1) <column>', '<column> lo/hi', seeds, paper
    n_settings: dict[str, int]  # control settings per column in the sweep
    missing: dict[str, list[str]]
    spearman: pd.DataFrame
    fifty_step_note: str
    bootstrap: RankBootstrap | None
    draws: int
    seed: int
    column_notes: dict[str, str]  # column -> which control settings it averages
    sampler_note: str
    max_seeds: int
    train_seeds: list[str] | None = None  # --train-seeds: the training seeds ranked (None: all, pooled)
    by_sweep: bool = False  # --by-sweep: entries qualified by their sweep directory's name
    recipes: list[str] | None = None  # --recipes: the recipes ranked among themselves (None: every recipe)
    datasets: list[str] | None = None  # --datasets: the datasets whose settings are ranked (None: all)
    seed_ranks: dict[str, pd.DataFrame] = field(default_factory=dict)  # training seed -> its average ranks, alone
    left_out: list[str] = field(default_factory=list)  # entries --train-seeds / --datasets left without records

    @property
    def seed_agreement(self) -> dict[str, float]:
        """Per column, the mean Spearman correlation between the seeds' own average ranks (NaN with one seed)."""
        tables = list(self.seed_ranks.values())
        return {c: seed_agreement([t[c] for t in tables if c in t]) if len(tables) > 1 else math.nan for c in COLUMNS}

    def inseparable(self) -> list[tuple[str, str, float]] | None:
        """Pairs of entries the bootstrap cannot separate over all settings (None without a bootstrap)."""
        if self.bootstrap is None:
            return None
        boot = self.bootstrap
        return inseparable_pairs(boot.prob_better["all"], boot.separation, list(self.table.index))


# ---------------------------------------------------------------------------------------------- building


def build_report(
    sweep_dirs: Sequence[Path | str],
    fifty_step_cfg: Sequence[float] | str | None = None,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    confidence: float = 0.9,
    separation: float = 0.95,
    progress: Callable[[str], None] | None = None,
    sampler: str | None = None,
    device: str = "cpu",
    workers: int = 0,
    train_seeds: Sequence[int | str] | None = None,
    by_sweep: bool = False,
    recipes: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
) -> RankReport:
    """Load the sweeps, pool training seeds, rank every control setting, average, bootstrap, compare with the paper.

    fifty_step_cfg: CFG scale(s) of the 50-step column, "all", or None for the default (CFG 5.0 when present).
    sampler: rank only the records of this sampler; None ranks every sampler, variants as separate entries.
    train_seeds: rank only the records of these training seeds; None pools every seed as replicates.
    recipes, datasets: rank only these recipes (each with all its variants) among themselves, on only these
    datasets' settings; None: all.
    workers: the bootstrap's threads on the CPU, 0 = every usable core (the draws do not depend on it).
    by_sweep: rank each sweep directory's entries as entries of their own (`rf [sweep=NAME]`). Without it, sweeps
    that hold the same entry, seed and setting are refused (ValueError) rather than one hiding the other.
    A sweep whose records mix FID feature definitions, or evaluation settings (eval.n_samples, eval.seed, the CLIP
    model, eval.checkpoint) outside a swept value, is refused (ValueError naming the runs to re-evaluate); so are
    runs ranked together that were trained with different settings outside a swept value (check_training_settings).
    """
    if int(draws) < 0:
        raise ValueError(f"bootstrap draws={draws!r}: must be 0 (off) or a positive integer")
    # Bad values are refused before any work, with or without draws (a typo found now, not in a later run).
    resolve_workers(workers)
    from src.ranking.bootstrap_torch import resolve_device

    resolve_device(device)
    check_settings(confidence, separation, seed)
    resolved = [Path(d).resolve() for d in sweep_dirs]
    twice = sorted({str(d) for d in resolved if resolved.count(d) > 1})
    if twice:
        raise ValueError(f"sweep directory given twice: {', '.join(twice)}; give each once")
    sweep = load_sweep(sweep_dirs, by_sweep=by_sweep)
    if sweep.records.empty:
        raise NoResultsError(_no_results(sweep))
    check_fid_features(pd.concat([sweep.records, sweep.duplicates]))  # before a rerun's record hides an older one
    check_sweep_overlap(sweep)
    check_eval_settings(sweep.records)  # the newest record per setting: a partial re-evaluation would mix settings
    records = sweep.records if sampler is None else restrict_sampler(sweep.records, sampler)
    # Each restriction's error names what the options before it left, not the whole sweep ("the sweep has shapes"
    # when --recipes left only digits would send the user looking for a dataset that is there).
    applied = [f"--sampler {sampler}"] if sampler is not None else []

    def scope() -> str:
        return "the sweep" + (f" restricted to {' '.join(applied)}" if applied else "")

    if recipes is not None:
        records = restrict_recipes(records, recipes, scope())
        applied.append(f"--recipes {' '.join(recipes)}")
    entries = sorted(records["entry"].unique())
    if train_seeds is not None:
        records = restrict_train_seeds(records, train_seeds, scope())
        applied.append(f"--train-seeds {' '.join(map(str, train_seeds))}")
    if datasets is not None:
        records = restrict_datasets(records, datasets, scope())
        applied.append(f"--datasets {' '.join(datasets)}")
    # Entries with no record of the chosen seeds or datasets would vanish from the table unsaid: they are named.
    left_out = [e for e in entries if e not in set(records["entry"])]
    # The runs actually ranked together (after --recipes and the like) must have been trained alike.
    check_training_settings(records, by_sweep)
    ranked = rank_table(pool_seeds(records))
    groups = setting_groups(ranked, fifty_step_cfg, scope())
    table = average_ranks(ranked, groups)
    n_settings = {c: int(ranked[np.asarray(groups[c])].drop_duplicates(SETTING_KEY).shape[0]) for c in COLUMNS}
    boot = bootstrap_ranks(records, ranked, groups, draws, seed, confidence, separation, progress,
                           device, workers) if draws else None
    if boot is not None:
        table = table.drop(columns=list(boot.first_front.columns)).join(boot.intervals).join(boot.first_front)
    seeds = seed_counts(records)
    table = table.join(seeds).join(paper_ranks(table.index).add_prefix("paper "))
    missing = missing_settings(ranked)
    table["missing settings"] = [len(missing.get(r, [])) for r in table.index]
    spearman = spearman_vs_paper(table[list(COLUMNS)])
    if boot is not None:
        spearman = spearman.merge(boot.spearman, on="column", how="left")
    seed_ranks = ranks_per_seed(records, fifty_step_cfg)
    report = RankReport(
        sweep=sweep, records=records, ranked=ranked, table=table, n_settings=n_settings, missing=missing,
        spearman=spearman, fifty_step_note=describe_fifty_step(ranked, fifty_step_cfg), bootstrap=boot,
        draws=int(draws), seed=seed, column_notes={c: describe_column(ranked, groups[c]) for c in COLUMNS},
        sampler_note=_sampler_note(sweep.records, sampler), max_seeds=int(seeds["seeds"].max()),
        train_seeds=None if train_seeds is None else [str(s) for s in train_seeds], by_sweep=by_sweep,
        recipes=None if recipes is None else list(recipes), datasets=None if datasets is None else list(datasets),
        seed_ranks=seed_ranks, left_out=left_out,
    )
    report.spearman["seed agreement"] = report.spearman["column"].map(report.seed_agreement)
    return report


def _no_results(sweep: Sweep) -> str:
    """Why nothing can be ranked: the jobs found by status, in the report's words, with the first error."""
    where = ", ".join(str(r.resolve()) for r in sweep.roots)
    runs = sweep.runs
    if runs.empty:
        return f"no results found in {where} (no run directories and no planned jobs: is it a sweep directory?)"
    counts = ", ".join(f"{n} {STATUS_WORDS.get(status, status)}" for status, n in runs["status"].value_counts().items())
    errors = runs[(runs["error"].fillna("").astype(str).str.strip() != "") & (runs["status"] != "missing")]
    first = f"; e.g. {errors['run_dir'].iloc[0]}: {str(errors['error'].iloc[0]).strip().splitlines()[0]}" \
        if len(errors) else ""
    return f"no results found in {where} ({len(runs)} job{'s' * (len(runs) != 1)}: {counts}{first})"


def ranks_per_seed(records: pd.DataFrame, fifty_step_cfg=None) -> dict[str, pd.DataFrame]:
    """Each training seed ranked alone (what --train-seeds S gives): seed -> average ranks per entry and column.
    Empty with fewer than two seeds: alone is then the same as pooled."""
    seeds = sorted(records["train_seed"].astype(str).unique(), key=seed_order)
    if len(seeds) < 2:
        return {}
    # Every seed gets the pooled report's 50-step column: resolving it per seed refused a seed still without a
    # chosen scale ('the sweep has ...') and, by default, could give one seed other settings than its peers.
    scales = fifty_step_scales(records, fifty_step_cfg)
    return {s: rank_records(records[records["train_seed"].astype(str) == s], scales) for s in seeds}


def rank_records(records: pd.DataFrame, scales: Sequence[float] | None = None) -> pd.DataFrame:
    """Average ranks per entry and column of these records alone (seeds pooled), as the report ranks a sweep, with
    the 50-step column at these CFG scales (None: every 50-step setting); scales the records lack are skipped."""
    ranked = rank_table(pool_seeds(records))
    groups = setting_groups(ranked, "all")
    if scales is not None:
        groups["50 steps"] &= np.isclose(ranked["cfg"].to_numpy(float)[:, None], list(scales)).any(axis=1)
    return average_ranks(ranked, groups)


def _sampler_note(records: pd.DataFrame, sampler: str | None) -> str:
    """Which sampler(s) the ranking covers."""
    present = sorted(records["sampler"].unique())
    legacy = (" (rf_time: the shared Euler sampler on the RF-time grid, as which records written before the sampler "
              "was recorded count)") \
        if LEGACY_SAMPLER in present else ""
    if sampler is not None:
        others = [s for s in present if s != sampler]
        return (f"Sampler: restricted to {sampler} (--sampler); "
                + (f"left out: {', '.join(others)}" if others else "the sweep has no other") + f"{legacy}.")
    if len(present) == 1:
        return f"Sampler: {present[0]} for every record{legacy}."
    return (f"Sampler: the sweep has {len(present)} samplers ({', '.join(present)}); each sampler variant is its own "
            f"entry (e.g. [sampler={present[-1]}]); --sampler NAME ranks one{legacy}.")


def metrics_table(ranked: pd.DataFrame, steps: int = TABLE2_STEPS, ema: bool = True) -> pd.DataFrame:
    """Table 2 form: CLIP score and FID per recipe and dataset at one step count with EMA (or raw) weights."""
    part = ranked[(ranked["steps"] == steps) & (ranked["ema"] == ema)]
    metrics = ["clip_score", "fid_clip"] + (["fid_inception"] if part["fid_inception"].notna().any() else [])
    # dropna=False: an entry whose metrics are all null here (diverged) is shown as '-', not dropped unsaid; it spans
    # every dataset x setting pair, so only the pairs evaluated are kept.
    wide = part.pivot_table(index="recipe", columns=["dataset", "setting"], values=metrics, aggfunc="first",
                            dropna=False)
    pairs = set(part[["dataset", "setting"]].itertuples(index=False, name=None))
    wide = wide[[c for c in wide.columns if tuple(c[1:]) in pairs]]
    if wide.empty:
        return wide
    wide = wide.reorder_levels([1, 2, 0], axis=1).sort_index(axis=1)
    return wide


# ---------------------------------------------------------------------------------------------- rendering


def table1(report: RankReport) -> Table:
    """Table 1 form: per entry the average rank over all / 5-step / 50-step settings with intervals and n, the
    probability of being on the first front, the number of training seeds, and the paper's ranks."""
    has_paper = report.table[[f"paper {c}" for c in COLUMNS]].notna().any().any()
    headers = ["recipe"] + [f"{c} (n={report.n_settings[c]})" for c in COLUMNS]
    headers += [f"P(front 1) {c}" for c in COLUMNS] + ["seeds"]
    headers += [f"paper {c}" for c in COLUMNS] if has_paper else []
    rows = []
    for recipe, row in report.table.iterrows():
        cells = [recipe + (" *" if recipe in report.missing else "") + (f" {FEWER_SEEDS}" if _fewer_seeds(report, row)
                                                                        else "")]
        for c in COLUMNS:
            cell = fmt(row[c])
            if f"{c} lo" in row and np.isfinite(row[c]):
                cell += f" [{fmt(row[f'{c} lo'])}, {fmt(row[f'{c} hi'])}]"
            if row[f"n {c}"] != report.n_settings[c]:
                cell += f" (n={int(row[f'n {c}'])})"
            cells.append(cell)
        cells += [fmt(row[f"P(front 1) {c}"]) for c in COLUMNS]
        seeds, fewest = int(row["seeds"]), int(row["seeds min"])
        cells.append(str(seeds) if fewest == seeds else f"{fewest}-{seeds}")
        cells += [fmt(row[f"paper {c}"]) for c in COLUMNS] if has_paper else []
        rows.append(cells)
    return Table(headers, rows)


def _fewer_seeds(report: RankReport, row: pd.Series) -> bool:
    """An entry with fewer training seeds (in some setting) than the most any entry has."""
    return int(row["seeds min"]) < report.max_seeds


def table2(report: RankReport) -> Table | None:
    """Table 2 form at 25 steps with EMA weights, or None when the sweep has no such setting."""
    wide = metrics_table(report.ranked)
    if wide.empty:
        return None
    names = {"clip_score": "CLIP", "fid_clip": "FID", "fid_inception": "FID (Inception)"}
    headers = ["recipe"] + [f"{d}, {s}: {names[m]}" for d, s, m in wide.columns]
    rows = [
        [recipe] + [fmt(v, 4 if m == "clip_score" else 3) for (_, _, m), v in zip(wide.columns, values)]
        for recipe, values in zip(wide.index, wide.to_numpy(float))
    ]
    order = [r for r in report.table.index if r in set(wide.index)]
    rows.sort(key=lambda cells: order.index(cells[0]))
    return Table(headers, rows)


def separability_table(report: RankReport) -> Table | None:
    """Per recipe, the recipes the bootstrap cannot separate it from (all settings)."""
    if report.bootstrap is None:
        return None
    pairs = report.inseparable()
    partners: dict[str, list[str]] = {}
    for a, b, p in pairs:
        partners.setdefault(a, []).append(f"{b} ({p:.2f})")
        partners.setdefault(b, []).append(f"{a} ({1 - p:.2f})")
    rows = [[r, "; ".join(partners[r])] for r in report.table.index if r in partners]
    return Table(["recipe", "cannot be separated from (P(recipe ranks better))"], rows)


def status_lines(report: RankReport) -> list[str]:
    """What the sweep contains and whether it is partial, with the reasons and the runs they concern."""
    runs = report.sweep.runs
    counts = runs["status"].value_counts()
    parts = [f"{counts.get('done', 0)} done"]
    for status in ("partial", "failed", "incomplete", "unreadable", "missing"):
        if counts.get(status, 0):
            parts.append(f"{counts[status]} {STATUS_WORDS[status]}")
    n_refused = int(counts.get("refused", 0))
    refused = f"; {n_refused} relaunch{'es' * (n_refused != 1)} not run (failures.json)" if n_refused else ""
    lines = [
        f"Sweep {report.sweep.name}: {int((runs['status'] != 'refused').sum())} run directories ({', '.join(parts)})"
        # records: those ranked (one per entry, training seed and setting), not the seed-mean cells
        f"{refused}; {len(report.records)} records, {report.ranked['recipe'].nunique()} recipes, "
        f"{report.n_settings['all']} control settings."
    ]
    if report.sweep.partial:
        lines.append(f"PARTIAL SWEEP: {'; '.join(_partial_reasons(report.sweep))}; the ranks cover the finished "
                     "records only.")
    lines += list(report.sweep.notes)
    return lines


#: How the PARTIAL SWEEP line says each kind of unfinished run.
PARTIAL_WORDS = {
    "missing": "planned in jobs.json but never started",
    "partial": "evaluated in part (results.json lacks records their configuration asks for)",
    "incomplete": "running or killed, no results yet",
    "failed": "failed",
    "unreadable": "with an unreadable results.json",
    "refused": "whose latest launch did not run, their directories holding earlier runs (failures.json)",
}


def _partial_reasons(sweep: Sweep) -> list[str]:
    """Why the sweep is partial: the sweep-level problems, then each kind of unfinished run with its runs named."""
    reasons = list(sweep.problems)
    runs = sweep.runs
    for status, words in PARTIAL_WORDS.items():
        part = runs[runs["status"] == status]
        if part.empty:
            continue
        names = [_run_label(sweep, r) for r in part.itertuples(index=False)]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        reasons.append(f"{len(part)} run{'s' * (len(part) != 1)} {words}: {shown}")
    return reasons


def _run_label(sweep: Sweep, run) -> str:
    """A run named by its directory within its sweep (`digits/edm_-1.20_1.20`), with its records when partial."""
    root = next((r for r in sweep.roots if r.name == run.sweep), None)
    label = str(run.run_dir)
    if root is not None:
        try:
            label = Path(run.run_dir).relative_to(root).as_posix()
        except ValueError:
            pass
    if len(sweep.roots) > 1:
        label = f"{run.sweep}/{label}"
    if run.status == "partial" and run.n_wanted:
        label += f" ({int(run.n_wanted - run.n_missing)} of {int(run.n_wanted)} records)"
    return label


def notes(report: RankReport) -> list[str]:
    """The footnotes of Table 1: definitions, settings per column, seeds, sampler, bootstrap, paper comparison."""
    kinds = sorted(report.records["fid_features"].unique())
    out = [
        "Rank: per control setting (dataset, sampler setting, EMA or raw weights), non-dominated sorting of the "
        "entries on CLIP score (higher better) and FID on CLIP features (lower better); front 1 is non-dominated. "
        "The training seeds of a recipe are replicates of one entry: it is sorted on the means over its seeds "
        "(seed-mean CLIP score and FID). An entry's rank is its mean front over a column's settings; n = settings "
        "averaged. P(front 1): the share of the column's settings in which the entry is on the first front"
        + (" (over the bootstrap draws)." if report.bootstrap is not None else "."),
        "FID features: " + "; ".join(FEATURE_NAMES.get(k, k) for k in kinds) + ".",
        *[f"{c} column: {report.column_notes[c]}." for c in COLUMNS[:2]],
        f"{report.fifty_step_note[:-1]} ({report.column_notes['50 steps']}).",
        _seed_note(report),
        *_agreement_note(report),
        report.sampler_note,
    ]
    if report.recipes is not None or report.datasets is not None:
        out.append("Restricted: " + "; ".join(
            ([f"only {', '.join(report.recipes)}, ranked among themselves (--recipes)"] if report.recipes else [])
            + ([f"only the settings of {', '.join(report.datasets)} (--datasets)"] if report.datasets else [])) + ".")
    if report.left_out:
        why = " and ".join(([f"training seed(s) {', '.join(report.train_seeds)}"] if report.train_seeds else [])
                           + ([f"dataset(s) {', '.join(report.datasets)}"] if report.datasets else []))
        out.append(f"Not ranked: {len(report.left_out)} entr{'ies' if len(report.left_out) != 1 else 'y'} without "
                   f"records of the {why} chosen: " + ", ".join(report.left_out[:8])
                   + (f" and {len(report.left_out) - 8} more" if len(report.left_out) > 8 else "") + ".")
    if report.by_sweep:
        out.append(f"Sweeps ranked side by side (--by-sweep): each entry is qualified by its sweep directory "
                   f"({', '.join(root.name for root in report.sweep.roots)}).")
    boot = report.bootstrap
    if boot is not None:
        out.append(
            f"[lo, hi]: {boot.confidence:.0%} percentile interval over {report.draws} bootstrap draws (seed "
            f"{report.seed}), each resampling every entry's training seeds and, paired across entries, the evaluation "
            "samples and reference images, so the intervals include training-seed variance (none for an entry with "
            "one seed). "
            + (f"Two entries are separated when one ranks better in at least {boot.separation:.0%} of the draws "
               "(ties count half). " if len(report.table) > 1 else "")
            + "A percentile interval of a rank need not contain the point value: the noise resampling adds breaks "
            "dominance chains into fewer fronts, so the draws tend to rank entries lower (better) than the point "
            "value, most for low-ranked entries and with several seeds (the point pools them all, a draw resamples "
            f"them); here {_outside(report.table, 'all')} of {len(report.table)} 'all' values lie outside their "
            "interval."
        )
        pairs = report.inseparable()
        if len(report.table) > 1:  # with one entry there is no pair to separate
            out.append(f"{len(pairs)} pair{'s' * (len(pairs) != 1)} of entries cannot be separated over all "
                       "settings (listed below)." if pairs
                       else "The bootstrap separates every pair of entries over all settings.")
            # With fewer than 1 / (1 - separation) draws one draw's order decides: 1 draw 'separates' every pair.
            needed = math.ceil(1.0 / (1.0 - boot.separation) - 1e-9) if boot.separation < 1.0 else 1
            if report.draws < needed:
                out.append(f"Only {report.draws} draw{'s' * (report.draws != 1)}: fewer than {needed} cannot show a "
                           f"{boot.separation:.0%} separation, so a pair ordered alike in every draw counts as "
                           "separated; use more draws (--bootstrap) before reading the verdicts.")
        if boot.metrics.fixed:
            out.append(f"{len(boot.metrics.fixed)} records could not be resampled and keep their values in every draw "
                       f"(e.g. {next(iter(boot.metrics.fixed.values()))}).")
    else:
        out.append("No bootstrap (--bootstrap 0): the averages carry no intervals; entries are still ranked on "
                   "their seed-mean metrics.")
    for recipe, lacks in report.missing.items():
        shown = "; ".join(lacks[:6]) + (f"; ... ({len(lacks) - 6} more)" if len(lacks) > 6 else "")
        out.append(f"* {recipe} lacks {len(lacks)} of {report.n_settings['all']} settings: {shown}.")
    bad = report.ranked[~np.isfinite(report.ranked[["clip_score", "fid_clip"]].to_numpy(float)).all(axis=1)]
    if len(bad):
        out.append(f"{len(bad)} entries x settings with a non-finite CLIP score or FID (in at least one seed) were put "
                   "in the last front of their setting: "
                   + "; ".join(_record_label(report.ranked, i) for i in bad.index[:6])
                   + (f"; ... ({len(bad) - 6} more)" if len(bad) > 6 else "") + ".")
    if len(report.sweep.duplicates):  # the rule of _drop_duplicates: the latest request's record, else the newest
        out.append(f"{len(report.sweep.duplicates)} duplicate records (same recipe, seed and control setting) were "
                   "dropped, keeping the one the run's latest launch or re-evaluation asked for, else the newest by "
                   "'created'.")
    out.append(spearman_line(report.spearman, list(report.table.index)))
    return out


def _outside(table: pd.DataFrame, column: str) -> int:
    """How many entries' point value of a column lies outside its bootstrap interval."""
    point, lo, hi = (table[c].to_numpy(float) for c in (column, f"{column} lo", f"{column} hi"))
    return int(((point < lo) | (point > hi)).sum())


def _seed_note(report: RankReport) -> str:
    """How many training seeds the entries have, and which have fewer."""
    table = report.table
    fewer = [r for r, row in table.iterrows() if _fewer_seeds(report, row)]
    counts = sorted(set(table["seeds"].astype(int)))
    if len(counts) == 1:  # with some entries short of a seed in some setting: in all, not everywhere
        text = f"Seeds: every entry has {counts[0]} training seed{'s' * (counts[0] != 1)}" \
            + (" in all ('seeds' column)" if fewer else "")
    else:  # "3 to 3" said nothing
        text = f"Seeds: entries have {counts[0]} to {counts[-1]} training seeds ('seeds' column)"
    if fewer:
        text += (f"; {FEWER_SEEDS} marks entries with fewer than {report.max_seeds} seeds (in some setting), ranked "
                 "on the seeds they have: " + ", ".join(fewer[:8])
                 + (f" and {len(fewer) - 8} more" if len(fewer) > 8 else ""))
    if report.train_seeds is not None:
        text += f"; restricted to training seed{'s' * (len(report.train_seeds) != 1)} " \
                f"{', '.join(report.train_seeds)} (--train-seeds)"
    return text + "."


def _agreement_note(report: RankReport) -> list[str]:
    """How well the training seeds, each ranked alone, agree: the study's self-consistency (none with one seed)."""
    agree = report.seed_agreement
    if not agree or all(math.isnan(v) for v in agree.values()):
        return []
    k = report.max_seeds
    text = ("Seed agreement (each training seed ranked alone; mean Spearman over pairs of seeds): "
            + ", ".join(f"{c} {v:.2f}" for c, v in agree.items() if not math.isnan(v)))
    r = agree.get("all", math.nan)
    if not math.isnan(r) and k > 1:
        ceiling = noise_ceiling(r, k)
        text += (f"; the {k}-seed mean ranked here has reliability {spearman_brown(r, k):.2f} on 'all' "
                 "(Spearman-Brown)" + (f", so seed noise alone holds its correlation with a noise-free reference "
                                       f"near {ceiling:.2f}" if not math.isnan(ceiling) else ""))
    return [text + "."]


def spearman_line(spearman: pd.DataFrame, entries: Sequence[str] = ()) -> str:
    """One sentence with the Spearman correlations against the paper's Table 1."""
    shared = int(spearman["n_shared"].max()) if len(spearman) else 0
    if shared == 0:
        # Entries qualified by a sampler or swept value (`rf [sampler=native]`) are not the paper's recipe itself:
        # the sweep may well hold the paper's recipes, only not unqualified.
        qualified = [e for e in entries if bare_recipe(e) != e and paper_name(bare_recipe(e)) in PAPER_TABLE1]
        if qualified:
            # A hint only for the qualifiers an option can drop: a sampler (--sampler), a sweep (--by-sweep).
            keys = {q.split("=", 1)[0] for e in qualified for q in re.split(r",\s*", e.split(" [", 1)[1].rstrip("]"))}
            hints = (["--sampler NAME ranks one sampler's records unqualified"] if "sampler" in keys else []) \
                + (["a report of one sweep, without --by-sweep, ranks its recipes unqualified"] if "sweep" in keys
                   else [])
            return (f"Paper comparison: none; the paper's recipes are here only as qualified entries (e.g. "
                    f"{qualified[0]}), which are not compared with its Table 1"
                    + (f" ({'; '.join(hints)})" if hints else "") + ".")
        return "Paper comparison: no recipe of this sweep is in the paper's Table 1."
    parts = []
    for _, row in spearman.iterrows():
        interval = f", bootstrap interval [{row.lo:.2f}, {row.hi:.2f}]" if "lo" in spearman and np.isfinite(row.lo) \
            else ""
        value = f"{row.spearman:.2f} (p={row.p_value:.2g}, {row.n_shared} recipes{interval})" \
            if np.isfinite(row.spearman) else f"n/a ({row.n_shared} shared recipes, need >= 3 with distinct ranks)"
        top = row.get("paper top 3 in our top 5", math.nan)
        if np.isfinite(top):
            value += f", the paper's top 3 in our top 5: {int(top)} of 3"
        parts.append(f"{row.column}: {value}")
    return ("Spearman correlation with the paper's Table 1 over shared recipes: " + "; ".join(parts)
            + " (the paper ranks 61 recipes on other data; its 50-step column may average other CFG scales).")


def runs_table(report: RankReport) -> Table | None:
    """Runs without all their results (failed, running or killed, evaluated in part, unreadable, never started,
    relaunch not run)."""
    runs = report.sweep.runs[report.sweep.runs["status"] != "done"]
    if runs.empty:
        return None
    rows = [[r.run_dir, r.overrides, STATUS_WORDS.get(r.status, r.status), r.error]
            for r in runs.itertuples(index=False)]
    return Table(["run directory", "overrides", "status", "error"], rows)


def terminal_text(report: RankReport) -> str:
    """What the CLI prints: status, Table 1 and its notes."""
    return "\n".join([*status_lines(report), "", table1(report).markdown(), "", *notes(report)])


def markdown(report: RankReport, figures: dict[str, Path] | None = None) -> str:
    """The full Markdown report."""
    parts = [f"# Rank report: {report.sweep.name}", "", *status_lines(report), "",
             "## Average rank (paper Table 1 form)", "", table1(report).markdown(), "",
             *[f"- {n}" for n in notes(report)]]
    for title, table in _extra_tables(report):
        parts += ["", f"## {title}", "", table.markdown()]
    for name, path in (figures or {}).items():
        parts += ["", f"![{name}]({path.name})"]
    return "\n".join(parts) + "\n"


def html_page(report: RankReport, figures: dict[str, Path] | None = None) -> str:
    """A self-contained HTML page with the tables, figures and samples embedded (src/ranking/html.py)."""
    from src.ranking import html

    return html.html_page(f"Rank report: {report.sweep.name}", status_lines(report), report.table, notes(report),
                          figures or {}, _extra_tables(report))


def _extra_tables(report: RankReport) -> list[tuple[str, Table]]:
    """The report's tables after Table 1, those that have content."""
    candidates = [
        ("Recipes the data cannot separate (all settings)", separability_table(report)),
        (f"Metrics at {TABLE2_STEPS} steps, EMA weights (paper Table 2 form)", table2(report)),
        ("Runs without all their results", runs_table(report)),
    ]
    return [(title, table) for title, table in candidates if table is not None and table.rows]


def _record_label(ranked: pd.DataFrame, row: int) -> str:
    """An entry named with a control setting."""
    rec = ranked.iloc[int(row)]  # ranked keeps load_sweep's RangeIndex, so labels are positions
    return f"{rec['recipe']} @ {setting_label(rec['dataset'], rec['setting'], rec['ema'])}"


# ---------------------------------------------------------------------------------------------- writing


def first_seed_records(records: pd.DataFrame) -> pd.DataFrame:
    """Each entry's records of its first training seed (numeric order: 2 before 10), one per dataset, setting and
    EMA, with `recipe` = the entry: what its sample sheets show."""
    by_seed = records.assign(_seed=records["train_seed"].astype(str).map(seed_order))
    return by_seed.sort_values(["entry", "_seed"], kind="stable").drop_duplicates(
        ["entry", "dataset", "setting", "ema"]).drop(columns="_seed").assign(recipe=lambda r: r["entry"])

#: Held while a report is written into its folder: two reports of one sweep at once would mix their files.
REPORT_LOCK = ".report.lock"


def write_report(report: RankReport, out_dir: Path | str,
                 then: Callable[[dict[str, Path]], None] | None = None) -> dict[str, Path]:
    """Write the Markdown, HTML, CSV and PNG outputs into out_dir; returns name -> path. then: called with those
    paths while the lock is still held (the W&B upload reads them: another report of the folder would replace them
    mid-upload)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / REPORT_LOCK):
        # Under the lock no other report writes here: a temp file or staging folder is one a killed report left
        # (report.html's can be many MB at the paper's scale), which nothing else would ever remove.
        for stale in [f for f in out.iterdir() if is_temp_name(f.name) or f.name.startswith(STAGING)]:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        # Written whole into a staging folder first: a failure (a plot that raises) or a kill while writing leaves the
        # earlier report as it was; then the earlier report's files go and this one's are moved in (renames).
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
        try:
            staged = _write_outputs(report, staging)
            for previous in report_outputs(out):
                previous.unlink(missing_ok=True)
            for path in staged.values():
                os.replace(path, out / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written = {name: out / path.name for name, path in staged.items()}
        if then is not None:
            then(written)
        return written


STAGING = ".report-staging-"  # the folder a report is written into before it replaces the earlier one


#: The files a report writes (besides the sample sheets, samples_*.png and steps_cfg_*.png), report.html last.
REPORT_FILES = ("pareto_fronts.png", "average_ranks.png", "metrics_vs_steps.png", "ranks.csv", "fronts.csv",
                "records.csv", "runs.csv", "spearman.csv", "table2.csv", "separability.csv", "report.md",
                "report.html")


def report_outputs(out: Path) -> list[Path]:
    """The files of a report in out: its own names only (anything else there is left alone)."""
    sheets = [f for pattern in ("samples_*.png", "steps_cfg_*.png") for f in sorted(out.glob(pattern))]
    return [out / name for name in REPORT_FILES if (out / name).is_file()] + sheets


def _write_outputs(report: RankReport, out: Path) -> dict[str, Path]:
    figures = {
        "Pareto fronts per control setting": (plot_pareto_fronts(report.ranked), "pareto_fronts.png"),
        "Average rank": (plot_average_ranks(report.table), "average_ranks.png"),
        "Metrics versus sampling steps": (plot_metrics_vs_steps(report.ranked), "metrics_vs_steps.png"),
    }
    figures = {title: save_figure(fig, out / name) for title, (fig, name) in figures.items()}
    # Samples of each entry's first training seed (the seed-mean table has no samples): src/ranking/samples.py
    figures.update(sample_figures(first_seed_records(report.records), out, list(report.table.index)))
    paths = {f.stem: f for f in figures.values()}
    csvs = {
        "ranks": report.table.reset_index(),
        "fronts": report.ranked,
        "records": report.records.drop(columns=["config"], errors="ignore"),
        "runs": report.sweep.runs,
        "spearman": report.spearman,
        "table2": _flat_columns(metrics_table(report.ranked)).reset_index(),
    }
    if report.bootstrap is not None:
        csvs["separability"] = pd.concat(
            [p.rename_axis(index="recipe", columns="other").stack().rename("p_better").reset_index().assign(column=c)
             for c, p in report.bootstrap.prob_better.items()],
            ignore_index=True,
        )
    for name, frame in csvs.items():
        paths[name] = _write_text(out / f"{name}.csv", frame.to_csv(index=False))
    paths["report_md"] = _write_text(out / "report.md", markdown(report, figures))
    paths["report_html"] = _write_text(out / "report.html", html_page(report, figures))
    return paths


def _flat_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Multi-level columns joined into single strings."""
    frame = frame.copy()
    if isinstance(frame.columns, pd.MultiIndex):
        frame.columns = [" | ".join(map(str, c)) for c in frame.columns]
    return frame


def _write_text(path: Path, text: str) -> Path:
    """Atomically write a text file."""
    atomic_write_bytes(path, text.encode())
    return path


# ---------------------------------------------------------------------------------------------- CLI


def latest_sweep(root: Path | str = DEFAULT_MULTIRUN) -> Path:
    """The sweep directory under root most recently modified (its own or a direct child's mtime; of sweeps touched
    at the same time, the name sorting last)."""
    root = Path(root)
    sweeps = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    if not sweeps:
        raise NoResultsError(f"no sweep found: {root.resolve()} has no sweep directories")

    def touched(path: Path) -> float:
        return max([path.stat().st_mtime] + [c.stat().st_mtime for c in path.iterdir() if c.is_dir()])

    # The name breaks ties (mtimes are as coarse as the kernel's clock tick), not the directory's listing order.
    return max(sweeps, key=lambda p: (touched(p), p.name))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of python -m src.ranking.report."""
    parser = argparse.ArgumentParser(prog="python -m src.ranking.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="*", type=Path,
                        help="sweep directories (default: the latest under --multirun-root)")
    parser.add_argument("--out", help="report directory (default reports/<sweep name>)")
    parser.add_argument("--fifty-step-cfg", nargs="+", metavar="CFG",
                        help="CFG scale(s) of the 50-step column, or 'all' (default: 5.0, the 5-step column's scale, "
                             "when the sweep has it, else all 50-step settings)")
    parser.add_argument("--sampler", metavar="NAME",
                        help="rank only this sampler's records (default: every sampler, variants as separate entries)")
    parser.add_argument("--train-seeds", nargs="+", metavar="SEED",
                        help="rank only these training seeds (default: every seed, pooled as replicates)")
    parser.add_argument("--recipes", nargs="+", metavar="RECIPE",
                        help="rank only these recipes among themselves, e.g. rf edm/rf (default: every recipe)")
    parser.add_argument("--datasets", nargs="+", metavar="DATASET",
                        help="rank only these datasets' control settings (default: every dataset)")
    parser.add_argument("--by-sweep", action="store_true",
                        help="rank each sweep directory's entries separately, qualified by its name (default: pool "
                             "the sweeps; refused when two hold the same entry, seed and setting)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_DRAWS, metavar="N", help="bootstrap draws, 0 = off")
    parser.add_argument("--confidence", type=float, default=0.9, help="bootstrap interval level")
    parser.add_argument("--separation", type=float, default=0.95, help="ordering probability that separates recipes")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the bootstrap's Frechet distances run: auto = a GPU when torch sees one, else cpu")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="threads for the bootstrap on the CPU, 0 = every usable core (the draws do not depend "
                             "on it)")
    parser.add_argument("--multirun-root", type=Path, default=DEFAULT_MULTIRUN, help="where sweeps live")
    parser.add_argument("--wandb", action="store_true",
                        help="publish to W&B (offline unless WANDB_MODE or the user's W&B settings say otherwise)")
    return parser.parse_args(argv)


def _fifty_step_arg(values: Sequence[str] | None) -> list[float] | str | None:
    """--fifty-step-cfg: None (default), 'all', or CFG scales; a clear error for anything else."""
    if values is None:
        return None
    if list(values) == ["all"]:
        return "all"
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--fifty-step-cfg {' '.join(values)}: give CFG scale(s) (e.g. 5.0) or 'all'") from None


def _names_slug(names: Sequence[str]) -> str:
    """Recipe names as a folder-name part: `edm/rf` -> `edm_rf`, joined by +; a short hash beyond four."""
    slugs = [re.sub(r"[^A-Za-z0-9.-]+", "_", n).strip("_") for n in names]
    if len(slugs) <= 4:
        return "+".join(slugs)
    return f"{len(slugs)}_recipes_{hashlib.sha1('+'.join(sorted(slugs)).encode()).hexdigest()[:8]}"


def _check_out(given: str | None) -> Path | None:
    """--out as a folder: refused before any work when it is empty (an unset shell variable; Path('') is the current
    folder, where the report's files were scattered), a file or under one (found only after the bootstrap, which
    takes hours at the paper's scale)."""
    if given is None:
        return None
    if not given.strip():
        raise ValueError(f"--out {given!r}: give a folder (made when absent), or leave --out out for "
                         "reports/<sweep name>")
    out = Path(given)
    dangling = next((p for p in (out, *out.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # mkdir fails on it with `File exists`
        where = "is" if dangling == out else f"lies under {dangling},"
        raise ValueError(f"--out {out}: {where} a link to nothing ({os.readlink(dangling)}); give a folder (made when "
                         "absent)")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == out else f"lies under the file {existing}"
        raise ValueError(f"--out {out}: {where}; give a folder (made when absent)")
    return out


def _check_out_apart(out: Path | None, sweeps: Sequence[str | Path]) -> None:
    """--out must not be a sweep folder the report reads, nor a run directory in one: writing a report removes the
    temp files in its folder (a killed report's), and there they are a running job's writes (failures.json, a
    checkpoint) in progress."""
    if out is None:
        return
    where = out.resolve()
    for sweep in map(lambda s: Path(s).resolve(), sweeps):
        run = next((p for p in (where, *where.parents) if sweep in p.parents and (
            (p / "fingerprint.json").exists() or (p / ".hydra").is_dir())), None)
        if where == sweep or run is not None:
            what = "the sweep folder" if where == sweep else f"in the run directory {run} of the sweep"
            raise ValueError(f"--out {out}: is {what} the report reads; give a folder of its own (made when absent), "
                             "or leave --out out for reports/<sweep name>")


def _check_options(args: argparse.Namespace) -> None:
    """The bootstrap's options, refused naming the option as given (the library's checks name its arguments)."""
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap}: must be an integer >= 0 (0: no bootstrap)")
    from src.ranking.bootstrap_torch import resolve_device

    try:
        check_settings(args.confidence, args.separation, args.seed)
        resolve_workers(args.workers)
        resolve_device(args.device)  # cuda where torch sees none
    except ValueError as exc:  # "bootstrap confidence=1.5: ..." -> "--confidence 1.5: ..."; device='cuda' -> cuda
        raise ValueError(re.sub(r"^bootstrap (\w+)=(?:'([^']*)'|)", r"--\1 \2", str(exc))) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Build, write and print the rank report; a one-line error and exit status 1 when there is nothing to rank."""
    args = parse_args(argv)
    try:
        args.out = _check_out(args.out)
        _check_options(args)
        sweeps = args.sweeps or [latest_sweep(args.multirun_root)]
        _check_out_apart(args.out, sweeps)
        report = build_report(sweeps, _fifty_step_arg(args.fifty_step_cfg), args.bootstrap, args.seed, args.confidence,
                              args.separation, progress=lambda line: print(line, file=sys.stderr, flush=True),
                              sampler=args.sampler, device=args.device, workers=args.workers,
                              train_seeds=args.train_seeds, by_sweep=args.by_sweep, recipes=args.recipes,
                              datasets=args.datasets)
    except (NoResultsError, FileNotFoundError, ValueError) as exc:
        print(f"rank report: error: {exc}", file=sys.stderr)
        return 1
    # A report of some seeds never lands where the pooled report of the same sweep is.
    # The same selection in another order (--recipes edm rf, rf edm rf) is the same report: one folder.
    restricted = f"-train_seeds={'_'.join(sorted(set(report.train_seeds), key=seed_order))}" \
        if report.train_seeds is not None else ""
    restricted += "-by_sweep" if report.by_sweep else ""
    restricted += f"-recipes={_names_slug(sorted(set(report.recipes)))}" if report.recipes is not None else ""
    restricted += f"-datasets={'_'.join(sorted(set(report.datasets)))}" if report.datasets is not None else ""
    restricted += f"-sampler={_names_slug([args.sampler])}" if args.sampler is not None else ""
    fifty = _fifty_step_arg(args.fifty_step_cfg)  # another 50-step column: another report
    restricted += f"-fifty_step_cfg={fifty if isinstance(fifty, str) else '_'.join(f'{v:g}' for v in fifty)}" \
        if fifty is not None else ""
    out_dir = args.out or DEFAULT_REPORTS / f"{report.sweep.name}{restricted}"
    published: dict = {}  # the W&B run's files, or the error that stopped the upload

    def publish(paths: dict[str, Path]) -> None:
        import wandb

        from src.ranking.publish import publish_wandb

        try:
            published["files"] = publish_wandb(report, paths, label=f"{report.sweep.name}{restricted}")
        except (wandb.errors.Error, OSError) as exc:  # no credentials for online mode, no network, ...
            published["error"] = exc

    try:
        write_report(report, out_dir, then=publish if args.wandb else None)
    except OSError as exc:  # an output folder that cannot be made or written
        print(f"rank report: error: --out {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(terminal_text(report))
    print(f"\nReport written to {out_dir}/ (report.md, report.html, CSVs, PNGs).")
    if "error" in published:
        exc = published["error"]
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"rank report: error: --wandb: {type(exc).__name__}: {message} (the report in {out_dir}/ is "
              "written; WANDB_MODE=offline publishes it locally, `wandb sync` uploads it later)", file=sys.stderr)
        return 1
    if args.wandb:
        files = published["files"]
        print(f"W&B run files: {files}" if files else "W&B is disabled (WANDB_MODE=disabled or the mode in W&B's "
              "settings): nothing published")
    return 0


if __name__ == "__main__":
    sys.exit(main())
