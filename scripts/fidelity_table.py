"""The fidelity study's tables: how well each rung of the embedded proxy predicts the paper's Table 1.

    python scripts/fidelity_table.py default=outputs/multirun/table1 steps4x=outputs/multirun/table1_rung1 \
        [--bootstrap 200] [--out bench/results/fidelity_table1.md]

Each NAME=SWEEP_DIR is one rung (a sweep of Table 1's recipes, e.g. sweeps/table1.yaml). Per rung it builds the rank
report (src.ranking.report: seeds pooled as replicates, bootstrap over seeds and samples) and the report of each
training seed alone (--train-seeds), and prints per column: Spearman with Table 1, its interval, each seed alone,
the mean Spearman between the seeds' own rankings (seed vs seed: the proxy's self-consistency), and how many of the
paper's top 3 are in our top 5; then the recipes that disagree most with the paper (the gap between our position
and the paper's among the recipes both rank), the Spearman leaving out one parameterisation, and each recipe's
average rank with each dataset ranked alone (which dataset carries the agreement, and whether its seeds agree).
Nothing is written unless --out is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.ranking.aggregate import seed_order  # noqa: E402
from src.ranking.agreement import noise_ceiling, seed_agreement, spearman_brown  # noqa: E402
from src.ranking.paper import COLUMNS, spearman_vs_paper  # noqa: E402
from src.ranking.report import NoResultsError, build_report, rank_records, ranks_per_seed  # noqa: E402
from src.utils.io import atomic_write_bytes  # noqa: E402


def positions(values: pd.Series) -> pd.Series:
    """1-based position of each recipe by average rank (ties share the mean position)."""
    return values.rank(method="average")


def rung_tables(name: str, sweep: Path, draws: int, seed: int) -> list[str]:
    """Markdown lines for one rung."""
    pooled = build_report([sweep], draws=draws, seed=seed)
    seeds = sorted(pooled.records["train_seed"].astype(str).unique(), key=seed_order)
    # Each seed alone, as --train-seeds S would rank it (one seed: alone is the pooled report).
    per_seed = pooled.seed_ranks or {seeds[0]: pooled.table}
    alone = {s: spearman_vs_paper(per_seed[s][list(COLUMNS)]).set_index("column") for s in seeds}
    sp = pooled.spearman.set_index("column")
    n_runs = int((pooled.sweep.runs["status"] == "done").sum())
    head = ["column", "seeds pooled", "p", "90% interval (seeds and samples)",
            *[f"seed {s} alone" for s in seeds], "seed vs seed", "paper's top 3 in our top 5"]
    lines = [f"### Rung `{name}` ({sweep}): {n_runs} finished runs, seeds {', '.join(seeds)}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for column in COLUMNS:
        row = sp.loc[column]
        interval = f"[{row['lo']:.2f}, {row['hi']:.2f}]" if "lo" in sp and pd.notna(row.get("lo")) else "-"
        cells = [column, f"{row['spearman']:.2f}", f"{row['p_value']:.2f}", interval,
                 *[f"{alone[s].loc[column, 'spearman']:.2f}" for s in seeds],
                 _fmt(pooled.seed_agreement.get(column, float("nan"))),
                 _count(row["paper top 3 in our top 5"])]
        lines.append("| " + " | ".join(cells) + " |")
    table = pooled.table
    ours, paper = positions(table["all"]), positions(table["paper all"])
    gap = (ours - paper).dropna().sort_values(key=abs, ascending=False)
    lines += ["", "Largest disagreements on 'all' (our position - the paper's, among the recipes both rank): "
              + "; ".join(f"{r} {ours[r]:.0f} vs {paper[r]:.0f}" for r in gap.index[:5]) + ".", ""]
    lines += ["Spearman on 'all' leaving out one parameterisation (which family drives the disagreement): "
              + "; ".join(f"without {g} ({n} recipe{'s' * (n != 1)}) {_fmt(rho)}"
                          for g, n, rho in leave_one_family_out(pooled))
              + ".", ""]
    lines += dataset_table(pooled)
    agree = pooled.seed_agreement.get("all", float("nan"))
    if not pd.isna(agree):
        lines += [f"Noise ceiling on 'all': seeds agree at {agree:.2f}, so the mean of {len(seeds)} seeds has "
                  f"reliability {spearman_brown(agree, len(seeds)):.2f} (Spearman-Brown); were the proxy's expected "
                  f"ranking exactly the paper's, training-seed noise alone would hold the pooled Spearman near "
                  f"{_fmt(noise_ceiling(agree, len(seeds)))}.", ""]
    pairs = pooled.inseparable()
    lines += [f"Pairs of recipes the bootstrap cannot separate over all settings: {len(pairs)} of "
              f"{len(table) * (len(table) - 1) // 2}." if pairs is not None else
              "Pairs the bootstrap cannot separate: not computed (--bootstrap 0).", ""]
    return lines


def parameterisation(family: str) -> str:
    """The prediction target of a recipe family: rf, eps, v or edm (edm_cos and edm_rf are EDM-preconditioned)."""
    return str(family).split("_")[0]


def leave_one_family_out(report) -> list[tuple[str, int, float]]:
    """(parameterisation, recipes left out, Spearman of 'all' with Table 1 over the remaining recipes)."""
    family = report.records.drop_duplicates("entry").set_index("entry")["family"].map(parameterisation)
    both = pd.concat([report.table["all"], report.table["paper all"], family.rename("group")], axis=1).dropna()
    out = []
    for group in sorted(both["group"].unique()):
        rest = both[both["group"] != group]
        rho = stats.spearmanr(rest["all"], rest["paper all"]).statistic if len(rest) >= 3 else float("nan")
        out.append((group, int((both["group"] == group).sum()), float(rho)))
    return out


def per_dataset(report) -> dict[str, tuple[pd.DataFrame, float]]:
    """dataset -> (average ranks per column with that dataset's settings ranked alone, seed agreement on 'all').

    The paper averages ranks over both of its datasets; a proxy dataset whose ranking disagrees with the paper's on
    its own, or whose seeds disagree with each other, shows which half of the proxy misleads the pooled ranking."""
    out = {}
    for dataset in sorted(report.records["dataset"].unique()):
        records = report.records[report.records["dataset"] == dataset]
        seeds = ranks_per_seed(records)
        agree = seed_agreement([t["all"] for t in seeds.values()]) if seeds else float("nan")
        out[str(dataset)] = (rank_records(records), agree)
    return out


def dataset_table(report) -> list[str]:
    """Markdown: each recipe's average rank on 'all' per dataset alone, pooled and in the paper, with the Spearman of
    each column with the paper's and the seeds' agreement."""
    datasets = per_dataset(report)
    if len(datasets) < 2:
        return []
    ranks = pd.concat({d: t["all"] for d, (t, _) in datasets.items()}, axis=1)
    ranks["both"], ranks["paper"] = report.table["all"], report.table["paper all"]
    ranks = ranks.sort_values("paper", na_position="last")
    head = ["recipe", *[f"{d} alone" for d in datasets], "both (the report)", "paper"]
    lines = ["Average rank on 'all' with each dataset's settings ranked alone (which dataset carries the agreement):",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([str(r), *[_fmt(v) for v in row]]) + " |" for r, row in ranks.iterrows()]
    rho = [spearman_vs_paper(ranks[[c]].rename(columns={c: "all"})).set_index("column").loc["all", "spearman"]
           for c in ranks.columns[:-1]]
    lines.append("| Spearman with the paper | " + " | ".join(_fmt(v) for v in rho) + " | |")
    lines.append("| seed vs seed | " + " | ".join(_fmt(a) for _, a in datasets.values())
                 + f" | {_fmt(report.seed_agreement.get('all', float('nan')))} | |")
    return lines + [""]


def _fmt(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:.2f}"


def _count(value) -> str:
    return "-" if pd.isna(value) else f"{int(value)} of 3"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rungs", nargs="+", metavar="NAME=SWEEP_DIR")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap draws of the pooled report")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--out", type=Path, help="write the Markdown here as well (atomically)")
    args = parser.parse_args(argv)
    lines: list[str] = []
    for rung in args.rungs:
        name, sep, path = rung.partition("=")
        if not sep or not name or not path:
            parser.error(f"rung {rung!r}: expected NAME=SWEEP_DIR, e.g. default=outputs/multirun/table1")
        try:
            lines += rung_tables(name, Path(path), args.bootstrap, args.seed)
        except (FileNotFoundError, ValueError, NoResultsError) as exc:  # no sweep, nothing ranked, mixed settings
            print(f"fidelity table: error: rung {name}: {exc}", file=sys.stderr)
            return 1
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
