"""Ranking of recipes by non-dominated sorting per control setting, and the rank report (docs/ranking.md#ranking)."""
from src.ranking.aggregate import (
    Sweep, average_ranks, control_settings, find_run_dirs, load_sweep, missing_settings, pool_seeds, rank_table,
    setting_groups, split_seed,
)
from src.ranking.nds import dominance_matrix, non_dominated_ranks
from src.ranking.paper import PAPER_TABLE1, paper_table, spearman_vs_paper

__all__ = [
    "PAPER_TABLE1", "Sweep", "average_ranks", "control_settings", "dominance_matrix", "find_run_dirs", "load_sweep",
    "missing_settings", "non_dominated_ranks", "paper_table", "pool_seeds", "rank_table", "setting_groups",
    "spearman_vs_paper", "split_seed",
]
