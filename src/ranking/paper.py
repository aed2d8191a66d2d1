"""The paper's Table 1 (Esser et al. 2024, section 5.1) as data, and the Spearman comparison with it (docs/ranking.md#comparison-with-table-1)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

COLUMNS = ("all", "5 steps", "50 steps")

# Table 1: average non-dominated rank over all / 5-step / 50-step control settings (docs/ranking.md#comparison-with-table-1).
PAPER_TABLE1: dict[str, tuple[float, float, float]] = {
    "rf/lognorm(0.00, 1.00)": (1.54, 1.25, 1.50),
    "rf/lognorm(1.00, 0.60)": (2.08, 3.50, 2.00),
    "rf/lognorm(0.50, 0.60)": (2.71, 8.50, 1.00),
    "rf/mode(1.29)": (2.75, 3.25, 3.00),
    "rf/lognorm(0.50, 1.00)": (2.83, 1.50, 2.50),
    "eps/linear": (2.88, 4.25, 2.75),
    "rf/mode(1.75)": (3.33, 2.75, 2.75),
    "rf/cosmap": (4.13, 3.75, 4.00),
    "edm(0.00, 0.60)": (5.63, 13.25, 3.25),
    "rf": (5.67, 6.50, 5.75),
    "v/linear": (6.83, 5.75, 7.75),
    "edm(0.60, 1.20)": (9.00, 13.00, 9.00),
    "v/cos": (9.17, 12.25, 8.75),
    "edm/cos": (11.04, 14.25, 11.25),
    "edm/rf": (13.04, 15.25, 13.25),
    "edm(-1.20, 1.20)": (15.58, 20.25, 15.00),
}

# "rf" is uniform t, i.e. rf/mode(0.00) (docs/formulations.md#the-61-recipes); other spellings of it match the paper's row.
ALIASES = {"rf/mode(0.00)": "rf", "rf/uniform": "rf", "rf/mode(-0.00)": "rf"}

MIN_SHARED = 3  # fewer shared recipes make a rank correlation meaningless


def paper_name(recipe: str) -> str:
    """The paper's Table 1 spelling of a recipe name."""
    return ALIASES.get(recipe, recipe)


def paper_table() -> pd.DataFrame:
    """Table 1 as a frame indexed by recipe with the columns all / 5 steps / 50 steps."""
    frame = pd.DataFrame.from_dict(PAPER_TABLE1, orient="index", columns=list(COLUMNS))
    frame.index.name = "recipe"
    return frame


def paper_ranks(recipes) -> pd.DataFrame:
    """The paper's average ranks for the given recipe names (NaN where Table 1 lacks the recipe, and for the second
    spelling of a recipe whose row another name here takes)."""
    table = paper_table()
    recipes = list(recipes)
    # One entry per row of Table 1: where two spellings of one recipe are both here (rf and rf/mode(0.00)), the
    # paper's own spelling (else the first) stands for the row; the other would count it twice in the correlation.
    stands_for: dict[str, str] = {}
    for r in recipes:
        name = paper_name(r)
        if name in table.index and (name not in stands_for or r == name):
            stands_for[name] = r
    rows = [table.loc[paper_name(r)] if stands_for.get(paper_name(r)) == r else None for r in recipes]
    frame = pd.DataFrame(
        [row.to_numpy() if row is not None else [math.nan] * len(COLUMNS) for row in rows],
        index=pd.Index(list(recipes), name="recipe"),
        columns=list(COLUMNS),
        dtype=float,
    )
    return frame


def spearman_vs_paper(average_ranks: pd.DataFrame) -> pd.DataFrame:
    """Spearman correlation of each column of average_ranks (indexed by recipe) with Table 1's, over shared recipes."""
    paper = paper_ranks(average_ranks.index)
    rows = []
    for column in COLUMNS:
        if column not in average_ranks.columns:
            continue
        both = pd.concat([average_ranks[column].astype(float), paper[column]], axis=1, keys=["ours", "paper"]).dropna()
        rho = p_value = math.nan
        if len(both) >= MIN_SHARED and both["ours"].nunique() > 1 and both["paper"].nunique() > 1:
            result = stats.spearmanr(both["ours"], both["paper"])
            rho, p_value = float(result.statistic), spearman_p_value(both["ours"], both["paper"], result)
        top = top_overlap(both["ours"].to_numpy(), both["paper"].to_numpy()) if len(both) > TOP_OURS else math.nan
        rows.append({"column": column, "n_shared": len(both), "spearman": rho, "p_value": p_value,
                     "paper top 3 in our top 5": top})
    return pd.DataFrame(rows, columns=["column", "n_shared", "spearman", "p_value", "paper top 3 in our top 5"])


EXACT_P_MAX = 8  # up to 8! = 40320 orderings, the p-value is counted over all of them


def spearman_p_value(ours, theirs, result) -> float:
    """Two-sided p-value of a Spearman correlation. scipy's comes from a t approximation that fails for a few
    recipes (p=0 for 3 recipes in the paper's order, where 2 of the 6 orderings are as extreme: p=1/3), so up to
    EXACT_P_MAX shared recipes it is the share of all orderings of our ranks at least as correlated."""
    if len(ours) > EXACT_P_MAX:
        return float(result.pvalue)
    a, b = stats.rankdata(ours), stats.rankdata(theirs)
    perms = a[np.array(list(itertools.permutations(range(len(a)))))]
    a0, b0, p0 = a - a.mean(), b - b.mean(), perms - a.mean()
    rhos = p0 @ b0 / (np.sqrt((a0 ** 2).sum()) * np.sqrt((b0 ** 2).sum()))
    return float(np.mean(np.abs(rhos) >= abs(float(result.statistic)) - 1e-12))


TOP_PAPER, TOP_OURS = 3, 5


def top_overlap(ours: np.ndarray, theirs: np.ndarray) -> int:
    """How many of Table 1's best TOP_PAPER recipes are among our best TOP_OURS (over shared recipes).

    Ties count in our favour at the boundary: a recipe is in our top 5 when fewer than 5 recipes rank strictly better.
    """
    ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
    paper_top = np.argsort(theirs, kind="stable")[:TOP_PAPER]
    better = (ours[None, :] < ours[paper_top, None]).sum(axis=1)
    return int((better < TOP_OURS).sum())


def spearman_draws(draws: dict[str, np.ndarray], recipes, confidence: float = 0.9) -> pd.DataFrame:
    """Percentile interval of the Spearman correlation with Table 1 over bootstrap draws of the average ranks.

    draws: column -> (B, recipes) average ranks. Over the recipes Table 1 shares with the draws; a draw whose
    ranks are all tied has no correlation and is left out.
    """
    paper = paper_ranks(recipes)
    tail = 100.0 * (1.0 - confidence) / 2.0
    rows = []
    for column in COLUMNS:
        avg = np.asarray(draws[column], float)
        shared = paper[column].notna().to_numpy() & np.isfinite(avg).all(axis=0)
        lo = hi = math.nan
        theirs = paper[column].to_numpy(float)[shared]
        if shared.sum() >= MIN_SHARED and len(np.unique(theirs)) > 1:
            ours = stats.rankdata(avg[:, shared], axis=1)
            ours = ours - ours.mean(axis=1, keepdims=True)
            ref = stats.rankdata(theirs) - stats.rankdata(theirs).mean()
            norm = np.sqrt((ours**2).sum(axis=1) * (ref**2).sum())
            with np.errstate(invalid="ignore", divide="ignore"):
                rho = np.where(norm > 0, ours @ ref / np.where(norm > 0, norm, 1.0), np.nan)
            if np.isfinite(rho).any():
                lo, hi = np.nanpercentile(rho, [tail, 100.0 - tail])
        top = math.nan
        if shared.sum() > TOP_OURS:
            finite = avg[:, shared]
            top = float(np.mean([top_overlap(row, theirs) for row in finite]))
        rows.append({"column": column, "lo": float(lo), "hi": float(hi), "top 3 in top 5 (mean over draws)": top})
    return pd.DataFrame(rows, columns=["column", "lo", "hi", "top 3 in top 5 (mean over draws)"])
