"""--recipes and --datasets: rank some recipes among themselves on some datasets' settings, in a report of its own."""
import pytest

from src.ranking.report import build_report, main, markdown
from src.ranking.synthetic import write_synthetic_sweep

RECIPES = ("rf/lognorm(0.00, 1.00)", "rf", "edm/rf", "v/cos")
SMALL = dict(datasets=("digits", "shapes"), n_samples=16, n_reference=24, dim=3, sampler_settings=[(5, 5.0), (50, 5.0)])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    # quality falls along RECIPES: rf/lognorm(0.00, 1.00) is best, v/cos worst
    return write_synthetic_sweep(tmp_path_factory.mktemp("r") / "pairs", recipes=RECIPES,
                                 quality=(0.95, 0.6, 0.4, 0.1), **SMALL)


def test_some_recipes_on_one_dataset_are_ranked_among_themselves(sweep):
    full = build_report([sweep], draws=0)
    some = build_report([sweep], draws=0, recipes=["edm/rf", "v/cos"], datasets=["shapes"])
    assert sorted(some.table.index) == ["edm/rf", "v/cos"]
    assert set(some.records["dataset"]) == {"shapes"} and set(some.ranked["dataset"]) == {"shapes"}
    assert some.n_settings["all"] == full.n_settings["all"] // 2  # one dataset's settings of two
    # Among two, the better one is first: its ranks are relative to the recipes kept, not to the full table.
    assert some.table.loc["edm/rf", "all"] < some.table.loc["v/cos", "all"] <= 2.0
    assert full.table.loc["v/cos", "all"] > some.table.loc["v/cos", "all"]
    assert "Restricted: only edm/rf, v/cos, ranked among themselves (--recipes); only the settings of shapes " \
           "(--datasets)." in markdown(some)
    assert "Restricted:" not in markdown(full)


def test_the_cli_writes_a_report_of_its_own_and_refuses_absent_names(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default report directory is relative: reports/<sweep>-recipes=...
    assert main([str(sweep), "--bootstrap", "0", "--recipes", "rf", "edm/rf", "--datasets", "digits"]) == 0
    report = tmp_path / "reports" / "pairs-recipes=edm_rf+rf-datasets=digits"  # names sorted: one folder per choice
    assert (report / "report.md").is_file()
    assert not (tmp_path / "reports" / "pairs").exists()  # the full report is never overwritten by a restricted one
    assert main([str(sweep), "--bootstrap", "0", "--recipes", "edm/rf", "rf", "rf", "--datasets", "digits"]) == 0
    assert [p.name for p in (tmp_path / "reports").iterdir()] == [report.name]  # was a second folder, edm_rf+rf+rf
    capsys.readouterr()
    assert main([str(sweep), "--bootstrap", "0", "--recipes", "rf", "edm", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err == ("rank report: error: --recipes 'edm': not in the sweep; it has edm/rf, rf, "
                   "rf/lognorm(0.00, 1.00), v/cos\n")
    assert main([str(sweep), "--bootstrap", "0", "--datasets", "imagenet", "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == ("rank report: error: --datasets imagenet: no records of that dataset; the sweep "
                                       "has digits, shapes\n")
    assert not (tmp_path / "r").exists()


def test_a_dataset_the_chosen_recipes_lack_is_not_said_absent_from_the_sweep(tmp_path, capsys):
    """--recipes eps/linear --datasets shapes where only eps/linear lacks shapes: the error must not claim that the
    sweep has no shapes (it has); it names the restriction the datasets were looked for in."""
    missing = [("eps/linear", "shapes", 5, 5.0, ema) for ema in (True, False)]
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear"), datasets=("digits", "shapes"),
                                  n_samples=4, n_reference=4, dim=2, sampler_settings=[(5, 5.0)], missing=missing)
    args = [str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "r")]
    assert main([*args, "--recipes", "eps/linear", "--datasets", "shapes"]) == 1
    assert main([*args, "--datasets", "pets"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rank report: error: --datasets shapes: no records of that dataset; the sweep restricted to "
                   "--recipes eps/linear has digits",
                   "rank report: error: --datasets pets: no records of that dataset; the sweep has digits, shapes"]
    assert not (tmp_path / "r").exists()
