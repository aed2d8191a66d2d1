"""The rank report end to end on synthetic sweeps: files, Markdown parsed back, partial sweeps, errors."""
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from src.ranking.aggregate import average_ranks, load_sweep, pool_seeds, rank_table, setting_groups
from src.ranking.report import build_report, latest_sweep, main, markdown
from src.ranking.synthetic import write_synthetic_sweep
from src.ranking.tables import Table, fmt, parse_markdown_table
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("rf/lognorm(0.00, 1.00)", "eps/linear", "my/new(0.50)", "edm(-1.20, 1.20)", "v/cos")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One dataset, 12 control settings, a missing setting, a failed and a running job."""
    root = tmp_path_factory.mktemp("multirun") / "demo"
    return write_synthetic_sweep(
        root, recipes=RECIPES, datasets=("digits",), n_samples=24, n_reference=32, dim=3,
        missing=[("eps/linear", "digits", 5, 5.0, True)], failed=("edm(-1.20, 1.20)",), running=("v/cos",),
    )


@pytest.fixture(scope="module")
def report_run(sweep, tmp_path_factory):
    """The CLI run once: output directory and terminal text."""
    out = tmp_path_factory.mktemp("report")
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([str(sweep), "--out", str(out), "--bootstrap", "30"]) == 0
    return out, buffer.getvalue()


def test_report_files_exist(report_run):
    out, _ = report_run
    for name in ("report.md", "report.html", "ranks.csv", "records.csv", "runs.csv", "spearman.csv", "table2.csv",
                 "separability.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("pareto_fronts.png", "average_ranks.png", "metrics_vs_steps.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table" in html
    assert not list(out.glob(".*tmp"))  # no temp files left behind


def test_markdown_table_parses_back_to_the_averages(report_run, sweep):
    out, _ = report_run
    rows = parse_markdown_table((out / "report.md").read_text())
    ranked = rank_table(pool_seeds(load_sweep([sweep]).records))
    expected = average_ranks(ranked, setting_groups(ranked))
    assert [r["recipe"].rstrip(" *") for r in rows] == list(expected.index)  # sorted by average over all settings
    assert list(rows[0]) == ["recipe", "all (n=12)", "5 steps (n=2)", "50 steps (n=2)", "P(front 1) all",
                             "P(front 1) 5 steps", "P(front 1) 50 steps", "seeds", "paper all", "paper 5 steps",
                             "paper 50 steps"]
    assert all(r["seeds"] == "1" for r in rows)  # one run per recipe: one seed each, none marked
    for row in rows:
        recipe = row["recipe"].rstrip(" *")
        value, interval = row["all (n=12)"].split(" [", 1)
        assert float(value) == pytest.approx(expected.loc[recipe, "all"], abs=0.005)
        lo, hi = (float(x) for x in interval.split("]")[0].split(", "))
        assert 1.0 <= lo <= hi <= 3.0
    eps = next(r for r in rows if r["recipe"].startswith("eps/linear"))
    assert eps["recipe"] == "eps/linear *" and "(n=11)" in eps["all (n=12)"] and "(n=1)" in eps["5 steps (n=2)"]
    assert eps["paper all"] == "2.88"
    mine = next(r for r in rows if r["recipe"] == "my/new(0.50)")
    assert mine["paper all"] == "-"


def test_csv_matches_and_report_states_partial_sweep(report_run):
    out, terminal = report_run
    ranks = pd.read_csv(out / "ranks.csv").set_index("recipe")
    assert ranks.loc["eps/linear", "n all"] == 11 and ranks.loc["eps/linear", "missing settings"] == 1
    runs = pd.read_csv(out / "runs.csv")
    assert runs["status"].value_counts().to_dict() == {"done": 3, "failed": 1, "incomplete": 1}
    text = (out / "report.md").read_text()
    for needle in ("PARTIAL SWEEP", "1 failed, 1 running or killed", "eps/linear lacks 1 of 12 settings: "
                   "digits, 5 steps, cfg 5.0, EMA", "FloatingPointError: loss is NaN",
                   "loss='v/cos' data=digits | running or killed", "Spearman correlation",
                   "50 steps column: the 50-step settings at CFG 5.0, the default: the paper's 50-step averages",
                   "(2 settings: digits x 50 steps, cfg 5.0 x EMA, raw)", "5 steps column: 2 settings: digits x 5 steps,"
                   " cfg 5.0 x EMA, raw", "paper Table 2 form", "percentile interval over 30 bootstrap draws",
                   "so the intervals include training-seed variance", "Seeds: every entry has 1 training seed.",
                   "FID features: raw (un-normalised) CLIP image embeddings"):
        assert needle in text, needle
    assert "PARTIAL SWEEP" in terminal and "| recipe | all (n=12)" in terminal


def test_fifty_step_cfg_and_no_bootstrap(sweep, tmp_path):
    report = build_report([sweep], fifty_step_cfg=[5.0], draws=0)
    rows = parse_markdown_table(markdown(report))
    assert "50 steps (n=2)" in rows[0] and "[" not in rows[0]["all (n=12)"]
    assert "chosen with --fifty-step-cfg" in markdown(report)


def test_a_rewrite_without_the_bootstrap_leaves_no_earlier_separability_or_sample_sheet(sweep, tmp_path):
    from src.ranking.report import write_report

    out = tmp_path / "report"
    out.mkdir()
    (out / "separability.csv").write_text("recipe,other,p_better,column\n")  # an earlier report's, bootstrap on
    (out / "samples_gone.png").write_bytes(PNG_MAGIC)  # of a dataset this report no longer has
    (out / "notes.txt").write_text("the user's")
    write_report(build_report([sweep], draws=0), out)
    assert not (out / "separability.csv").exists() and not (out / "samples_gone.png").exists()
    assert (out / "notes.txt").exists() and (out / "ranks.csv").exists()


def test_a_rewrite_removes_the_temp_files_of_a_killed_report(sweep, tmp_path):
    """kill -9 while report.html was written leaves its temp file (as large as the page); the next report removes
    it (it holds the folder's lock: no other report is writing there). Other hidden files stay."""
    from src.ranking.report import write_report

    out = tmp_path / "report"
    out.mkdir()
    (out / ".report.html.k1ll3d_x.tmp").write_bytes(b"<html>half a page")
    (out / ".ranks.csv.0123456789abcdef0123456789abcdef.tmp").write_text("recipe")
    (out / ".notes.tmp").write_text("the user's")
    write_report(build_report([sweep], draws=0), out)
    assert sorted(p.name for p in out.glob(".*tmp")) == [".notes.tmp"] and (out / "report.html").exists()


def test_a_report_killed_part_way_leaves_none_of_its_files_beside_the_earlier_report(sweep, tmp_path, monkeypatch):
    """A report is written into a staging folder, then replaces the earlier one: a kill or a failure midway left
    this report's figures and CSVs beside the earlier report.md and report.html, read as current. Every file a
    report writes is one REPORT_FILES names (or a sample sheet), so none is left out of that replacement; a staging
    folder a kill -9 left is removed by the next report."""
    from src.ranking import report as report_module
    from src.ranking.report import REPORT_FILES, write_report

    out = tmp_path / "report"
    built = build_report([sweep], draws=30)
    paths = write_report(built, out)
    sheets = {p.name for p in paths.values() if p.name.startswith(("samples_", "steps_cfg_"))}
    assert {p.name for p in paths.values()} == set(REPORT_FILES) | sheets
    assert all(p.parent == out and p.is_file() for p in paths.values())
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    (out / "notes.txt").write_text("the user's")
    real = report_module._write_text

    def killed_at_the_csvs(path, text):
        if path.name == "fronts.csv":
            raise KeyboardInterrupt
        return real(path, text)

    monkeypatch.setattr(report_module, "_write_text", killed_at_the_csvs)
    with pytest.raises(KeyboardInterrupt):
        write_report(build_report([sweep], draws=0), out)
    left = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert left == {**earlier, "notes.txt": b"the user's"}  # the earlier report whole, nothing of this one
    assert not [p for p in out.iterdir() if p.is_dir()]  # no staging folder
    (out / ".report-staging-k1ll3d").mkdir()  # as a kill -9 leaves it
    monkeypatch.setattr(report_module, "_write_text", real)
    write_report(build_report([sweep], draws=0), out)
    assert not [p for p in out.iterdir() if p.is_dir()] and not (out / "separability.csv").exists()


def test_no_results_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty" / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty" / "0" / ".hydra" / "config.yaml").write_text("a: 1\n")
    assert main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no results found in" in err and str(tmp_path / "empty") in err
    assert main([str(tmp_path / "empty"), "--fifty-step-cfg", "7"]) == 1


def test_no_results_says_what_the_jobs_are_in_words(tmp_path, capsys):
    """A sweep killed before any job started, or whose every run failed: the one line says so in the report's words
    (not a Python dict of statuses) with the first run's error; a folder that holds no job asks if it is a sweep."""
    import json

    from src.launch.planned import record_planned_jobs

    record_planned_jobs(tmp_path / "killed", {f"digits/r{i}": {"run_dir": f"digits/r{i}"} for i in range(2)})
    failed = tmp_path / "failed" / "digits" / "rf"
    failed.mkdir(parents=True)
    (failed / "error.json").write_text(json.dumps({"type": "FloatingPointError", "error": "loss is inf\nmore"}))
    (tmp_path / "nothing").mkdir()
    errors = []
    for name in ("killed", "failed", "nothing"):
        assert main([str(tmp_path / name), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
        errors.append(capsys.readouterr().err.strip())
    assert all(e.count("\n") == 0 and "{" not in e for e in errors) and not (tmp_path / "r").exists()
    assert errors[0].endswith("killed (2 jobs: 2 never started)")
    assert errors[1].endswith(f"failed (1 job: 1 failed; e.g. {failed}: FloatingPointError: loss is inf)")
    assert errors[2].endswith("nothing (no run directories and no planned jobs: is it a sweep directory?)")


def test_latest_sweep_by_mtime_and_default_out_dir(sweep, tmp_path, monkeypatch):
    root = tmp_path / "outputs" / "multirun"
    small = dict(recipes=RECIPES[:2], datasets=("digits",), n_samples=4, n_reference=4, dim=2,
                 sampler_settings=[(25, 5.0)])
    old, new = write_synthetic_sweep(root / "old", **small), write_synthetic_sweep(root / "new", **small)
    for path, t in ((old, 2e9), (new, 1e9)):  # "old" touched last
        for p in (path, *path.iterdir()):
            os.utime(p, (t, t))
    assert latest_sweep(root) == old
    monkeypatch.chdir(tmp_path)
    assert main(["--bootstrap", "0"]) == 0
    assert (tmp_path / "reports" / "old" / "report.md").is_file()


def test_latest_sweep_of_sweeps_touched_at_once_does_not_depend_on_the_listing_order(tmp_path, monkeypatch):
    root = tmp_path / "multirun"
    for name in ("a", "b"):
        (root / name / "run").mkdir(parents=True)
    for p in (root / "a", root / "a" / "run", root / "b", root / "b" / "run"):
        os.utime(p, (1e9, 1e9))
    listed = Path.iterdir
    found = set()
    for order in (sorted, lambda paths: sorted(paths, reverse=True)):
        monkeypatch.setattr(Path, "iterdir", lambda self, order=order: iter(order(listed(self))))
        found.add(latest_sweep(root))
    assert found == {root / "b"}


def test_module_runs_and_fails_cleanly_without_sweeps(tmp_path):
    result = warm.run([sys.executable, "-m", "src.ranking.report", "--multirun-root", str(tmp_path / "none")],
                      cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"rank report: error: no sweep found: {tmp_path / 'none'} has no sweep directories"


def test_inseparable_recipes_are_listed(tmp_path):
    import json

    sweep = write_synthetic_sweep(tmp_path / "twins", recipes=("good", "twin-a", "twin-b"), quality=(1.0, 0.3, 0.3),
                                  datasets=("digits",), n_samples=16, n_reference=16, dim=3,
                                  sampler_settings=[(5, 5.0), (50, 5.0)])
    a, b = (json.loads((sweep / str(i) / "results.json").read_text()) for i in (1, 2))
    for rec_a, rec_b in zip(a, b):  # twin-b: the same samples and metrics as twin-a
        rec_b.update(clip_score=rec_a["clip_score"], fid_clip=rec_a["fid_clip"], arrays=f"../1/{rec_a['arrays']}")
    (sweep / "2" / "results.json").write_text(json.dumps(b))
    text = markdown(build_report([sweep], draws=20))
    assert "1 pair of entries cannot be separated" in text
    rows = parse_markdown_table(text.split("## Recipes the data cannot separate (all settings)")[1])
    assert rows == [{"recipe": "twin-a", "cannot be separated from (P(recipe ranks better))": "twin-b (0.50)"},
                    {"recipe": "twin-b", "cannot be separated from (P(recipe ranks better))": "twin-a (0.50)"}]


def test_the_separability_table_gives_each_side_its_own_probability():
    from types import SimpleNamespace

    from src.ranking.report import separability_table

    report = SimpleNamespace(bootstrap=object(), table=pd.DataFrame(index=["a", "b", "c"]),
                             inseparable=lambda: [("a", "b", 0.8), ("a", "c", 0.3)])
    rows = separability_table(report).rows
    assert rows == [["a", "b (0.80); c (0.30)"], ["b", "a (0.20)"], ["c", "a (0.70)"]]


def test_table2_is_at_25_steps_with_ema_weights_only():
    from src.ranking.report import metrics_table

    ranked = pd.DataFrame([
        {"recipe": "rf", "dataset": "digits", "setting": f"{steps} steps, cfg 5.0", "steps": steps, "ema": ema,
         "clip_score": clip, "fid_clip": fid, "fid_inception": None}
        for steps, ema, clip, fid in ((25, True, 0.3, 1.0), (25, False, 0.1, 9.0), (50, True, 0.2, 2.0))])
    wide = metrics_table(ranked)
    assert wide.to_dict("records") == [{("digits", "25 steps, cfg 5.0", "clip_score"): 0.3,
                                        ("digits", "25 steps, cfg 5.0", "fid_clip"): 1.0}]
    assert metrics_table(ranked, ema=False).iloc[0].tolist() == [0.1, 9.0]


def test_table2_lists_the_entries_in_table1_order():
    from types import SimpleNamespace

    from src.ranking.report import table2

    ranked = pd.DataFrame([{"recipe": r, "dataset": "digits", "setting": "25 steps, cfg 5.0", "steps": 25, "ema": True,
                            "clip_score": c, "fid_clip": 1.0, "fid_inception": None}
                           for r, c in (("a", 0.1), ("b", 0.3))])
    report = SimpleNamespace(ranked=ranked, table=pd.DataFrame(index=["b", "a"]))  # b ranks first
    assert [row[0] for row in table2(report).rows] == ["b", "a"]


def test_table2_shows_an_entry_whose_metrics_are_all_null_there_and_no_pair_not_evaluated():
    # pivot_table dropped a diverged entry's row (every metric null at 25 steps) from Table 2 and table2.csv unsaid
    from src.ranking.report import metrics_table

    ranked = pd.DataFrame([{"recipe": r, "dataset": d, "setting": s, "steps": 25, "ema": True, "clip_score": c,
                            "fid_clip": f, "fid_inception": None}
                           for r, d, s, c, f in (("a", "digits", "25 steps, cfg 5.0", 0.3, 1.0),
                                                 ("b", "digits", "25 steps, cfg 5.0", None, None),
                                                 ("a", "shapes", "25 steps, cfg 2.5", 0.2, 2.0))])
    wide = metrics_table(ranked)
    assert list(wide.index) == ["a", "b"] and wide.loc["b"].isna().all()
    assert sorted({c[:2] for c in wide.columns}) == [("digits", "25 steps, cfg 5.0"), ("shapes", "25 steps, cfg 2.5")]


def test_a_sweep_given_as_dot_or_dotdot_is_named_by_its_folder(sweep, tmp_path, monkeypatch, capsys):
    # `.` once titled the report "Rank report: " and wrote it into reports/ itself; `..` into the current folder
    monkeypatch.chdir(sweep)
    assert load_sweep(["."]).name == sweep.name and load_sweep(["0/.."]).name == sweep.name
    out = tmp_path / "r"
    assert main([".", "--bootstrap", "0", "--out", str(out)]) == 0
    assert (out / "report.md").read_text().startswith(f"# Rank report: {sweep.name}\n")
    capsys.readouterr()


def test_markdown_tables_escape_pipes_and_parse_back_cell_for_cell():
    table = Table(["recipe", "note"], [["a|b", "x | y |"], ["c", ""], ["C:\\runs\\", "a\\|b"]])
    text = "intro\n" + table.markdown() + "\n\nafter"
    assert "a\\|b" in text  # the pipe escaped, or it would split the cell
    assert "| C:\\\\runs\\\\ | a\\\\\\|b |" in text  # backslashes too: a trailing one would escape the separator
    assert parse_markdown_table(text) == [{"recipe": "a|b", "note": "x | y |"}, {"recipe": "c", "note": ""},
                                          {"recipe": "C:\\runs\\", "note": "a\\|b"}]
    assert "<th>&lt;b&gt;</th>" in Table(["<b>"], [["<i>"]]).html()
    assert "<td>&lt;i&gt;</td>" in Table(["<b>"], [["<i>"]]).html()


@pytest.mark.parametrize("text", ["no table here", "| a | b |\n| 1 | 2 |", "| a | b |"])
def test_parse_markdown_table_refuses_text_without_a_header_separator(text):
    with pytest.raises(ValueError, match="no Markdown table"):
        parse_markdown_table(text)


def test_fmt_writes_a_dash_for_a_missing_or_non_finite_number():
    """Table cells for a value the report lacks (None, NaN, an infinite ratio) read '-', never 'nan' or 'inf'."""
    assert [fmt(None), fmt(float("nan")), fmt(float("inf")), fmt(-float("inf"))] == ["-"] * 4
    assert fmt(1.23456) == "1.23" and fmt(2, digits=1) == "2.0"


def test_spearman_line_gives_each_columns_correlation_interval_and_top_three_or_why_not():
    """The paper-comparison sentence: rho with p, shared count and bootstrap interval where finite; 'n/a' with the
    reason where not; the top-3 overlap only where defined; and why there is no comparison at all."""
    from src.ranking.report import spearman_line

    nan = float("nan")
    frame = pd.DataFrame({"column": ["all", "5 steps", "50 steps"], "n_shared": [6, 2, 4],
                          "spearman": [0.8, nan, 0.4], "p_value": [0.0012, nan, 0.6],
                          "paper top 3 in our top 5": [2.0, nan, nan], "lo": [0.5, nan, nan], "hi": [0.9, nan, nan]})
    line = spearman_line(frame)
    assert "all: 0.80 (p=0.0012, 6 recipes, bootstrap interval [0.50, 0.90]), the paper's top 3 in our top 5: 2 of " \
           "3; 5 steps: n/a (2 shared recipes, need >= 3 with distinct ranks); 50 steps: 0.40 (p=0.6, 4 recipes) (" \
           in line
    assert spearman_line(frame.drop(columns=["lo", "hi"])).count("bootstrap interval") == 0
    none = frame.assign(n_shared=0)
    assert spearman_line(none, ["mine"]) == "Paper comparison: no recipe of this sweep is in the paper's Table 1."
    assert "qualified entries (e.g. rf/cosmap [sampler=native])" in spearman_line(none, ["rf/cosmap [sampler=native]"])


def test_table1_cells_mark_fewer_seeds_missing_settings_and_only_finite_intervals():
    """Table 1 form: an entry lacking seeds in some setting shows 'fewest-most' seeds and the fewer-seeds mark; a
    column averaged over fewer settings than the sweep has says its n; an average it lacks gets no interval."""
    from types import SimpleNamespace

    from src.ranking.report import FEWER_SEEDS, table1

    nan = float("nan")
    table = pd.DataFrame({
        "all": [1.5, 2.0], "all lo": [1.0, 1.5], "all hi": [2.0, 2.5], "n all": [3, 4],
        "5 steps": [1.0, 2.0], "5 steps lo": [1.0, 2.0], "5 steps hi": [1.0, 2.0], "n 5 steps": [2, 2],
        "50 steps": [nan, 2.0], "50 steps lo": [nan, 2.0], "50 steps hi": [nan, 2.0], "n 50 steps": [0, 2],
        "P(front 1) all": [0.5, 0.25], "P(front 1) 5 steps": [1.0, 0.0], "P(front 1) 50 steps": [nan, 0.5],
        "seeds": [3, 3], "seeds min": [2, 3], "paper all": [nan, nan], "paper 5 steps": [nan, nan],
        "paper 50 steps": [nan, nan]}, index=pd.Index(["a", "b"], name="recipe"))
    report = SimpleNamespace(table=table, n_settings={"all": 4, "5 steps": 2, "50 steps": 2}, missing=["a"],
                             max_seeds=3)
    shown = table1(report)
    assert shown.headers[:2] == ["recipe", "all (n=4)"] and "paper all" not in shown.headers
    a, b = shown.rows
    assert a[:4] == [f"a * {FEWER_SEEDS}", "1.50 [1.00, 2.00] (n=3)", "1.00 [1.00, 1.00]", "- (n=0)"]
    assert a[-1] == "2-3" and b[0] == "b" and b[-1] == "3"


def test_the_multirun_folder_given_for_a_sweep_is_refused_naming_its_sweeps(tmp_path, capsys):
    """`python -m src.ranking.report outputs/multirun`: pooled as one sweep, two sweeps of the same recipes would
    silently replace each other's records (and their jobs.json go unread); it is refused naming the sweeps."""
    root = tmp_path / "multirun"
    for name in ("a", "b"):
        sweep = write_synthetic_sweep(root / name, recipes=("rf", "v/cos"), datasets=("digits",), n_samples=4,
                                      n_reference=4, dim=2, sampler_settings=[(5, 5.0)])
        (sweep / "multirun.yaml").write_text("hydra: {}\n")  # what every launch writes at a sweep's top
    assert main([str(root), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == (f"rank report: error: {root} is not a sweep directory but holds 2 sweep(s) "
                                       f"(a, b): give the sweep directories themselves, e.g. {root / 'a'} "
                                       f"{root / 'b'}\n")
    assert not (tmp_path / "r").exists()
    assert main([str(root / "a"), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 0
