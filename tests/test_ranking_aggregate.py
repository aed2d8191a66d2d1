"""Loading sweeps and averaging fronts over control settings (docs/ranking.md#average-rank-and-columns), on hand-made and synthetic sweeps."""
import json

import numpy as np
import pandas as pd
import pytest

from src.ranking.aggregate import (
    average_ranks, control_settings, describe_column, describe_fifty_step, find_run_dirs, load_sweep, missing_settings,
    rank_table, seed_order, setting_groups,
)
from src.ranking.synthetic import write_synthetic_sweep

EMA = True


def record(recipe, steps, cfg, clip, fid, created="2024-03-05T12:00:00", dataset="digits"):
    """A results.json record with only what ranking reads (plus a few optional fields)."""
    return {
        "recipe": recipe, "family": recipe, "params": {}, "dataset": dataset,
        "setting": f"{steps} steps, cfg {cfg:.1f}",
        "steps": steps, "cfg": cfg, "shift": 1.0, "ema": EMA, "clip_score": clip, "fid_clip": fid,
        "fid_inception": None, "n_samples": 8, "checkpoint_step": 10, "arrays": None, "reference_arrays": None,
        "config": {}, "created": created,
    }


def write_run(run_dir, records=None, error=None, hydra=True):
    """A run directory in the layout the evaluation writes."""
    run_dir.mkdir(parents=True)
    if hydra:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text("loss: x\n")
    if records is not None:
        (run_dir / "results.json").write_text(json.dumps(records))
    if error is not None:
        (run_dir / "error.json").write_text(json.dumps(error))


@pytest.fixture
def hand_sweep(tmp_path):
    """Three recipes, three settings; hand-worked fronts:

    5 steps cfg 5:  A (0.3, 1) > B (0.2, 2) > C (0.1, 3)            -> A1 B2 C3
    50 steps cfg 1: B (0.3, 1) dominates C (0.25, 1.5) dominates A  -> B1 C2 A3
    50 steps cfg 5: A (0.3, 2) and B (0.2, 1) trade off; C missing  -> A1 B1
    """
    sweep = tmp_path / "hand"
    write_run(sweep / "0", [record("A", 5, 5.0, 0.3, 1.0), record("A", 50, 1.0, 0.2, 2.0),
                            record("A", 50, 5.0, 0.3, 2.0)])
    write_run(sweep / "1", [record("B", 5, 5.0, 0.2, 2.0), record("B", 50, 1.0, 0.3, 1.0),
                            record("B", 50, 5.0, 0.2, 1.0)])
    write_run(sweep / "2", [record("C", 5, 5.0, 0.1, 3.0), record("C", 50, 1.0, 0.25, 1.5)])
    # A rerun of A's 5-step setting that came out worse, older than the record above: dropped as a duplicate.
    write_run(sweep / "nested" / "3", [record("A", 5, 5.0, 0.0, 9.0, created="2024-03-01T00:00:00")])
    write_run(sweep / "4", error={"error": "CUDA out of memory\ntraceback...", "type": "OutOfMemoryError"})
    write_run(sweep / "5")  # running or killed: only .hydra/config.yaml
    (sweep / "not_a_run").mkdir()
    return sweep


def test_run_dirs_found_recursively_with_status(hand_sweep):
    found = [p.relative_to(hand_sweep).as_posix() for p in find_run_dirs(hand_sweep)]
    assert found == ["0", "1", "2", "4", "5", "nested/3"]
    sweep = load_sweep([hand_sweep])
    status = dict(zip([p.split("/")[-1] for p in sweep.runs["run_dir"]], sweep.runs["status"]))
    assert status == {"0": "done", "1": "done", "2": "done", "3": "done", "4": "failed", "5": "incomplete"}
    failed = sweep.runs.set_index("status").loc["failed", "error"]
    assert failed == "OutOfMemoryError: CUDA out of memory"
    assert sweep.partial and sweep.name == "hand"


def test_duplicate_keeps_newest_record(hand_sweep):
    sweep = load_sweep([hand_sweep])
    assert len(sweep.records) == 8 and len(sweep.duplicates) == 1
    assert sweep.duplicates.iloc[0]["clip_score"] == 0.0
    kept = sweep.records[(sweep.records["recipe"] == "A") & (sweep.records["steps"] == 5)]
    assert kept["clip_score"].tolist() == [0.3]


def test_hand_worked_fronts_and_averages(hand_sweep):
    ranked = rank_table(load_sweep([hand_sweep]).records)
    fronts = {(r.recipe, r.steps, r.cfg): r.front for r in ranked.itertuples()}
    assert fronts == {
        ("A", 5, 5.0): 1, ("B", 5, 5.0): 2, ("C", 5, 5.0): 3,
        ("A", 50, 1.0): 3, ("B", 50, 1.0): 1, ("C", 50, 1.0): 2,
        ("A", 50, 5.0): 1, ("B", 50, 5.0): 1,
    }
    table = average_ranks(ranked, setting_groups(ranked, "all"))
    assert list(table.index) == ["B", "A", "C"]  # sorted by the average over all settings
    np.testing.assert_allclose(table.loc["A", ["all", "5 steps", "50 steps"]].to_numpy(float), [5 / 3, 1, 2])
    np.testing.assert_allclose(table.loc["B", ["all", "5 steps", "50 steps"]].to_numpy(float), [4 / 3, 2, 1])
    np.testing.assert_allclose(table.loc["C", ["all", "5 steps", "50 steps"]].to_numpy(float), [2.5, 3, 2])
    assert table.loc["C", ["n all", "n 5 steps", "n 50 steps"]].tolist() == [2, 1, 1]
    assert table.loc["A", ["n all", "n 5 steps", "n 50 steps"]].tolist() == [3, 1, 2]
    # Share of settings on the first front: A is first at 5 steps and at 50 steps cfg 5.0, not at cfg 1.0.
    assert table.loc["A", ["P(front 1) all", "P(front 1) 5 steps", "P(front 1) 50 steps"]].tolist() == [2 / 3, 1, 0.5]
    # Second fronts do not count: B is second at 5 steps, C second at 50 steps cfg 1.0.
    assert table.loc["B", ["P(front 1) all", "P(front 1) 5 steps", "P(front 1) 50 steps"]].tolist() == [2 / 3, 0, 1]
    assert table.loc["C", ["P(front 1) all", "P(front 1) 5 steps", "P(front 1) 50 steps"]].tolist() == [0, 0, 0]
    # Default 50-step column: CFG 5.0 only (the 5-step column's scale); C has no such setting.
    default = average_ranks(ranked, setting_groups(ranked))
    assert default.loc["A", "50 steps"] == 1 and default.loc["B", "50 steps"] == 1
    assert np.isnan(default.loc["C", "50 steps"]) and default.loc["C", "n 50 steps"] == 0


def test_fifty_step_column_is_configurable(hand_sweep):
    ranked = rank_table(load_sweep([hand_sweep]).records)
    table = average_ranks(ranked, setting_groups(ranked, fifty_step_cfg=[5.0]))
    assert table.loc["A", "50 steps"] == 1 and table.loc["B", "50 steps"] == 1
    assert np.isnan(table.loc["C", "50 steps"]) and table.loc["C", "n 50 steps"] == 0
    assert "CFG 5.0, chosen" in describe_fifty_step(ranked, [5.0])
    assert "CFG 5.0, the default: the paper's 50-step averages are multiples of 0.25" in describe_fifty_step(ranked, None)
    assert "CFG 1.0, 5.0, all 50-step settings (--fifty-step-cfg all)" in describe_fifty_step(ranked, "all")
    with pytest.raises(ValueError, match="'every'"):
        setting_groups(ranked, fifty_step_cfg="every")
    with pytest.raises(ValueError, match=r"no 50-step setting has CFG scale 7.0; the sweep has 1.0, 5.0"):
        setting_groups(ranked, fifty_step_cfg=[7.0])
    with pytest.raises(ValueError, match="finite"):
        setting_groups(ranked, fifty_step_cfg=[float("nan")])


def _settings(*rows):
    """A table of control settings (steps, cfg, ema) of one dataset, as the ranked records hold them."""
    return pd.DataFrame([{"dataset": "digits", "setting": f"{steps} steps, cfg {cfg:.1f}", "steps": steps, "cfg": cfg,
                          "ema": ema} for steps, cfg, ema in rows])


def test_columns_take_exactly_their_settings():
    records = _settings((2, 5.0, True), (5, 5.0, True), (50, 1.0, True), (50, 5.0, True), (50, 7.0, True))
    groups = setting_groups(records, [1.0, 5.0])
    assert groups["5 steps"].tolist() == [False, True, False, False, False]  # 5 steps, not "5 or fewer"
    assert groups["50 steps"].tolist() == [False, False, True, True, False]  # either chosen scale
    # Default without a 50-step setting at CFG 5.0: every 50-step setting, not an error.
    no_five = _settings((5, 5.0, True), (50, 1.0, True), (50, 7.0, False))
    assert setting_groups(no_five)["50 steps"].tolist() == [False, True, True]
    assert "default when the sweep has none at CFG 5.0" in describe_fifty_step(no_five, None)


def test_settings_are_listed_ema_first_and_columns_described_setting_by_setting():
    records = _settings((50, 1.0, False), (5, 5.0, False), (5, 5.0, True))
    listed = control_settings(records)[["steps", "ema"]].itertuples(index=False, name=None)
    assert list(listed) == [(5, True), (5, False), (50, False)]
    # Not a full product of datasets x samplers x EMA: each setting named; a product said as one.
    assert describe_column(records, [True, False, True]) == (
        "2 settings: digits, 50 steps, cfg 1.0, raw; digits, 5 steps, cfg 5.0, EMA")
    assert describe_column(records, [True, True, False]) == (
        "2 settings: digits x 5 steps, cfg 5.0; 50 steps, cfg 1.0 x raw")


def test_training_seeds_sort_numerically():
    assert sorted(["10", "2", "b", "-1", "a"], key=seed_order) == ["-1", "2", "10", "a", "b"]


def test_a_run_outside_a_seed_sweep_has_its_configured_training_seed(tmp_path):
    write_run(tmp_path / "s" / "0", [{**record("A", 5, 5.0, 0.3, 1.0), "config": {"seed": 3}},
                                     record("B", 5, 5.0, 0.2, 2.0)])
    records = load_sweep([tmp_path / "s"]).records.set_index("recipe")
    assert records.loc["A", "train_seed"] == "3" and records.loc["B", "train_seed"] == ""


def test_seed_counts_give_the_fewest_seeds_of_any_setting(tmp_path):
    from src.ranking.aggregate import seed_counts

    seeded = lambda seed, steps: {**record("A", steps, 5.0, 0.3, 1.0), "tags": {"seed": seed}}  # noqa: E731
    write_run(tmp_path / "s" / "0", [seeded(0, 5), seeded(0, 50)])
    write_run(tmp_path / "s" / "1", [seeded(1, 5)])  # seed 1 lacks the 50-step setting
    counts = seed_counts(load_sweep([tmp_path / "s"]).records)
    assert counts.loc["A"].tolist() == [2, 1]  # seeds, seeds min


def test_missing_settings_are_listed(hand_sweep):
    ranked = rank_table(load_sweep([hand_sweep]).records)
    assert missing_settings(ranked) == {"C": ["digits, 50 steps, cfg 5.0, EMA"]}


def test_nan_metric_goes_to_last_front(tmp_path):
    sweep = tmp_path / "nan"
    write_run(sweep / "0", [record("A", 5, 5.0, 0.3, 1.0), record("B", 5, 5.0, None, 0.5),
                            record("C", 5, 5.0, 0.1, 3.0)])
    ranked = rank_table(load_sweep([sweep]).records)
    assert dict(zip(ranked["recipe"], ranked["front"])) == {"A": 1, "C": 2, "B": 3}


def test_infinite_metric_goes_to_last_front_as_nan_does(tmp_path):
    # JSON Infinity (a writer other than Record.to_dict, which stores null): the best CLIP score must not carry an
    # infinite FID to the first front while the report says non-finite records are in the last one.
    sweep = tmp_path / "inf"
    write_run(sweep / "0", [record("A", 5, 5.0, 0.4, float("inf")), record("B", 5, 5.0, 0.3, 1.0),
                            record("C", 5, 5.0, 0.2, 2.0), record("D", 5, 5.0, float("-inf"), 0.5)])
    ranked = rank_table(load_sweep([sweep]).records)
    assert dict(zip(ranked["recipe"], ranked["front"])) == {"B": 1, "C": 2, "A": 3, "D": 3}


def test_the_report_counts_and_lists_every_non_finite_cell_it_names(tmp_path):
    from src.ranking.report import build_report, notes

    sweep = tmp_path / "nan7"
    write_run(sweep / "0", [record("A", steps, 5.0, None, 1.0) for steps in (5, 10, 25, 50)]
              + [record("A", 50, cfg, None, 1.0) for cfg in (1.0, 2.5, 7.5)] + [record("A", 50, 4.0, 0.2, 1.0)])
    line = next(n for n in notes(build_report([sweep], draws=0)) if "non-finite" in n)
    assert line.startswith("7 entries x settings with a non-finite") and line.endswith("; ... (1 more).")


def test_the_duplicates_note_states_the_rule_that_kept_the_record(hand_sweep):
    from src.ranking.report import build_report, notes

    line = next(n for n in notes(build_report([hand_sweep], draws=0)) if "duplicate" in n)
    assert line == ("1 duplicate records (same recipe, seed and control setting) were dropped, keeping the one the "
                    "run's latest launch or re-evaluation asked for, else the newest by 'created'.")


def test_bad_records_raise_naming_the_file(tmp_path):
    write_run(tmp_path / "s" / "0", [{"recipe": "A", "dataset": "digits"}])
    with pytest.raises(ValueError, match=r"results.json: record 0 lacks required field\(s\) setting"):
        load_sweep([tmp_path / "s"])
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        load_sweep([tmp_path / "s" / "0" / "results.json"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sweep([tmp_path / "nowhere"])


@pytest.mark.parametrize("field, value, expected", [
    ("ema", "false", "ema='false'; expected true or false"),  # a truthy string, once ranked as EMA
    ("ema", None, "ema=None; expected true or false"),
    ("clip_score", "abc", "clip_score='abc'; expected a number or null"),
    ("fid_clip", [1.0], r"fid_clip=\[1.0\]; expected a number or null"),  # was a TypeError traceback
    ("cfg", None, "cfg=None; expected a number"),
    ("dataset", None, "dataset=None; expected a non-empty string"),  # was dropped by the grouping, unsaid
    ("setting", "", "setting=''; expected a non-empty string"),
    ("recipe", None, "recipe=None; expected a non-empty string"),  # was ranked as a recipe called None
])
def test_a_record_field_of_the_wrong_type_is_refused_naming_it(tmp_path, field, value, expected):
    bad = record("A", 5, 5.0, 0.3, 1.0)
    bad[field] = value
    write_run(tmp_path / "s" / "0", [record("A", 50, 5.0, 0.3, 1.0), bad])
    with pytest.raises(ValueError, match=rf"results.json: record 1 has {expected}$"):
        load_sweep([tmp_path / "s"])


@pytest.mark.parametrize("field, value, expected", [
    ("decoder", ["AutoencoderKL"], r"decoder=\['AutoencoderKL'\]; expected a string or null"),  # was ranked as is
    ("sampler_code", {"ab2.py": 1}, r"sampler_code=\{'ab2.py': 1\}; expected a string or null"),
    ("eval_seed", "1234", "eval_seed='1234'; expected an integer or null"),  # a number stored as a string
    ("train_seed", 1.5, "train_seed=1.5; expected an integer or null"),
    ("n_samples", True, "n_samples=True; expected an integer or null"),
    ("shift", "3.0", "shift='3.0'; expected a number or null"),
    ("sampler", ["native"], r"sampler=\['native'\]; expected a string or null"),
    ("tags", "lr=0.1", "tags='lr=0.1'; expected an object"),  # was an AttributeError traceback
    ("backbone", None, "backbone=None; expected a string"),  # was a TypeError traceback
    ("arrays", 5, "arrays=5; expected a string or null"),  # was a TypeError traceback
    ("fid_inception", "3.5", "fid_inception='3.5'; expected a number or null"),
    ("fid_inception", True, "fid_inception=True; expected a number or null"),
])
def test_junk_in_an_optional_record_field_is_refused_naming_it(tmp_path, capsys, field, value, expected):
    """As a required field's wrong type: one line naming the file, the record and the field, and no traceback."""
    from src.ranking.report import main

    bad = record("A", 5, 5.0, 0.3, 1.0)
    bad[field] = value
    write_run(tmp_path / "s" / "0", [record("A", 50, 5.0, 0.3, 1.0), bad])
    with pytest.raises(ValueError, match=rf"results.json: record 1 has {expected}$"):
        load_sweep([tmp_path / "s"])
    assert main([str(tmp_path / "s"), "--bootstrap", "0", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"rank report: error: {tmp_path / 's' / '0' / 'results.json'}: ")


def test_optional_record_fields_of_their_types_or_null_load(tmp_path):
    good = {**record("A", 5, 5.0, 0.3, 1.0), "decoder": None, "sampler_code": "ab2.py:0123456789ab", "shift": 1,
            "train_seed": None, "sampler": {"name": "rf_time"}, "tags": {}, "backbone": "MMDiT", "n_reference": 8}
    write_run(tmp_path / "s" / "0", [good])
    assert len(load_sweep([tmp_path / "s"]).records) == 1


def test_unreadable_results_are_reported_not_fatal(tmp_path):
    write_run(tmp_path / "s" / "0", [record("A", 5, 5.0, 0.3, 1.0)])
    write_run(tmp_path / "s" / "1")
    (tmp_path / "s" / "1" / "results.json").write_text("[{")
    sweep = load_sweep([tmp_path / "s"])
    assert sweep.runs["status"].tolist() == ["done", "unreadable"] and len(sweep.records) == 1


def test_synthetic_sweep_with_missing_setting_and_failed_job(tmp_path):
    recipes = ("rf/lognorm(0.00, 1.00)", "eps/linear", "edm(-1.20, 1.20)", "v/cos")
    write_synthetic_sweep(
        tmp_path / "syn", recipes=recipes, datasets=("digits", "shapes"),
        missing=[("eps/linear", "shapes", 5, 5.0, False)], failed=("v/cos",), n_samples=8, n_reference=8, dim=2,
    )
    sweep = load_sweep([tmp_path / "syn"])
    assert sweep.runs["status"].value_counts().to_dict() == {"done": 6, "failed": 2}
    ranked = rank_table(sweep.records)
    assert len(control_settings(ranked)) == 24 and ranked["recipe"].nunique() == 3
    assert missing_settings(ranked) == {"eps/linear": ["shapes, 5 steps, cfg 5.0, raw"]}
    table = average_ranks(ranked, setting_groups(ranked, "all"))
    assert table.loc["eps/linear", ["n all", "n 5 steps", "n 50 steps"]].tolist() == [23, 3, 12]
    assert table.loc["rf/lognorm(0.00, 1.00)", ["n all", "n 5 steps", "n 50 steps"]].tolist() == [24, 4, 12]
    # The default 50-step column: CFG 5.0 x EMA/raw x two datasets = 4 settings, as in the paper.
    default = average_ranks(ranked, setting_groups(ranked))
    assert default.loc["rf/lognorm(0.00, 1.00)", "n 50 steps"] == 4
    # Paths in records are made absolute, relative ones resolved against the run directory.
    assert all(p.startswith(str(tmp_path)) for p in ranked["reference_arrays"])


# ---- training settings of the runs ranked together (check_training_settings) -------------------------------------
def fingerprint(max_steps=8, lr=0.001, cache="/a/.cache", depth=2, target="src.models.MMDiT"):
    """A fingerprint.json as the job writes it (src.config.fingerprint), with the keys the check compares."""
    return {"loss": {"family": "rf"}, "seed": 0, "model": {"_target_": target, "depth": depth},
            "optim": {"lr": lr, "betas": [0.9, 0.999]}, "train": {"max_steps": max_steps},
            "data": {"name": "digits", "kind": "embedded", "train_dir": f"{cache}/data/digits-v1-abc/train",
                     "eval_dir": f"{cache}/data/digits-v1-abc/eval", "batch_size": 64},
            "trainer": {"gradient_clip_val": None, "precision": None}}


def trained_runs(tmp_path, prints, tags=None, name="s"):
    """A sweep of one run per fingerprint (recipes A, B, ...), each with one record; tags: the runs' run tags."""
    sweep = tmp_path / name
    for i, fp in enumerate(prints):
        rec = record("ABCDEFG"[i], 5, 5.0, 0.3 - i / 10, 1.0 + i)
        if tags and tags[i]:
            rec["tags"] = tags[i]
        write_run(sweep / str(i), [rec])
        (sweep / str(i) / "fingerprint.json").write_text(json.dumps(fp))
    return sweep


def test_runs_trained_with_other_settings_are_refused_in_one_line(tmp_path):
    from src.ranking.aggregate import check_training_settings

    sweep = trained_runs(tmp_path, [fingerprint(), fingerprint(), fingerprint(max_steps=9)])
    with pytest.raises(ValueError) as err:
        check_training_settings(load_sweep([sweep]).records)
    line = str(err.value)
    assert "\n" not in line and line.startswith(
        "the runs ranked together were trained with different settings: train.max_steps = 8 (2 runs), 9 (1 run) on "
        "digits; ")
    assert "retrain these runs with train.max_steps=8" in line and line.endswith(str(sweep / "2"))
    assert "--by-sweep" not in line  # one sweep


def test_training_settings_that_name_their_entries_or_do_not_matter_are_not_refused(tmp_path):
    from src.ranking.aggregate import check_training_settings

    # A swept learning rate (in the run tags: entries of their own), another cache of the same embedded data, another
    # backbone with its own model settings (it names its entries), throughput keys, a fingerprint from before
    # trainer settings (and the random streams' version) were recorded.
    older = fingerprint()
    del older["trainer"]
    # Random streams of two versions: other draws of one configuration, as two seeds are.
    prints = [{**fingerprint(lr=1e-4), "streams": 2}, {**fingerprint(lr=3e-4, cache="/b/.cache"), "streams": 3},
              {**fingerprint(depth=4, target="src.models.DiT"), "optim": {"lr": 1e-3, "betas": [0.9, 0.999],
                                                                         "fused": True}},
              older]
    tags = [{"optim.lr": 0.0001}, {"optim.lr": 0.0003}, None, None]
    check_training_settings(load_sweep([trained_runs(tmp_path, prints, tags)]).records)
    # Runs without a fingerprint.json (made by hand, or before it existed) are not compared.
    (tmp_path / "s" / "3" / "fingerprint.json").unlink()
    check_training_settings(load_sweep([tmp_path / "s"]).records)


def test_sweeps_trained_differently_are_refused_pooled_and_ranked_by_sweep(tmp_path, capsys):
    from src.ranking.report import main

    short = trained_runs(tmp_path, [fingerprint(), fingerprint()], name="short")
    long = trained_runs(tmp_path, [fingerprint(max_steps=9)], name="long")
    for run in long.iterdir():
        results = run / "results.json"
        results.write_text(results.read_text().replace('"recipe": "A"', '"recipe": "Z"').replace('"family": "A"',
                                                                                                 '"family": "Z"'))
    assert main([str(short), str(long), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.max_steps = 8 (2 runs), 9 (1 run) on digits" in err
    assert "pass --by-sweep to rank each sweep's entries side by side" in err
    assert main([str(short), str(long), "--bootstrap", "0", "--by-sweep", "--out", str(tmp_path / "r")]) == 0


# ---- the sweep's own records: jobs.json, failures.json --------------------------------------------------------------
def test_planned_jobs_without_results_and_failures_into_existing_directories_are_shown(hand_sweep):
    from src.launch.failures import record_sweep_failure
    from src.launch.planned import record_planned_jobs

    record_planned_jobs(hand_sweep, {"0": {"run_dir": "0", "overrides": ["loss=A"]},
                                     "never": {"run_dir": "digits/never", "overrides": ["loss=N"]}})
    record_planned_jobs(hand_sweep, {"1": {"run_dir": "1", "overrides": ["loss=B"]}})  # a later, partial relaunch
    assert sorted(json.loads((hand_sweep / "jobs.json").read_text())) == ["0", "1", "never"]
    record_sweep_failure(hand_sweep, "1", "ConfigError: holds a run with a different configuration")
    runs = load_sweep([hand_sweep]).runs
    never = runs[runs["status"] == "missing"].iloc[0]
    assert never["run_dir"] == str(hand_sweep / "digits/never") and never["overrides"] == "loss=N"
    refused = runs[runs["status"] == "refused"].iloc[0]
    assert refused["run_dir"] == str(hand_sweep / "1") and refused["error"].startswith(
        "ConfigError: holds a run with a different configuration (its latest launch at ")
    assert refused["error"].endswith("not run; the directory holds an earlier run: done)")
    assert runs.loc[runs["run_dir"] == str(hand_sweep / "1"), "status"].tolist() == ["done", "refused"]


def test_a_relaunch_updates_its_planned_jobs_and_a_record_of_another_shape_is_damaged(tmp_path):
    import re

    from src.launch.planned import read_planned_jobs, record_planned_jobs
    from src.launch.sweep_files import DamagedSweepFile

    record_planned_jobs(tmp_path, {"a": {"run_dir": "a", "overrides": ["loss=A"]}})
    record_planned_jobs(tmp_path, {"a": {"run_dir": "a", "overrides": ["loss=B"]}})  # relaunched: its latest launch
    assert read_planned_jobs(tmp_path)["a"]["overrides"] == ["loss=B"]
    for bad, why in (("[1]", "(a JSON list, expected an object)"),
                     ('{"a": {"run_dir": 3}}', "(entry 'a' has no run_dir)")):
        (tmp_path / "jobs.json").write_text(bad)
        with pytest.raises(DamagedSweepFile, match=re.escape(f"{tmp_path / 'jobs.json'} is unreadable {why}")):
            read_planned_jobs(tmp_path)


@pytest.mark.parametrize("name", ["failures.json", "jobs.json"])
def test_a_damaged_sweep_record_makes_the_sweep_partial_and_writers_keep_it_aside(tmp_path, name, caplog):
    from src.launch.failures import clear_sweep_failure, record_sweep_failure
    from src.launch.planned import record_planned_jobs

    sweep = tmp_path / "s"
    write_run(sweep / "0", [record("A", 5, 5.0, 0.3, 1.0)])
    assert not load_sweep([sweep]).partial
    (sweep / name).write_text('{"digits/x": {"err')
    loaded = load_sweep([sweep])
    assert loaded.partial and len(loaded.problems) == 1
    assert loaded.problems[0].startswith(f"{sweep / name} is unreadable (not valid JSON: ")
    for attempt in range(2):  # a second damaged file does not replace the first one kept aside
        (sweep / name).write_text('{"digits/x": {"err')
        if name == "failures.json":
            (record_sweep_failure if attempt == 0 else clear_sweep_failure)(sweep, "digits/y", *(
                ["ConfigError: y"] if attempt == 0 else []))
        else:
            record_planned_jobs(sweep, {"digits/y": {"run_dir": "digits/y"}})
    assert [p.name for p in sorted(sweep.glob(f"{name}.damaged*"))] == [f"{name}.damaged", f"{name}.damaged.1"]
    assert all(p.read_text() == '{"digits/x": {"err' for p in sweep.glob(f"{name}.damaged*"))
    assert "kept as" in caplog.text and json.loads((sweep / name).read_text()) is not None
    notes = load_sweep([sweep]).notes
    assert len(notes) == 2 and notes[0] == f"{sweep / (name + '.damaged')} is a damaged {name} a launch kept aside; " \
                                           "what it recorded is not in this report"


def test_every_damaged_copy_a_writer_keeps_aside_stays_on_disk(tmp_path):
    """A third damaged record is kept as .damaged.2: the copies kept aside earlier are not written over (what each
    still holds is the user's only trace of its entries)."""
    from src.launch.sweep_files import damaged_copies, update_sweep_file

    for n in range(3):
        (tmp_path / "jobs.json").write_text(f'{{"damaged {n}"')
        update_sweep_file(tmp_path / "jobs.json", lambda entries: {**entries, "a": {"run_dir": "a"}})
    copies = damaged_copies(tmp_path, "jobs.json")
    assert [p.name for p in copies] == ["jobs.json.damaged", "jobs.json.damaged.1", "jobs.json.damaged.2"]
    assert [p.read_text() for p in copies] == ['{"damaged 0"', '{"damaged 1"', '{"damaged 2"']
