"""Several sweep directories in one report: pooled when they hold different runs, refused when two hold the same
entry, seed and setting (one would silently hide the other), ranked side by side with --by-sweep."""
import pandas as pd

from src.ranking.report import build_report, main
from src.ranking.synthetic import write_synthetic_sweep

COMMON = dict(datasets=("digits",), n_samples=12, n_reference=16, dim=2, sampler_settings=[(5, 5.0), (50, 5.0)],
              seeds=(0, 1))


def two_rungs(root):
    """Two budgets of one study: the same recipes and seeds, ordered oppositely."""
    rung0 = write_synthetic_sweep(root / "rung0", recipes=("rf", "eps/linear"), quality=(1.0, 0.0), **COMMON)
    rung1 = write_synthetic_sweep(root / "rung1", recipes=("rf", "eps/linear"), quality=(0.0, 1.0), seed=1, **COMMON)
    return rung0, rung1


def test_sweeps_holding_the_same_runs_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rung0, rung1 = two_rungs(tmp_path / "multirun")
    assert main([str(rung0), str(rung1), "--bootstrap", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("rank report: error: sweeps rung0, rung1 both hold ")
    assert "pass --by-sweep" in err and "(16 records in all)" in err
    assert not (tmp_path / "reports").exists()  # nothing written


def test_by_sweep_ranks_each_sweeps_entries_side_by_side(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rung0, rung1 = two_rungs(tmp_path / "multirun")
    assert main([str(rung0), str(rung1), "--bootstrap", "0", "--by-sweep"]) == 0
    out = tmp_path / "reports" / "rung0+rung1-by_sweep"  # never where a pooled report of the two would land
    ranks = pd.read_csv(out / "ranks.csv").set_index("recipe")
    assert sorted(ranks.index) == ["eps/linear [sweep=rung0]", "eps/linear [sweep=rung1]", "rf [sweep=rung0]",
                                   "rf [sweep=rung1]"]
    assert (ranks["seeds"] == 2).all()  # each sweep's seeds pool within its own entry
    # Each sweep keeps its own order: rf beats eps/linear in rung0, loses in rung1.
    assert ranks.loc["rf [sweep=rung0]", "all"] < ranks.loc["eps/linear [sweep=rung0]", "all"]
    assert ranks.loc["rf [sweep=rung1]", "all"] > ranks.loc["eps/linear [sweep=rung1]", "all"]
    assert "Sweeps ranked side by side (--by-sweep)" in (out / "report.md").read_text()


def test_sweeps_of_different_runs_are_pooled(tmp_path):
    root = tmp_path / "multirun"
    first = write_synthetic_sweep(root / "a", recipes=("rf", "eps/linear"), **COMMON)
    more = write_synthetic_sweep(root / "b", recipes=("v/cos",), seed=2, **COMMON)
    report = build_report([first, more], draws=0)
    assert sorted(report.table.index) == ["eps/linear", "rf", "v/cos"]


def test_by_sweep_needs_distinct_sweep_names(tmp_path, capsys):
    one = write_synthetic_sweep(tmp_path / "x" / "s", recipes=("rf",), **COMMON)
    two = write_synthetic_sweep(tmp_path / "y" / "s", recipes=("rf",), **COMMON)
    assert main([str(one), str(two), "--by-sweep", "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("rank report: error: --by-sweep: sweep directories share the name(s) s; the name is "
                           "the entries' qualifier, so each sweep needs its own")
    assert not (tmp_path / "r").exists()


def test_sweep_directories_of_one_name_holding_the_same_runs_are_refused(tmp_path, capsys):
    """x/default and y/default (the default sweep_name under two paths.root_dir): the same entry, seed and setting in
    both was pooled by dropping one of them silently, as records of one sweep (a rerun job) would be."""
    one = write_synthetic_sweep(tmp_path / "x" / "default", recipes=("rf", "eps/linear"), **COMMON)
    two = write_synthetic_sweep(tmp_path / "y" / "default", recipes=("rf",), seed=1, **COMMON)
    assert main([str(one), str(two), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"rank report: error: sweeps {one}, {two} both hold rf seed 0 at digits, "), err
    assert "--by-sweep needs sweep directories of different names" in err
    assert not (tmp_path / "r").exists()
