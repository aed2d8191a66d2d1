"""Training seeds as replicates of one entry, sampler variants, exact averages and the FID-feature refusal, through
the report's own entry points (build_report, main) on synthetic sweeps written in the run-directory layout."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from src.ranking.aggregate import load_sweep, pool_seeds, split_seed
from src.ranking.bootstrap import inseparable_pairs, seed_weights
from src.ranking.report import FEWER_SEEDS, build_report, main, markdown, status_lines
from src.ranking.synthetic import write_synthetic_sweep
from src.ranking.tables import parse_markdown_table

SMALL = dict(datasets=("digits", "shapes"), n_samples=16, n_reference=24, dim=3,
             sampler_settings=[(5, 5.0), (50, 5.0)])


@pytest.mark.parametrize("name, expected", [
    ("rf", ("rf", None)),
    ("rf [seed=0]", ("rf", "0")),
    ("rf [optim.lr=0.0001,seed=1]", ("rf [optim.lr=0.0001]", "1")),
    ("rf [seed=2,optim.lr=0.0001]", ("rf [optim.lr=0.0001]", "2")),
    ("rf [DiT, seed=2]", ("rf [DiT]", "2")),
    ("rf [model.depths=[1,2],seed=3]", ("rf [model.depths=[1,2]]", "3")),
    ("eps/linear [sampler=native,seed=1]", ("eps/linear [sampler=native]", "1")),
    ("rf/lognorm(0.00, 1.00) [optim.lr=0.0001]", ("rf/lognorm(0.00, 1.00) [optim.lr=0.0001]", None)),
])
def test_the_seed_is_split_off_the_ranked_name(name, expected):
    assert split_seed(name) == expected


def test_a_recipe_with_three_seeds_is_one_entry_ranked_on_seed_means(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear", "v/cos"), seeds=(0, 1, 2), **SMALL)
    report = build_report([sweep], draws=0)
    assert list(report.table.index) == ["rf", "eps/linear", "v/cos"]  # never "rf [seed=1]"
    assert report.table["seeds"].tolist() == [3, 3, 3] and report.max_seeds == 3
    assert len(report.records) == 3 * 3 * 2 * 4 and len(report.ranked) == 3 * 2 * 4
    # --bootstrap 0 still pools the seeds: the ranked metrics are the seed means.
    records = report.records
    for row in report.ranked.itertuples(index=False):
        same = records[(records["entry"] == row.recipe) & (records["dataset"] == row.dataset)
                       & (records["setting"] == row.setting) & (records["ema"] == row.ema)]
        assert sorted(same["train_seed"]) == ["0", "1", "2"]
        assert row.clip_score == pytest.approx(same["clip_score"].mean(), rel=1e-12)
        assert row.fid_clip == pytest.approx(same["fid_clip"].mean(), rel=1e-12)
        assert row.n_seeds == 3
    rows = parse_markdown_table(markdown(report))
    assert [r["recipe"] for r in rows] == ["rf", "eps/linear", "v/cos"] and {r["seeds"] for r in rows} == {"3"}
    assert "Seeds: every entry has 3 training seeds." in markdown(report)


def _disagreeing(tmp_path, name, disagree: bool):
    """A and B: equal on average; their seeds disagree strongly (or not at all); C is far behind."""
    quality = ((0.95, 0.15, 0.55), (0.15, 0.95, 0.55), (0.0, 0.0, 0.0)) if disagree else \
        ((0.95, 0.95, 0.95), (0.55, 0.55, 0.55), (0.0, 0.0, 0.0))
    return write_synthetic_sweep(tmp_path / name, recipes=("A", "B", "C"), quality=quality, seeds=(0, 1, 2), **SMALL)


def test_intervals_widen_when_seeds_disagree_and_such_recipes_are_not_separable(tmp_path):
    agree = build_report([_disagreeing(tmp_path, "agree", False)], draws=80)
    disagree = build_report([_disagreeing(tmp_path, "disagree", True)], draws=80)
    width = {name: (r.table["all hi"] - r.table["all lo"]).loc[["A", "B"]].sum()
             for name, r in (("agree", agree), ("disagree", disagree))}
    assert width["disagree"] >= 1.5 and width["disagree"] > 4 * width["agree"], width
    # Seeds that agree: every pair separated. Seeds that disagree: A and B cannot be told apart.
    order = list(agree.table.index)
    assert inseparable_pairs(agree.bootstrap.prob_better["all"], 0.95, order) == []
    pairs = inseparable_pairs(disagree.bootstrap.prob_better["all"], 0.95, list(disagree.table.index))
    assert [tuple(sorted(p[:2])) for p in pairs] == [("A", "B")]
    text = markdown(disagree)
    assert "1 pair of entries cannot be separated" in text and "include training-seed variance" in text
    assert 0.0 < disagree.table.loc["A", "P(front 1) all"] < 1.0
    # The same evaluation samples with the seeds not resampled would separate them: the verdict comes from seeds.
    assert disagree.bootstrap.seed_weights.sum(axis=1).tolist() == [len(disagree.records)] * 80
    assert (disagree.bootstrap.seed_weights != 1).any()


def test_seed_weights_draw_k_of_k_seeds_per_entry_and_leave_single_seeds_alone(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("A", "B"), seeds=(0, 1, 2), missing_seeds=[("B", 1),
                                                                                                       ("B", 2)], **SMALL)
    records = load_sweep([sweep]).records
    w = seed_weights(records, 50, seed=0)
    a, b = (records["entry"] == "A").to_numpy(), (records["entry"] == "B").to_numpy()
    assert np.all(w[:, b] == 1.0)  # one seed: nothing to resample
    per_seed = pd.DataFrame(w[:, a].T).groupby(records.loc[a, "train_seed"].to_numpy()).first()
    assert np.all(per_seed.sum(axis=0) == 3)  # 3 seeds drawn from 3, the same draw for all the seed's records
    for seed_label in ("0", "1", "2"):
        rows = np.flatnonzero(a & (records["train_seed"] == seed_label).to_numpy())
        assert np.all(w[:, rows] == w[:, rows[:1]])
    np.testing.assert_array_equal(w, seed_weights(records, 50, seed=0))
    assert not np.array_equal(w, seed_weights(records, 50, seed=1))


def test_a_recipe_with_fewer_seeds_is_ranked_and_marked(tmp_path, capsys):
    sweep = write_synthetic_sweep(tmp_path / "multirun" / "s", recipes=("rf", "eps/linear", "v/cos"), seeds=(0, 1, 2),
                                  missing_seeds=[("eps/linear", 2)], **SMALL)
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--bootstrap", "10"]) == 0
    rows = {r["recipe"]: r for r in parse_markdown_table((out / "report.md").read_text())}
    assert set(rows) == {"rf", f"eps/linear {FEWER_SEEDS}", "v/cos"}
    assert rows[f"eps/linear {FEWER_SEEDS}"]["seeds"] == "2" and rows["rf"]["seeds"] == "3"
    assert rows[f"eps/linear {FEWER_SEEDS}"]["all (n=8)"].split(" [")[0] != "-"  # ranked, not dropped
    ranks = pd.read_csv(out / "ranks.csv").set_index("recipe")
    assert ranks.loc["eps/linear", "seeds"] == 2 and ranks.loc["rf", "seeds"] == 3
    assert f"{FEWER_SEEDS} marks entries with fewer than 3 seeds" in capsys.readouterr().out
    records = pd.read_csv(out / "records.csv")
    assert sorted(records["train_seed"].unique()) == [0, 1, 2] and set(records["entry"]) == {"rf", "eps/linear",
                                                                                             "v/cos"}


def test_sampler_variants_are_separate_entries_or_restricted_to_one(tmp_path, capsys):
    root = tmp_path / "multirun"
    common = dict(recipes=("rf", "eps/linear"), datasets=("digits",), n_samples=8, n_reference=12, dim=2,
                  sampler_settings=[(5, 5.0), (50, 5.0)])
    shared = write_synthetic_sweep(root / "shared", sampler="rf_time", **common)
    native = write_synthetic_sweep(root / "native", sampler="native", seed=1, **common)
    both = build_report([shared, native], draws=0)
    assert sorted(both.table.index) == ["eps/linear [sampler=native]", "eps/linear [sampler=rf_time]",
                                        "rf [sampler=native]", "rf [sampler=rf_time]"]
    assert "the sweep has 2 samplers (native, rf_time); each sampler variant is its own entry" in both.sampler_note
    # rf and eps/linear are in Table 1; their qualified entries are not compared, and the report says so
    assert "Paper comparison: none; the paper's recipes are here only as qualified entries (e.g. " in markdown(both)
    assert "no recipe of this sweep is in the paper's Table 1" not in markdown(both)
    one = build_report([shared, native], draws=0, sampler="native")
    assert sorted(one.table.index) == ["eps/linear", "rf"]
    assert set(one.records["sampler"]) == {"native"}
    assert "Sampler: restricted to native (--sampler); left out: rf_time" in markdown(one)
    assert main([str(shared), str(native), "--sampler", "heun", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "rank report: error: --sampler heun: no records of that sampler; the sweep has native, rf_time"


def test_a_swept_sampler_in_the_run_tag_is_not_repeated(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf",), datasets=("digits",), n_samples=8, n_reference=8,
                                  dim=2, sampler_settings=[(5, 5.0)], sampler="native")
    other = write_synthetic_sweep(tmp_path / "t", recipes=("rf",), datasets=("digits",), n_samples=8, n_reference=8,
                                  dim=2, sampler_settings=[(5, 5.0)], sampler="rf_time")
    for path, name in ((sweep, "native"), (other, "rf_time")):  # as the tagging sweeper names a swept sampler
        results = path / "0" / "results.json"
        recs = json.loads(results.read_text())
        for rec in recs:
            rec["recipe"] = f"rf [sampler={name},seed=0]"
        results.write_text(json.dumps(recs))
    report = build_report([sweep, other], draws=0)
    assert sorted(report.table.index) == ["rf [sampler=native]", "rf [sampler=rf_time]"]


def test_mixed_fid_feature_definitions_are_refused_in_one_line(tmp_path, capsys):
    root = tmp_path / "multirun"
    new = write_synthetic_sweep(root / "new", recipes=("rf", "eps/linear"), **SMALL)
    old = write_synthetic_sweep(root / "old", recipes=("rf", "eps/linear"), fid_features=None, **SMALL)
    assert main([str(new), str(old), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rank report: error: the sweep mixes FID feature definitions")
    assert "clip_l2norm: 16 records" in err and "clip_raw: 16 records" in err
    assert "`python -m src.evaluate RUN_DIR`" in err and str(old / "0") in err and str(new / "0") not in err
    assert not (tmp_path / "r").exists()  # nothing half-written
    # One definition alone is ranked, and the report names it.
    assert main([str(old), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 0
    assert "FID features: L2-normalised CLIP image embeddings" in (tmp_path / "r" / "report.md").read_text()


def _chain_sweep(root):
    """Three recipes strictly ordered in each of 12 settings, the order chosen so the averages are 2.5, 2.75, 1.25:
    what summing 1/12 twelve times gets wrong in floating point."""
    settings = [(d, s, c, e) for d in ("digits", "shapes") for s, c in ((5, 5.0), (25, 5.0), (50, 5.0))
                for e in (True, False)]
    # Front of A per setting; the 50-step settings (cfg 5.0) are positions 4, 5, 10, 11.
    front_a = dict(zip(range(12), (3, 3, 3, 2, 3, 3, 2, 2, 2, 2, 2, 3)))
    front_b = dict(zip(range(12), (1, 2, 2, 3, 1, 1, 3, 1, 1, 3, 1, 2)))
    runs = {"A": [], "B": [], "C": []}
    for i, (dataset, steps, cfg, ema) in enumerate(settings):
        fronts = {"A": front_a[i], "B": front_b[i]}
        fronts["C"] = 6 - fronts["A"] - fronts["B"]
        for recipe, front in fronts.items():
            runs[recipe].append({
                "recipe": recipe, "dataset": dataset, "setting": f"{steps} steps, cfg {cfg:.1f}", "steps": steps,
                "cfg": cfg, "ema": ema, "clip_score": 0.4 - 0.1 * front, "fid_clip": float(front),
                "fid_features": "clip_raw",
            })
    for job, (recipe, records) in enumerate(runs.items()):
        (root / str(job)).mkdir(parents=True)
        (root / str(job) / "results.json").write_text(json.dumps(records))
    return root


def test_averages_of_integer_fronts_are_exact_in_tables_and_csv(tmp_path):
    sweep = _chain_sweep(tmp_path / "chain")
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--bootstrap", "0"]) == 0
    text = (out / "ranks.csv").read_text()
    ranks = pd.read_csv(out / "ranks.csv", dtype=str).set_index("recipe")
    assert ranks.loc["A", "all"] == "2.5" and ranks.loc["A", "50 steps"] == "2.75"
    assert ranks.loc["B", "50 steps"] == "1.25" and ranks.loc["A", "n 50 steps"] == "4"
    assert "2.4999999" not in text and "1.2499999" not in text and "0.9999999" not in text
    assert float(ranks.loc["C", "all"]) * 12 == sum(6 - a - b for a, b in zip(
        (3, 3, 3, 2, 3, 3, 2, 2, 2, 2, 2, 3), (1, 2, 2, 3, 1, 1, 3, 1, 1, 3, 1, 2)))
    # Every average over n settings is the float nearest k / n.
    for column in ("all", "5 steps", "50 steps"):
        for recipe in ranks.index:
            value, n = float(ranks.loc[recipe, column]), int(ranks.loc[recipe, f"n {column}"])
            assert value == round(value * n) / n and ranks.loc[recipe, column] == repr(round(value * n) / n)
    rows = {r["recipe"]: r for r in parse_markdown_table((out / "report.md").read_text())}
    assert rows["B"]["50 steps (n=4)"] == "1.25" and rows["A"]["all (n=12)"] == "2.50"
    md = (out / "report.md").read_text()
    assert "50 steps column: the 50-step settings at CFG 5.0, the default" in md
    assert "(4 settings: digits, shapes x 50 steps, cfg 5.0 x EMA, raw)" in md


def test_bootstrap_bounds_and_first_front_probabilities_are_exact_too(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("A", "B", "C"), quality=((0.9, 0.3, 0.6), (0.3, 0.9, 0.6),
                                                                                    (0.5, 0.5, 0.5)),
                                  seeds=(0, 1, 2), datasets=("digits", "shapes"), n_samples=12, n_reference=16, dim=2)
    report = build_report([sweep], draws=40)
    n = report.table["n all"].to_numpy()
    for bound in ("all lo", "all hi"):
        values = report.table[bound].to_numpy(float)
        np.testing.assert_array_equal(values, np.round(values * n) / n)
    share = report.table["P(front 1) all"].to_numpy(float)
    np.testing.assert_array_equal(share, np.round(share * n * 40) / (n * 40))
    assert (report.table["all lo"] <= report.table["all hi"]).all()


def test_pool_seeds_propagates_a_diverged_seed(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("A", "B"), seeds=(0, 1), datasets=("digits",), n_samples=8,
                                  n_reference=8, dim=2, sampler_settings=[(5, 5.0)])
    results = sweep / "0" / "results.json"  # A, seed 0
    recs = json.loads(results.read_text())
    recs[0]["fid_clip"] = None
    results.write_text(json.dumps(recs))
    pooled = pool_seeds(load_sweep([sweep]).records).set_index(["recipe", "ema"])
    assert np.isnan(pooled.loc[("A", True), "fid_clip"]) and np.isfinite(pooled.loc[("A", False), "fid_clip"])


def test_a_partial_re_evaluation_with_other_settings_is_refused_in_one_line(tmp_path, capsys):
    """One run re-evaluated with eval.n_samples=24 next to runs at 16: its newest records would be ranked against the
    others' 16-sample ones. The report refuses, naming the setting, its values and the run."""
    root = tmp_path / "multirun"
    sweep = write_synthetic_sweep(root / "s", recipes=("rf", "eps/linear"), **SMALL)
    redo = write_synthetic_sweep(tmp_path / "redo", recipes=("rf",), **{**SMALL, "n_samples": 24})
    results = sweep / "0" / "results.json"
    old = json.loads(results.read_text())
    newer = json.loads((redo / "0" / "results.json").read_text())[:3]  # interrupted after three settings
    for rec in newer:
        rec["created"] = "2024-03-06T12:00:00"
        (sweep / "0" / rec["arrays"]).write_bytes((redo / "0" / rec["arrays"]).read_bytes())
    assert old[0]["recipe"] == newer[0]["recipe"] == "rf"
    results.write_text(json.dumps(old + newer))
    before = results.read_bytes()
    assert main([str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rank report: error: the sweep mixes evaluation settings: "
                                                   "eval.n_samples = 16 (13 records), 24 (3 records)")
    assert "`python -m src.evaluate RUN_DIR eval.n_samples=...`" in err and err.rstrip().endswith(str(sweep / "0"))
    assert not (tmp_path / "r").exists() and results.read_bytes() == before
    # A value swept on purpose is part of the entry's name: ranked, not refused.
    for rec in newer:
        rec["recipe"], rec["tags"] = "rf [eval.n_samples=24]", {"eval.n_samples": 24}
    results.write_text(json.dumps(old + newer))
    report = build_report([sweep], draws=0)
    assert "rf [eval.n_samples=24]" in report.table.index


def test_a_job_refused_before_it_had_a_run_directory_makes_the_sweep_partial(tmp_path):
    """A job with a configuration error is recorded only in the sweep's failures.json (record_sweep_failure, as the
    sweeper writes it); the report lists it as failed instead of calling the sweep complete."""
    from src.launch.failures import record_sweep_failure

    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear"), **SMALL)
    assert not build_report([sweep], draws=0).sweep.partial
    record_sweep_failure(sweep, "digits/rf_lognorm_-1.00_1.00", "ConfigError: loss: rf_lognorm: s=-1 is not allowed")
    report = build_report([sweep], draws=0)
    assert report.sweep.partial
    failed = report.sweep.runs[report.sweep.runs["status"] == "failed"]
    assert failed["run_dir"].tolist() == [str(sweep / "digits/rf_lognorm_-1.00_1.00")]
    text = markdown(report)
    assert "PARTIAL SWEEP" in text and "ConfigError: loss: rf_lognorm: s=-1 is not allowed" in text


def test_train_seeds_ranks_one_seed_alone_and_refuses_an_absent_one(tmp_path, capsys, monkeypatch):
    sweep = _disagreeing(tmp_path, "d", disagree=True)
    pooled = build_report([sweep], draws=0)
    alone = build_report([sweep], draws=0, train_seeds=[0])
    assert set(alone.records["train_seed"]) == {"0"} and alone.table["seeds"].tolist() == [1, 1, 1]
    gap_alone, gap_pooled = (r.table.loc["B", "all"] - r.table.loc["A", "all"] for r in (alone, pooled))
    assert gap_alone > gap_pooled and gap_alone > 0  # seed 0 favours A (quality 0.95 vs 0.15); the seeds balance
    assert "restricted to training seed 0 (--train-seeds)" in markdown(alone)
    monkeypatch.chdir(tmp_path)  # the default report directory is relative: reports/<sweep>-train_seeds=0
    assert main([str(sweep), "--bootstrap", "0", "--train-seeds", "0"]) == 0
    assert (tmp_path / "reports" / "d-train_seeds=0" / "report.md").is_file()
    assert not (tmp_path / "reports" / "d").exists()
    capsys.readouterr()
    assert main([str(sweep), "--bootstrap", "0", "--train-seeds", "0", "7", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err == "rank report: error: --train-seeds 7: no records of that training seed; the sweep has 0, 1, " \
                  "2\n"
    assert not (tmp_path / "r").exists()


def test_entries_without_the_chosen_seed_or_dataset_are_named_not_dropped_unsaid(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear", "v/cos"), seeds=(0, 1),
                                  missing_seeds=[("eps/linear", 1)], **SMALL)
    alone = build_report([sweep], draws=0, train_seeds=[1])
    assert sorted(alone.table.index) == ["rf", "v/cos"] and alone.left_out == ["eps/linear"]
    assert "Not ranked: 1 entry without records of the training seed(s) 1 chosen: eps/linear." in markdown(alone)
    assert build_report([sweep], draws=0).left_out == []
    assert "Not ranked" not in markdown(build_report([sweep], draws=0, train_seeds=[0]))
    # --recipes leaves out the others on purpose: they are not listed
    assert build_report([sweep], draws=0, recipes=["rf"], train_seeds=[1]).left_out == []


def test_the_status_line_counts_the_records_ranked_not_the_seed_mean_cells(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear", "v/cos"), seeds=(0, 1),
                                  missing_seeds=[("eps/linear", 1)], **SMALL)
    # 5 runs x 2 datasets x 4 settings, not the 3 x 8 = 24 seed-mean cells
    assert "; 40 records, 3 recipes, 8 control settings." in status_lines(build_report([sweep], draws=0))[0]


def test_the_report_counts_the_point_values_outside_their_intervals(tmp_path):
    # With three seeds the draws sort into fewer fronts than the seed-mean point does, so several point values lie
    # above their interval: the note says how many (it blamed ties on a front and gave no count).
    recipes = ("rf", "eps/linear", "v/cos", "v/linear", "edm/rf", "edm/cos", "rf/cosmap", "rf/mode(1.29)")
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=recipes, seeds=(0, 1, 2), **SMALL)
    report = build_report([sweep], draws=20)
    table = report.table
    outside = int(((table["all"] < table["all lo"]) | (table["all"] > table["all hi"])).sum())
    assert outside > 0 and (table["all"] >= table["all lo"]).all()  # above their intervals, never below
    assert f"here {outside} of 8 'all' values lie outside their interval." in markdown(report)


def test_inception_fids_of_two_weights_files_are_not_ranked_together(tmp_path, capsys):
    """Each run's records name the Inception weights behind fid_inception (by content); two runs evaluated with
    different Inception files would rank two metrics as one. Refused in one line naming the setting and the run."""
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear"), **SMALL)
    for run, weights in (("0", "inception-v3-2048:aaaaaaaaaaaa"), ("1", "inception-v3-2048:bbbbbbbbbbbb")):
        results = sweep / run / "results.json"
        records = json.loads(results.read_text())
        for rec in records:
            rec["fid_inception"], rec["inception_extractor"] = 10.0, weights
        results.write_text(json.dumps(records))
    assert main([str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the sweep mixes evaluation settings: eval.inception = inception-v3-2048:" in err
    assert not (tmp_path / "r").exists()


def test_sample_sheets_show_the_numerically_first_seed():
    """Seeds 2 and 10: the sheet shows seed 2's samples (as text, "10" sorted first)."""
    from src.ranking.report import first_seed_records

    records = pd.DataFrame([
        {"entry": e, "dataset": "digits", "setting": "5 steps, cfg 5.0", "ema": True, "train_seed": s, "arrays": a}
        for e in ("rf", "edm") for s, a in (("10", f"{e}10.npz"), ("2", f"{e}2.npz"))])  # labels, as records hold them
    first = first_seed_records(records)
    assert sorted(first["arrays"]) == ["edm2.npz", "rf2.npz"] and list(first["recipe"]) == list(first["entry"])


def test_seed_note_lists_eight_entries_with_fewer_seeds_and_counts_the_rest():
    """The note names at most 8 entries with fewer seeds (the table marks them all) and says how many more."""
    from types import SimpleNamespace

    from src.ranking.report import _seed_note

    names = ["full"] + [f"r{i}" for i in range(10)]
    table = pd.DataFrame({"seeds": [2] + [1] * 10, "seeds min": [2] + [1] * 10}, index=names)
    note = _seed_note(SimpleNamespace(table=table, max_seeds=2, train_seeds=None))
    assert note.startswith("Seeds: entries have 1 to 2 training seeds ('seeds' column); ")
    assert note.endswith("ranked on the seeds they have: r0, r1, r2, r3, r4, r5, r6, r7 and 2 more.")


def test_seed_note_says_every_entry_has_k_seeds_only_when_none_lacks_one_in_some_setting():
    """Three seeds in all for every entry, but one seed short in some setting: the note does not claim that every
    entry has 3 seeds everywhere (it said "entries have 3 to 3 training seeds"), and marks the short entry."""
    from types import SimpleNamespace

    from src.ranking.report import _seed_note

    table = pd.DataFrame({"seeds": [3, 3], "seeds min": [3, 2]}, index=["rf", "edm"])
    note = _seed_note(SimpleNamespace(table=table, max_seeds=3, train_seeds=None))
    assert note.startswith("Seeds: every entry has 3 training seeds in all ('seeds' column); ")
    assert note.endswith("ranked on the seeds they have: edm.")
    table["seeds min"] = 3
    assert _seed_note(SimpleNamespace(table=table, max_seeds=3, train_seeds=None)) == \
        "Seeds: every entry has 3 training seeds."


def test_a_seed_still_without_a_chosen_fifty_step_scale_does_not_refuse_the_report(tmp_path):
    """--fifty-step-cfg 2.5 where seed 1's runs have not evaluated CFG 2.5 yet: the pooled report ranks it (seed 0
    has it); ranking each seed alone for the seed agreement must not refuse with 'the sweep has 5.0'. Seed 1's
    50-step column is then empty, not another scale's."""
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear", "v/cos"), datasets=("digits",),
                                  n_samples=8, n_reference=12, dim=2, seeds=(0, 1),
                                  sampler_settings=[(5, 5.0), (50, 2.5), (50, 5.0)])
    records = load_sweep([sweep]).records
    for run_dir in set(records.loc[records["train_seed"].astype(str) == "1", "run_dir"]):
        path = Path(run_dir) / "results.json"
        path.write_text(json.dumps([r for r in json.loads(path.read_text()) if (r["steps"], r["cfg"]) != (50, 2.5)]))
    report = build_report([sweep], draws=0, fifty_step_cfg=[2.5])
    assert report.n_settings["50 steps"] == 2 and report.seed_ranks["1"]["50 steps"].isna().all()
    assert report.seed_ranks["0"]["50 steps"].notna().all()
    with pytest.raises(ValueError, match="scale 2.5; the sweep restricted to --train-seeds 1 has 5.0$"):
        build_report([sweep], draws=0, fifty_step_cfg=[2.5], train_seeds=["1"])  # nothing at 2.5 to rank: refused
