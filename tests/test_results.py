"""src/results.py: the one record schema, its identity, the completeness rule, legacy records, entry names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.results import (
    FIELDS, IDENTITY_FIELDS, Record, describe_missing, entry_name, find_record, merge_results, missing_records, of_step,
    parse_run_tag, read_results, record_identity, select_current, setting_label, upgrade, wanted_records,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = {"recipe": "rf/lognorm(0.00, 1.00)", "family": "rf_lognorm", "params": {"m": 0.0, "s": 1.0}}
CFG = {
    "data": {"name": "digits"}, "seed": 1, "run_tag": "/optim.lr=0.0001,seed=1",
    "model": {"_target_": "src.models.MMDiT"},
    "eval": {"settings": [{"steps": 5, "cfg": 5.0}, {"steps": 50, "cfg": 1.0}], "ema": [True, False], "shift": 1.0,
             "n_samples": 100, "seed": 1234, "checkpoint": "best"},
}
# A record as results.json held it before this schema (the ranked name in `recipe`, `seed` for the noise seed).
LEGACY = {
    "recipe": "rf/lognorm(0.00, 1.00) [DiT, optim.lr=0.0001]", "family": "rf_lognorm", "params": {"m": 0.0, "s": 1.0},
    "dataset": "digits", "setting": "5 steps, cfg 5.0", "steps": 5, "cfg": 5.0, "shift": 1.0, "ema": True,
    "clip_score": 0.25, "fid_clip": 1.5, "fid_inception": None, "n_samples": 100, "n_reference": 297, "seed": 1234,
    "checkpoint_step": 500, "arrays": "eval/a.npz", "reference_arrays": "/r.npz", "config": {},
    "created": "2024-01-01T00:00:00+00:00",
}


def test_results_module_imports_without_torch_or_lightning():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'lightning', 'pytorch_lightning', 'open_clip'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import src.results\n"
        "assert not any(m.split('.')[0] in ('torch', 'lightning') for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_run_tag_parses_into_tags():
    assert parse_run_tag("/optim.lr=0.0001,seed=1") == {"optim.lr": 0.0001, "seed": 1}
    assert parse_run_tag("/optim.lr=0.0001/seed=1") == {"optim.lr": 0.0001, "seed": 1}
    assert parse_run_tag("") == {} and parse_run_tag(None) == {}
    assert parse_run_tag("/model=dit,flag=true,list=[1,2]") == {"model": "dit", "flag": True, "list": "[1,2]"}
    # Integers stay integers (1 == 1.0 would hide it), so an entry reads `rf [model.depth=4]`, not `depth=4.0`.
    tags = parse_run_tag("/model.depth=4,optim.lr=1e-4")
    assert tags == {"model.depth": 4, "optim.lr": 0.0001} and type(tags["model.depth"]) is int
    record = {"recipe": "rf", "tags": tags, "backbone": "MMDiT", "sampler": "rf_time"}
    assert entry_name(record) == "rf [model.depth=4, optim.lr=0.0001]"
    # The training seed is dropped by default (seeds pool as replicates); a swept model names the backbone already.
    assert entry_name({**record, "tags": {"seed": 1, "optim.lr": 0.0001}}) == "rf [optim.lr=0.0001]"
    assert entry_name({**record, "tags": {"model": "dit"}, "backbone": "DiT"}) == "rf [model=dit]"
    assert entry_name({**record, "tags": {}, "backbone": "DiT"}) == "rf [DiT]"


def test_setting_labels_keep_every_decimal_a_scale_needs():
    assert setting_label(50, 5) == "50 steps, cfg 5.0"
    assert setting_label(50, 7.25, 1.0) == "50 steps, cfg 7.25"  # not 7.2: another setting than cfg 7.2
    assert setting_label(25, 4.5, 3.125) == "25 steps, cfg 4.5, shift 3.125"


def test_wanted_records_cover_settings_times_ema_with_every_evaluation_setting():
    wanted = wanted_records(CFG, RECIPE, "tiny_clip:0123456789ab")
    assert [(w["setting"], w["ema"]) for w in wanted] == [
        ("5 steps, cfg 5.0", True), ("5 steps, cfg 5.0", False), ("50 steps, cfg 1.0", True),
        ("50 steps, cfg 1.0", False)]
    w = wanted[0]
    assert set(w) == {*IDENTITY_FIELDS, "inception_extractor", "sampler_code", "decoder"}
    assert w["inception_extractor"] is None and w["sampler_code"] is None  # no Inception, a built-in sampler
    assert w["decoder"] is None  # pixel space
    assert (w["tags"], w["train_seed"], w["backbone"], w["sampler"], w["n_samples"], w["eval_seed"]) == (
        {"optim.lr": 0.0001, "seed": 1}, 1, "MMDiT", "rf_time", 100, 1234)
    assert (w["feature_extractor"], w["fid_features"], w["checkpoint"]) == ("tiny_clip:0123456789ab", "clip_raw", "best")
    shifted = wanted_records({**CFG, "eval": {**CFG["eval"], "shift": 3.0}}, RECIPE, "x")[0]
    assert shifted["setting"] == "5 steps, cfg 5.0, shift 3.0" and shifted["shift"] == 3.0
    sampled = wanted_records({**CFG, "sampler": {"name": "native"}}, RECIPE, "x")[0]
    assert sampled["sampler"] == "native"


def _stored(wanted: dict, tmp_path: Path, **metrics) -> dict:
    (tmp_path / "eval").mkdir(exist_ok=True)
    arrays = tmp_path / "eval" / f"{len(list((tmp_path / 'eval').iterdir()))}.npz"
    np.savez(arrays, clip_scores=np.zeros(2))  # a readable arrays file (a truncated one does not count)
    return {**wanted, "clip_score": 0.2, "fid_clip": 1.0, "fid_inception": None, "n_reference": 10,
            "checkpoint_step": 4, "arrays": str(arrays.relative_to(tmp_path)), "reference_arrays": "/r.npz",
            **metrics}


@pytest.mark.parametrize("field, value, message", [
    ("n_samples", 200, "eval.n_samples=200"),
    ("eval_seed", 7, "eval.seed=7"),
    ("shift", 3.0, "eval.shift=3.0"),
    ("sampler", "native", "sampler=native"),
    ("feature_extractor", "ViT-L-14-quickgelu:/m.pt", "eval.clip=ViT-L-14-quickgelu:/m.pt"),
    ("checkpoint", "last", "eval.checkpoint=last"),
])
def test_completeness_needs_exactly_the_wanted_settings(tmp_path, field, value, message):
    wanted = wanted_records(CFG, RECIPE, "tiny_clip:0123456789ab")
    records = [_stored(w, tmp_path) for w in wanted]
    assert missing_records(records, wanted, tmp_path) == []
    changed = [{**w, field: value} for w in wanted]
    assert missing_records(records, changed, tmp_path) == changed  # every record of the old setting is stale
    assert describe_missing(changed, records) == message
    assert select_current(records, changed) == [] and select_current(records, wanted) == records


def test_completeness_needs_the_arrays_and_a_configured_inception_fid(tmp_path):
    wanted = wanted_records(CFG, RECIPE, "x")
    records = [_stored(w, tmp_path) for w in wanted]
    assert missing_records(records, wanted, tmp_path, need_inception=True) == wanted
    (tmp_path / records[1]["arrays"]).unlink()
    assert missing_records(records, wanted, tmp_path) == [wanted[1]]
    assert describe_missing([wanted[1]], records) == "1 setting(s): 5 steps, cfg 5.0 (raw)"
    assert describe_missing(wanted, []) == "all settings (none evaluated yet)"
    assert describe_missing([], records) == "nothing"
    # A sampler's code or decoder that cannot be named here ("unknown") is no setting any record lacks.
    unknown = [{**wanted[1], "sampler_code": "unknown", "decoder": "unknown"}]
    assert describe_missing(unknown, records) == "1 setting(s): 5 steps, cfg 5.0 (raw)"
    # ... nor a reason to evaluate again: any stored record counts for it.
    coded = [{**r, "sampler_code": "ab2.py:0123", "decoder": "AutoencoderKL:vae:aaa"} for r in records]
    assert missing_records(coded, [{**w, "sampler_code": "unknown", "decoder": "unknown"} for w in wanted]) == []
    assert find_record([{**records[0], "fid_clip": 1.0}, {**records[0], "fid_clip": 2.0}],
                       record_identity(records[0]))["fid_clip"] == 2.0  # the last of several


def test_records_of_the_checkpoint_at_another_step_are_not_current():
    rec = {"recipe": "rf", "dataset": "digits", "setting": "5 steps, cfg 5.0", "steps": 5, "cfg": 5.0, "ema": True,
           "clip_score": 0.2, "fid_clip": 1.0, "tags": {}, "backbone": "MMDiT"}
    records = [{**rec, "checkpoint": which, "checkpoint_step": step}
               for which, step in (("best", 8), ("best", 4), ("best", None), ("last", 4))]
    # best is now step 8: its step-4 record is stale; one without a step (older schema) and last's are kept.
    assert [r["checkpoint_step"] for r in of_step(records, "best", 8)] == [8, None, 4]
    assert of_step(records, "best", None) == records


def test_arrays_are_read_whole_once_per_file_version(tmp_path, monkeypatch):
    """The completeness check read every record's arrays whole (a CRC over every member) at each plan, report and job:
    about 4 GB for the paper's grid. A file version (path, size, mtime, ctime) read whole is remembered in the process
    and under the cache folder, never in the run directory; one changed in place is read again, and a damaged one
    counts as missing; one written too recently to tell a rewrite apart is read every time."""
    import os

    import src.results as results

    monkeypatch.setattr(results, "_VERIFIED", set())
    monkeypatch.setattr(results, "_STORES", {})
    read = []
    monkeypatch.setattr(results, "_readable_npz", lambda p, real=results._readable_npz: read.append(p) or real(p))
    run, cache = tmp_path / "run", tmp_path / "cache"
    run.mkdir()
    wanted = wanted_records(CFG, RECIPE, "x")
    records = [_stored(w, run) for w in wanted]
    other = _stored({**wanted[0], "n_samples": 7}, run)  # of settings not wanted: its arrays are not read

    def missing():
        return missing_records([*records, other], wanted, run, cache_dir=cache)

    assert missing() == [] and len(read) == 4  # just written: read every time
    assert missing() == [] and len(read) == 8 and not cache.exists()
    monkeypatch.setattr(results, "SETTLED_NS", 0)  # as for files written a while ago
    in_run = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert missing() == [] and len(read) == 12
    assert missing() == [] and len(read) == 12  # remembered in this process
    monkeypatch.setattr(results, "_VERIFIED", set())
    monkeypatch.setattr(results, "_STORES", {})
    assert missing() == [] and len(read) == 12  # a new process: remembered under the cache folder
    assert sorted(json.loads((cache / results.VERIFIED_ARRAYS_FILE).read_text())) == sorted(
        str((run / r["arrays"]).resolve()) for r in records)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == in_run  # nothing written in the run directory

    arrays = run / records[1]["arrays"]
    intact, stat = arrays.read_bytes(), arrays.stat()
    arrays.write_bytes(intact[:60] + bytes(100) + intact[160:])  # damaged in place: the same size, its zip directory
    os.utime(arrays, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))  # (another mtime, whatever the clock's tick)
    assert not results._readable_npz(arrays) and len(read) == 13
    assert missing() == [wanted[1]] and len(read) == 14
    assert missing() == [wanted[1]] and len(read) == 15  # an unreadable file is not remembered
    arrays.write_bytes(intact)  # restored
    os.utime(arrays, ns=(stat.st_atime_ns, stat.st_mtime_ns - 2 * 10**9))
    assert missing() == [] and len(read) == 16
    assert missing() == [] and len(read) == 16


def test_a_configured_inception_needs_a_fid_of_its_weights(tmp_path):
    """Records name the Inception weights behind fid_inception (not part of the identity): with Inception configured,
    a record of other weights, or of none named (written before the field), is missing; without, it counts."""
    wanted = wanted_records(CFG, RECIPE, "x", inception_extractor="inception-v3-2048:aaa")
    assert wanted[0]["inception_extractor"] == "inception-v3-2048:aaa"
    plain = wanted_records(CFG, RECIPE, "x")
    stored = [_stored(w, tmp_path, fid_inception=9.0) for w in wanted]
    assert missing_records(stored, wanted, tmp_path, need_inception=True) == []
    assert missing_records(stored, plain, tmp_path) == []  # Inception turned off: complete as it is
    other = [{**r, "inception_extractor": "inception-v3-2048:bbb"} for r in stored]
    before = [{k: v for k, v in r.items() if k != "inception_extractor"} for r in stored]
    for records in (other, before):
        assert missing_records(records, wanted, tmp_path, need_inception=True) == wanted
        assert describe_missing(wanted, records) == "eval.inception=inception-v3-2048:aaa"
    assert describe_missing([{**plain[0], "n_samples": 7}], stored) == "eval.n_samples=7"
    assert Record.from_dict(before[0]).inception_extractor is None  # optional: today's records without it read
    nulled = [{**r, "fid_inception": None} for r in stored]  # the weights named, but no Inception FID stored
    assert missing_records(nulled, wanted, tmp_path) == wanted


def test_latent_records_need_the_decoder_the_configuration_names(tmp_path):
    """Latent samples decoded by another autoencoder (or by one not named: a record written before the field) are
    not the current results; pixel space (None) and an autoencoder not on this machine ("unknown") take any."""
    wanted = wanted_records(CFG, RECIPE, "x", decoder="AutoencoderKL:vae:aaa")
    stored = [_stored(w, tmp_path) for w in wanted]
    assert missing_records(stored, wanted, tmp_path) == []
    other = [{**r, "decoder": "AutoencoderKL:vae:bbb"} for r in stored]
    before = [{k: v for k, v in r.items() if k != "decoder"} for r in stored]
    for records in (other, before):
        assert missing_records(records, wanted, tmp_path) == wanted
        assert describe_missing(wanted, records) == "the autoencoder (eval.autoencoder_path)=AutoencoderKL:vae:aaa"
    for name in (None, "unknown"):
        assert missing_records(other, wanted_records(CFG, RECIPE, "x", decoder=name), tmp_path) == []
    assert Record.from_dict(before[0]).decoder is None and Record.from_dict(stored[0]).decoder.endswith(":aaa")


def test_merge_keeps_records_of_other_settings_and_replaces_the_same_one(tmp_path):
    wanted = wanted_records(CFG, RECIPE, "x")[:1]
    first = _stored(wanted[0], tmp_path, fid_clip=1.0)
    merge_results(tmp_path, [first])
    merge_results(tmp_path, [_stored({**wanted[0], "n_samples": 200}, tmp_path, fid_clip=2.0)])
    merge_results(tmp_path, [_stored(wanted[0], tmp_path, fid_clip=3.0)])  # the same settings again: replaced
    stored = read_results(tmp_path)
    assert sorted((r["n_samples"], r["fid_clip"]) for r in stored) == [(100, 3.0), (200, 2.0)]
    (tmp_path / "results.json").write_text(json.dumps([*stored, {"recipe": "rf", "dataset": "digits"}]))
    with pytest.raises(ValueError, match=r"record 2 lacks required field\(s\) setting, steps"):
        read_results(tmp_path)  # refused here, not kept, added to and refused later by the report
    (tmp_path / "results.json").write_text(json.dumps(stored))
    assert [r["fid_clip"] for r in select_current(stored, wanted)] == [3.0]
    # Of several records of one setting (written by hand, or by an older version), the newest; on a tie the later.
    old_new = [{**first, "fid_clip": 4.0, "created": "2024-01-02"}, {**first, "fid_clip": 5.0, "created": "2024-01-01"}]
    assert [r["fid_clip"] for r in select_current(old_new, wanted)] == [4.0]
    assert [r["fid_clip"] for r in select_current(old_new[::-1], wanted)] == [4.0]
    tie = [{**first, "fid_clip": 6.0, "created": "2024-01-03"}, {**first, "fid_clip": 7.0, "created": "2024-01-03"}]
    assert [r["fid_clip"] for r in select_current(tie, wanted)] == [7.0]


def test_legacy_record_reads_with_defaults():
    rec = upgrade(LEGACY)
    assert rec["recipe"] == "rf/lognorm(0.00, 1.00)" and rec["backbone"] == "DiT"
    assert rec["tags"] == {"optim.lr": 0.0001} and rec["train_seed"] is None
    assert (rec["sampler"], rec["eval_seed"], rec["fid_features"], rec["checkpoint"]) == (
        "rf_time", 1234, "clip_l2norm", "best")
    assert "seed" not in rec and set(FIELDS) <= set(rec)
    assert Record.from_dict(LEGACY).eval_seed == 1234
    assert entry_name(LEGACY) == "rf/lognorm(0.00, 1.00) [DiT, optim.lr=0.0001]"  # the name it was ranked under
    # With its configuration stored, the tags and training seed come from it.
    with_config = upgrade({**LEGACY, "recipe": "rf", "config": {"run_tag": "/seed=3", "seed": 3,
                                                                  "model": {"_target_": "src.models.MMDiT"}}})
    assert (with_config["tags"], with_config["train_seed"], with_config["backbone"]) == ({"seed": 3}, 3, "MMDiT")
    # A legacy record never satisfies a wanted one: its FID used other features, so the run is evaluated again.
    wanted = wanted_records(CFG, RECIPE, "x")
    assert len(missing_records([LEGACY], wanted)) == len(wanted)
    # Only records with both tags and backbone are of today's schema; one with tags alone is upgraded too.
    half = upgrade({k: v for k, v in LEGACY.items() if k != "sampler"} | {"tags": {}})
    assert half["backbone"] == "DiT" and half["sampler"] == "rf_time" and half["fid_features"] == "clip_l2norm"


def test_legacy_results_json_loads_in_the_ranking(tmp_path):
    pd = pytest.importorskip("pandas")
    from src.ranking.aggregate import load_sweep

    run = tmp_path / "sweep" / "run"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps([LEGACY, {**LEGACY, "ema": False}]))
    sweep = load_sweep([tmp_path / "sweep"])
    assert isinstance(sweep.records, pd.DataFrame) and len(sweep.records) == 2
    assert set(sweep.records["recipe"]) == {"rf/lognorm(0.00, 1.00) [DiT, optim.lr=0.0001]"}
    assert set(sweep.records["eval_seed"]) == {1234} and set(sweep.records["fid_features"]) == {"clip_l2norm"}


def test_identity_is_the_settings_not_the_numbers():
    wanted = wanted_records(CFG, RECIPE, "x")[0]
    a = {**wanted, "clip_score": 0.1, "fid_clip": 1.0, "created": "a"}
    b = {**wanted, "clip_score": 0.9, "fid_clip": 9.0, "created": "b", "ema": 1}
    assert record_identity(a) == record_identity(b)
    def change(value):
        if isinstance(value, bool):
            return not value
        if isinstance(value, (int, float)):
            return value + 1
        return {"x": 1} if isinstance(value, dict) else f"other-{value}"

    for field in IDENTITY_FIELDS:
        other = {**wanted, field: change(wanted[field])}
        assert record_identity(other) != record_identity(a), field


def test_a_sweep_over_sampler_name_names_the_sampler_once():
    """-m sampler.name=ab2:AB2,rf_time (a sampler from outside, named by import path): the tag names the sampler."""
    record = {"recipe": RECIPE["recipe"], "backbone": "MMDiT", "tags": {"sampler.name": "ab2:AB2"},
              "sampler": "ab2:AB2"}
    assert entry_name(record) == "rf/lognorm(0.00, 1.00) [sampler.name=ab2:AB2]"
    assert entry_name({**record, "tags": {}}) == "rf/lognorm(0.00, 1.00) [sampler=ab2:AB2]"


def test_tags_of_run_directories_named_before_run_tags_showed_strings_as_themselves_are_todays():
    """Run tags used to hold the sweeper's text of a swept string: quoted ('a b') or escaped for Hydra (ab2\\:AB2).
    A relaunch names the directory x=a b now; the old directory's run must be the same run (reused, not retrained,
    and its records current) and one ranked entry, not a second one `[x='a b']`."""
    assert parse_run_tag("/x='a b',s=ab2\\:AB2,y='1',z=a\\ b,w=\"it's\",v='c,d'") == {
        "x": "a b", "s": "ab2:AB2", "y": 1, "z": "a b", "w": "it's", "v": "c,d"}
    assert parse_run_tag("/x=a b,s=ab2:AB2,optim.lr=0.0001") == {"x": "a b", "s": "ab2:AB2", "optim.lr": 0.0001}
    assert parse_run_tag("/x=a\\b,y=f\\(x\\)") == {"x": "a\\b", "y": "f(x)"}  # a backslash Hydra did not add stays
    cfg = {**CFG, "run_tag": "/x=a b"}
    wanted = wanted_records(cfg, RECIPE, "tiny_clip:0123456789ab")
    stored = [{**w, "tags": {"x": "'a b'"}, "clip_score": 0.3, "fid_clip": 2.0} for w in wanted]  # written then
    assert missing_records(stored, wanted) == []
    assert record_identity(stored[0]) == record_identity(wanted[0])
    assert entry_name({**stored[0], "backbone": "MMDiT"}) == "rf/lognorm(0.00, 1.00) [x=a b]"


def test_the_report_names_a_swept_sampler_name_once():
    """The rank report qualifies entries by sampler when the records hold several, unless the run tag names it."""
    import pandas as pd

    from src.ranking.aggregate import name_entries

    records = pd.DataFrame({
        "base_entry": ["rf [sampler.name=ab2:AB2]", "rf [sampler.name=rf_time]", "rf [sampler=heun]", "rf [lr=0.1]"],
        "sampler": ["ab2:AB2", "rf_time", "heun", "native"]})
    assert name_entries(records)["entry"].tolist() == [
        "rf [sampler.name=ab2:AB2]", "rf [sampler.name=rf_time]", "rf [sampler=heun]", "rf [lr=0.1, sampler=native]"]
