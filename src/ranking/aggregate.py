"""Load a sweep's results and rank recipes per control setting, averaged as in the paper's Table 1 (docs/ranking.md#average-rank-and-columns).

Training seeds are replicates of one entry, not entries of their own. A run's ranked name carries its swept
values (`rf [optim.lr=0.0001,seed=1]`, see src/launch/sweeper.py); the entry is that name without the seed
(`rf [optim.lr=0.0001]`), the seed is the replicate. Replicates enter non-dominated sorting through their mean:
per control setting, an entry's CLIP score and FID are the means over its training seeds (seed-mean), and the
entries are sorted on these; an entry's rank in a column is its mean front over the column's settings. The
bootstrap (src/ranking/bootstrap.py) resamples the training seeds of every entry as well as the evaluation
samples, so intervals, first-front probabilities and separability include the variation between training runs.
An entry with fewer seeds than the others is ranked on the seeds it has and marked in the report.

Sampler variants (the records' `sampler` field) are separate entries when a sweep holds several
(`eps/linear [sampler=native]`), unless the report is restricted to one sampler.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

from src.config import ADDED_KEYS, TRAINED_PRECISION, without_throughput_keys
from src.launch.failures import read_sweep_failures
from src.launch.planned import planned_run_dir, read_planned_jobs
from src.launch.rundir import evaluation_configs
from src.launch.sweep_files import DamagedSweepFile, damaged_copies
from src.ranking.nds import non_dominated_ranks
from src.ranking.paper import COLUMNS
from src.results import (
    CONFIG_KEYS, DEFAULT_SAMPLER, FID_FEATURES, FIELDS, LEGACY_FID_FEATURES, describe_missing, entry_name, record_identity,
    upgrade,
)

RUN_MARKERS = (".hydra/config.yaml", "results.json", "error.json")
SETTING_KEY = ["dataset", "setting", "ema"]  # a control setting (docs/ranking.md#control-settings: dataset x sampler setting x EMA)
# One record per (entry, sampler, training seed, control setting); a rerun's newer record replaces the older one.
RECORD_KEY = ["base_entry", "sampler", "train_seed", *SETTING_KEY]
REQUIRED_FIELDS = ("recipe", "dataset", "setting", "steps", "cfg", "ema", "clip_score", "fid_clip")
DERIVED_FIELDS = ("entry", "base_entry", "train_seed", "sampler", "fid_features")
# The other record fields (src/results.py) the ranking carries along (all but the config).
OPTIONAL_FIELDS = tuple(f for f in FIELDS if f not in REQUIRED_FIELDS and f not in DERIVED_FIELDS and f != "config")
#: The type of each other record field the report reads, when present and not null (tags and backbone name the
#: entry: never null). A hand-edited or foreign record's other type is refused naming it, as a required field's is.
FIELD_KINDS = {
    **dict.fromkeys(("family", "backbone", "sampler", "feature_extractor", "fid_features", "checkpoint", "arrays",
                     "reference_arrays", "inception_extractor", "sampler_code", "decoder", "created"), "a string"),
    **dict.fromkeys(("train_seed", "n_samples", "eval_seed", "checkpoint_step", "n_reference"), "an integer"),
    "shift": "a number", "params": "an object", "tags": "an object",
}
NOT_NULL = ("tags", "backbone")
OBJECTIVES = (("clip_score", True), ("fid_clip", False))  # CLIP score up, FID down (docs/ranking.md#objectives)
METRICS = ("clip_score", "fid_clip", "fid_inception")

# The feature definition of fid_clip and the sampler of records written before either was recorded: one
# definition, in the torch-free results module.
LEGACY_SAMPLER = DEFAULT_SAMPLER
DEFAULT_FIFTY_STEP_CFG = 5.0  # the 5-step column is at CFG 5.0; 50 steps at the same scale is the matching choice
REEVALUATE = "python -m src.evaluate RUN_DIR"
# n_wanted, n_missing: the records the run's configuration asks for, and how many of them it lacks (None: unknown).
RUN_COLUMNS = ["sweep", "run_dir", "status", "error", "n_records", "n_wanted", "n_missing", "overrides"]
#: What each run status means, as the report says it. done: every record its configuration asks for; partial: some
#: of them (killed during the evaluation); incomplete: no results.json; missing: planned in jobs.json, never started;
#: refused: failures.json says its latest launch did not run, and the directory holds an earlier run.
STATUS_WORDS = {"done": "done", "partial": "partial results", "failed": "failed", "incomplete": "running or killed",
                "unreadable": "unreadable", "missing": "never started", "refused": "relaunch not run"}


@dataclass
class Sweep:
    """Records of one or more sweep directories, with the status of every run directory found."""

    roots: tuple[Path, ...]
    records: pd.DataFrame
    runs: pd.DataFrame
    duplicates: pd.DataFrame
    problems: tuple[str, ...] = ()  # sweep-level reasons its completeness is unknown (a damaged failures.json)
    notes: tuple[str, ...] = ()  # sweep-level facts the reader should know (a damaged file a launch kept aside)

    @property
    def name(self) -> str:
        """Sweep name: the directory name, or the names joined with '+'."""
        return "+".join(root.name for root in self.roots)

    @property
    def partial(self) -> bool:
        """True when some run lacks results (running, killed, failed, unreadable, partly evaluated, never started,
        relaunch not run) or the sweep's own records cannot say whether it is complete."""
        return bool((self.runs["status"] != "done").any()) or bool(self.problems)


# ---------------------------------------------------------------------------------------------- loading


def is_run_dir(path: Path) -> bool:
    """A run directory holds .hydra/config.yaml, results.json or error.json."""
    return any((path / marker).is_file() for marker in RUN_MARKERS)


#: Files a launch writes at a sweep directory's top (src/launch/sweeper.py, planned.py, failures.py).
SWEEP_MARKERS = ("multirun.yaml", "jobs.json", "failures.json")


def held_sweeps(root: Path) -> list[str]:
    """The sweep directories directly under root when root is neither a sweep nor a run directory (the multirun
    folder given by mistake): pooled as one sweep, their jobs.json would go unread and the same entry of two sweeps
    would silently replace one another. Empty otherwise."""
    if not root.is_dir() or is_run_dir(root) or any((root / m).is_file() for m in SWEEP_MARKERS):
        return []
    return sorted(c.name for c in root.iterdir() if c.is_dir() and any((c / m).is_file() for m in SWEEP_MARKERS))


def find_run_dirs(root: Path | str) -> list[Path]:
    """Run directories under root (root itself included), not descending into a run directory."""
    root = Path(root)
    if not root.is_dir():  # a file given by mistake (a results.json, a config) is not said to be absent
        raise FileNotFoundError(f"sweep directory {str(root)!r} " + ("is a file, not a directory" if root.exists()
                                                                     else "does not exist"))
    found = []
    for current, dirs, _ in os.walk(root):
        path = Path(current)
        if is_run_dir(path):
            found.append(path)
            dirs[:] = []
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found)


def load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """Status row and record rows of one run directory. A run is done when results.json holds every record its
    configuration asks for (the job's own rule, run_completeness); with only some of them it is partial."""
    results, error = run_dir / "results.json", run_dir / "error.json"
    status = {"run_dir": str(run_dir), "status": "incomplete", "error": "", "n_records": 0, "n_wanted": None,
              "n_missing": None, "overrides": _read_overrides(run_dir)}
    records: list[dict] = []
    if error.is_file():
        status["status"] = "failed"
        status["error"] = _read_error(error)
    if results.is_file():
        try:
            raw = json.loads(results.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            status.update(status="unreadable", error=f"results.json: {exc}")
            return status, records
        if not isinstance(raw, list):
            raise ValueError(f"{results}: expected a JSON list of records, got {type(raw).__name__}")
        records = [_record_row(rec, run_dir, results, i) for i, rec in enumerate(raw)]
        status["n_records"] = len(records)
        wanted = run_completeness(run_dir, raw)
        if wanted is not None:  # of two records of one setting, the one the latest launch asked for is ranked
            ids, current = {record_identity(w) for w in wanted[3]}, _of_current_step(run_dir, raw)
            for row, rec, now in zip(records, raw, current):  # an earlier step's records (trained longer) are not
                row["_wanted"] = now and record_identity(upgrade(rec)) in ids
        if status["status"] == "incomplete":
            status["status"] = "done"
            if wanted is not None:
                n_wanted, missing, absent, _ = wanted
                status.update(n_wanted=n_wanted, n_missing=len(missing))
                if missing:  # killed during its evaluation, or relaunched with more settings and not finished
                    what = [f"missing: {describe_missing(absent, raw)}"] if absent else []
                    if len(missing) > len(absent):
                        what.append(f"{len(missing) - len(absent)} without their arrays (eval/*.npz)")
                    status.update(status="partial", error=f"{n_wanted - len(missing)} of the {n_wanted} records "
                                  f"its configuration asks for; {'; '.join(what)}")
    return status, records


def run_completeness(run_dir: Path, records: list[dict]
                     ) -> tuple[int, list[dict], list[dict], list[dict]] | None:
    """(how many records the run's configuration asks for, those it lacks by the job's own rule, those of them
    results.json does not hold at all, the records it asks for); None when no configuration of the run can say (a hand-made run directory, a
    configuration of another version). The rule is src.results.missing_records, as src.evaluation.run.missing_for
    applies it: a wanted record counts when one with exactly its settings is stored and its arrays are on disk.

    The configuration is the latest request's: a `python -m src.evaluate` since the last launch (eval_request.yaml),
    else the latest launch's (.hydra/config.yaml, written by every launch that ran in the directory), else
    config.yaml (the one the directory was bound with): a relaunch may ask for more evaluation settings than the
    first launch did, and a re-evaluation for other ones. A CLIP model whose weights are not on this machine (a sweep
    copied from the cluster) cannot be named here as the job named it, so any stored name counts for it.
    """
    from omegaconf import OmegaConf

    from src.results import missing_records, of_step

    for path in evaluation_configs(run_dir):
        try:
            cfg = OmegaConf.load(path) if path.is_file() else None
            if cfg is None or not (OmegaConf.is_dict(cfg.get("eval")) and OmegaConf.is_dict(cfg.get("loss"))):
                continue
            if not cfg.eval.enabled:
                return 0, [], [], []
            from src.evaluation.run import wanted_for  # (torch: only for real run directories)

            wanted = wanted_for(cfg)
            # As missing_for: records of the checkpoint at another step than its step now are not this model's.
            which = str(OmegaConf.select(cfg, "eval.checkpoint", default="best"))
            current = of_step(records, which, _checkpoint_step(run_dir, which))
            clip = OmegaConf.select(cfg, "eval.clip.weights_path")
            if clip is not None and not Path(str(clip)).is_file():
                stored = {r.get("feature_extractor") for r in records}
                wanted = [{**w, "feature_extractor": next(iter(stored))} for w in wanted] if len(stored) == 1 \
                    else wanted
            need_inception = OmegaConf.select(cfg, "eval.inception.weights_path") is not None
            # The arrays files read whole are remembered under the run's cache folder (as wanted_for remembers the
            # weights' checksums there), never in the run directory: the report only reads runs.
            cache_dir = OmegaConf.select(cfg, "paths.cache_dir")
            return (len(wanted), missing_records(current, wanted, run_dir, need_inception, cache_dir),
                    missing_records(current, wanted, None, need_inception), wanted)
        except Exception:  # noqa: BLE001 -- a file this version cannot read as a configuration: try the next
            continue
    return None


def _of_current_step(run_dir: Path, records: list[dict]) -> list[bool]:
    """Whether each record is of its checkpoint's step now (src.results.of_step): one scored before training went
    on (a run trained longer keeps them) is not ranked over the records of the step trained to."""
    from src.results import of_step

    which = [upgrade(r)["checkpoint"] for r in records]
    steps = {w: _checkpoint_step(run_dir, w) for w in set(which) if w in ("best", "last")}
    return [bool(of_step([r], w, steps.get(w))) for r, w in zip(records, which)]


def _checkpoint_step(run_dir: Path, which: str) -> int | None:
    """The step of the checkpoint the run's evaluation uses now (src.evaluation.run.checkpoint_step); None where none
    can be read (a sweep copied without its checkpoints: every record counts) or a lost best.ckpt's step is unknown."""
    from src.evaluation.run import MissingBestCheckpoint, checkpoint_step

    try:
        return checkpoint_step(run_dir, which)
    except MissingBestCheckpoint:
        return None


def load_sweep(dirs: Iterable[Path | str], by_sweep: bool = False) -> Sweep:
    """Records and run statuses of every run directory under the given sweep directories.

    by_sweep: qualify every entry by its sweep directory's name (`rf [sweep=table1_rung1]`), so that sweeps of the
    same recipes (e.g. two budgets of one study) are ranked side by side instead of pooled.
    """
    # `.` and `..` have no name of their own (the sweep's name titles the report and names its default folder):
    # those are made absolute, without following links; other paths stay as given.
    roots = tuple(Path(d) if Path(d).name not in ("", "..") else Path(os.path.abspath(d)) for d in dirs)
    if not roots:
        raise ValueError("load_sweep: no sweep directory given")
    names = [root.name for root in roots]
    if by_sweep and len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"--by-sweep: sweep directories share the name(s) {', '.join(twice)}; the name is the "
                         "entries' qualifier, so each sweep needs its own")
    for root in roots:
        sweeps = held_sweeps(root)
        if sweeps:
            shown = " ".join(str(root / n) for n in sweeps[:3]) + (" ..." if len(sweeps) > 3 else "")
            raise ValueError(f"{root} is not a sweep directory but holds {len(sweeps)} sweep(s) "
                             f"({', '.join(sweeps[:8])}{' ...' if len(sweeps) > 8 else ''}): give the sweep "
                             f"directories themselves, e.g. {shown}")
    statuses, rows, problems, notes = [], [], [], []
    for root in roots:
        found = find_run_dirs(root)
        held = {}  # run directory -> its status
        for run_dir in found:
            status, records = load_run(run_dir)
            statuses.append({"sweep": root.name, **status})
            rows.extend({"sweep": root.name, **rec} for rec in records)
            held[run_dir] = status["status"]
        found_rows, found_problems, found_notes = _sweep_record_rows(root, held)
        statuses += found_rows
        problems += found_problems
        notes += found_notes
    runs = pd.DataFrame(statuses, columns=RUN_COLUMNS)
    records = pd.DataFrame(rows, columns=["sweep", "run_dir", *REQUIRED_FIELDS, *OPTIONAL_FIELDS, *DERIVED_FIELDS,
                                          "_wanted"])
    if by_sweep:
        records["base_entry"] = [_qualify(b, f"sweep={s}") for b, s in zip(records["base_entry"], records["sweep"])]
    records, duplicates = _drop_duplicates(records)
    return Sweep(roots=roots, records=name_entries(records), runs=runs, duplicates=duplicates,
                 problems=tuple(problems), notes=tuple(notes))


def _sweep_record_rows(root: Path, held: dict[Path, str]) -> tuple[list[dict], list[str], list[str]]:
    """Status rows from the sweep's own records, for the jobs its run directories cannot speak for; then the lines
    saying why its completeness is unknown, and notes.

    failures.json: jobs that failed before they could use their run directory (a configuration error, a refused
    relaunch, a busy directory). Without a directory the job is failed; with one, the directory holds an earlier
    run, which is ranked, and the row says the latest launch did not run (refused). jobs.json: the jobs the sweep
    was launched to run; one with neither a run directory nor a failure never started (a sweep killed half-way).
    Sweeps launched before jobs.json existed have none: their run directories are all the report knows.
    """
    from src.launch.failures import SWEEP_FAILURES
    from src.launch.planned import SWEEP_JOBS

    rows, problems, notes = [], [], []

    def row(run_dir: Path, status: str, error: str, overrides: str = "") -> dict:
        return {"sweep": root.name, "run_dir": str(run_dir), "status": status, "error": error, "n_records": 0,
                "n_wanted": None, "n_missing": None, "overrides": overrides}

    try:
        planned = read_planned_jobs(root)
    except DamagedSweepFile as exc:
        planned = {}
        problems.append(f"{exc}: the jobs the sweep was launched to run are unknown, so it may be incomplete")
    try:
        failures = read_sweep_failures(root)
    except DamagedSweepFile as exc:
        failures = {}
        problems.append(f"{exc}: the jobs it recorded as failed are unknown, so the sweep may be incomplete")

    def overrides(name: str) -> str:
        return " ".join(map(str, planned.get(name, {}).get("overrides") or []))

    for name, failure in sorted(failures.items()):
        error = str(failure.get("error", "")) if isinstance(failure, dict) else str(failure)
        run_dir = root / name
        if run_dir in held:
            when = f" at {failure['time']}" if isinstance(failure, dict) and failure.get("time") else ""
            rows.append(row(run_dir, "refused", f"{error} (its latest launch{when}, not run; the directory holds "
                                                f"an earlier run: {STATUS_WORDS.get(held[run_dir], held[run_dir])})",
                            overrides(name)))
        else:
            rows.append(row(run_dir, "failed", error, overrides(name)))
    for name, job in sorted(planned.items()):
        run_dir = planned_run_dir(root, job)
        if run_dir not in held and name not in failures:
            rows.append(row(run_dir, "missing", f"planned in {SWEEP_JOBS}, never started", overrides(name)))
    for name in (SWEEP_FAILURES, SWEEP_JOBS):
        for aside in damaged_copies(root, name):
            notes.append(f"{aside} is a damaged {name} a launch kept aside; what it recorded is not in this report")
    return rows, problems, notes


# ---------------------------------------------------------------------------------------------- entries


def split_seed(recipe: str) -> tuple[str, str | None]:
    """('rf [optim.lr=0.0001]', '1') from a ranked name 'rf [optim.lr=0.0001,seed=1]'; (recipe, None) without one.

    The qualifiers in brackets are ', '-separated (a backbone name, the run tag); the run tag's swept values are
    ','-separated `key=value` pairs (a piece without '=' belongs to the value before it, e.g. a list value).
    """
    match = re.fullmatch(r"(?P<base>.*?) \[(?P<quals>.*)\]", recipe)
    if match is None:
        return recipe, None
    seed, groups = None, []
    for group in match["quals"].split(", "):
        pairs: list[str] = []
        for piece in group.split(","):
            if "=" in piece or not pairs:
                pairs.append(piece)
            else:
                pairs[-1] += "," + piece
        kept = []
        for pair in pairs:
            if pair.startswith("seed="):
                seed = pair.split("=", 1)[1]
            else:
                kept.append(pair)
        if kept:
            groups.append(",".join(kept))
    return (f"{match['base']} [{', '.join(groups)}]" if groups else match["base"]), seed


def _sampler_name(value) -> str:
    """The sampler of a record: its `sampler` field (a name, or a mapping with a 'name'), else the legacy one."""
    if isinstance(value, dict):
        value = value.get("name")
    return str(value) if value not in (None, "") else LEGACY_SAMPLER


#: A ranked name's qualifier naming the sampler: "[sampler=native]", "[lr=0.1, sampler.name=ab2:AB2]".
SAMPLER_TAG = re.compile(r"[\[ ]sampler(\.name)?=")


def name_entries(records: pd.DataFrame) -> pd.DataFrame:
    """Set 'entry': the ranked name without its seed, qualified by the sampler when the records hold several.

    A sampler already in the run tag (a swept `sampler=` or `sampler.name=`) is not repeated.
    """
    records = records.copy()
    several = records["sampler"].nunique() > 1
    entries = []
    for base, sampler in zip(records["base_entry"], records["sampler"]):
        if several and not SAMPLER_TAG.search(base):
            base = _qualify(base, f"sampler={sampler}")
        entries.append(base)
    records["entry"] = pd.Series(entries, index=records.index, dtype=object)
    return records


def _qualify(name: str, qualifier: str) -> str:
    """The ranked name with one more `key=value` qualifier in its brackets."""
    return f"{name[:-1]}, {qualifier}]" if name.endswith("]") else f"{name} [{qualifier}]"


def check_sweep_overlap(sweep: Sweep) -> None:
    """Refuse, in one line, to pool sweeps that hold the same entry, training seed and control setting.

    Within one sweep directory the newest record of a key wins (a rerun job). Across the sweep directories given
    to one report the same key means two experiments of the same recipe (e.g. two budgets of a study whose run
    tags do not differ): keeping the newer would silently replace one by the other.
    """
    if len(sweep.roots) < 2 or sweep.duplicates.empty:
        return
    key = [k for k in RECORD_KEY if k in sweep.duplicates.columns]
    both = sweep.duplicates.merge(sweep.records[[*key, "sweep", "run_dir"]], on=key, suffixes=("", "_kept"))

    def root(run_dir) -> str:  # the sweep directory a run lies in: two of them may share a name (x/default, y/default)
        return next((str(r) for r in sweep.roots if Path(str(run_dir)).is_relative_to(r)), str(run_dir))

    clash = both[[root(a) != root(b) for a, b in zip(both["run_dir"], both["run_dir_kept"])]]
    if clash.empty:
        return
    first = clash.iloc[0]
    seed = f" seed {first['train_seed']}" if first["train_seed"] != "" else ""
    sweeps = sorted(set(clash["sweep"]) | set(clash["sweep_kept"]))
    by_sweep = ", or pass --by-sweep to rank each sweep's entries side by side"
    if len(sweeps) < 2:  # directories of one name: named by their paths; --by-sweep needs names of their own
        sweeps = sorted({root(d) for d in (*clash["run_dir"], *clash["run_dir_kept"])})
        by_sweep = " (--by-sweep needs sweep directories of different names)"
    raise ValueError(
        f"sweeps {', '.join(sweeps)} both hold {first['base_entry']}{seed} at {first['dataset']}, "
        f"{first['setting']} ({len(clash)} records in all); rank each sweep alone{by_sweep}"
    )


def restrict_sampler(records: pd.DataFrame, sampler: str) -> pd.DataFrame:
    """The records of one sampler, entries renamed without the sampler; a clear error naming those present."""
    present = sorted(records["sampler"].unique())
    if sampler not in present:
        raise ValueError(f"--sampler {sampler}: no records of that sampler; the sweep has "
                         f"{', '.join(present) or 'none'}")
    kept = records[records["sampler"] == sampler].reset_index(drop=True)
    kept["base_entry"] = [_drop_qualifier(b, f"sampler={sampler}") for b in kept["base_entry"]]
    return name_entries(kept)


def restrict_train_seeds(records: pd.DataFrame, seeds: Sequence[int | str], scope: str = "the sweep") -> pd.DataFrame:
    """The records of these training seeds (e.g. one seed alone, to see what a single-seed study would have said);
    a clear error naming the seeds present when none matches (scope: what the records are, as the error says it)."""
    wanted = [str(s) for s in seeds]
    present = sorted(records["train_seed"].astype(str).unique(), key=seed_order)
    absent = [s for s in wanted if s not in present]
    if absent:
        named = [s for s in present if s]  # '' is a run without a seed, not a seed to choose
        raise ValueError(f"--train-seeds {' '.join(absent)}: no records of that training seed; {scope} has "
                         f"{', '.join(named) if named else 'none (its runs name no training seed)'}")
    return records[records["train_seed"].astype(str).isin(wanted)].reset_index(drop=True)


def bare_recipe(entry: str) -> str:
    """The recipe of a ranked entry, without its qualifiers: `eps/linear [sampler=native]` -> `eps/linear`."""
    return entry.split(" [", 1)[0]


def restrict_recipes(records: pd.DataFrame, recipes: Sequence[str], scope: str = "the sweep") -> pd.DataFrame:
    """The records of these recipes (every variant of each: samplers, swept keys), to rank them among themselves;
    a clear error naming the recipes present when one is absent (scope: what the records are)."""
    bare = records["base_entry"].map(bare_recipe)
    present = sorted(bare.unique())
    absent = [r for r in recipes if r not in present]
    if absent:
        raise ValueError(f"--recipes {' '.join(repr(r) for r in absent)}: not in {scope}; it has "
                         f"{', '.join(present) or 'none'}")
    return records[bare.isin(list(recipes))].reset_index(drop=True)


def restrict_datasets(records: pd.DataFrame, datasets: Sequence[str], scope: str = "the sweep") -> pd.DataFrame:
    """The records of these datasets (their control settings only); a clear error naming those present (scope: what
    the records are)."""
    present = sorted(records["dataset"].astype(str).unique())
    absent = [d for d in datasets if d not in present]
    if absent:
        raise ValueError(f"--datasets {' '.join(absent)}: no records of that dataset; {scope} has "
                         f"{', '.join(present) or 'none'}")
    return records[records["dataset"].astype(str).isin(list(datasets))].reset_index(drop=True)


def _drop_qualifier(name: str, qualifier: str) -> str:
    """The ranked name without one `key=value` qualifier (its brackets dropped when nothing else is left)."""
    match = re.fullmatch(r"(?P<base>.*?) \[(?P<quals>.*)\]", name)
    if match is None:
        return name
    groups = [",".join(p for p in g.split(",") if p != qualifier) for g in match["quals"].split(", ")]
    groups = [g for g in groups if g]
    return f"{match['base']} [{', '.join(groups)}]" if groups else match["base"]


def check_fid_features(records: pd.DataFrame) -> None:
    """Refuse, in one line naming the runs and the fix, to rank records that mix FID feature definitions."""
    kinds = sorted(records["fid_features"].unique())
    if len(kinds) <= 1:
        return
    other = records[records["fid_features"] != FID_FEATURES] if FID_FEATURES in kinds else \
        records[records["fid_features"] != kinds[0]]
    runs = sorted(other["run_dir"].unique())
    shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
    counts = ", ".join(f"{k}: {int((records['fid_features'] == k).sum())} records" for k in kinds)
    raise ValueError(
        f"the sweep mixes FID feature definitions ({counts}); re-evaluate these runs with `{REEVALUATE}`: {shown}"
    )


#: Evaluation settings every ranked record must share (a sampler is an entry qualifier, a shift is in the setting).
UNIFORM_EVAL_FIELDS = ("n_samples", "eval_seed", "feature_extractor", "inception_extractor", "checkpoint")


def check_eval_settings(records: pd.DataFrame) -> None:
    """Refuse, in one line naming the setting, its values and the runs, to rank records evaluated differently.

    A run re-evaluated with another `eval.n_samples` (or seed, CLIP model, Inception weights, checkpoint) keeps its
    older records; the newest record per setting is ranked, so re-evaluating only some runs, or a re-evaluation
    interrupted half-way, would compare 200-sample FIDs with 100-sample ones (and Inception FIDs of two weights files
    would be ranked as one metric). A value swept on purpose (in the run tag, hence in the entry's name) is a
    comparison the user asked for and is not refused. Records without the field (written before it existed, or
    evaluated without Inception) are not checked.
    """
    for name in UNIFORM_EVAL_FIELDS:
        if name not in records.columns:
            continue
        key = CONFIG_KEYS[name]
        swept = records["tags"].map(lambda tags: any(str(k).startswith(key) for k in _tag_keys(tags))) \
            if "tags" in records.columns else pd.Series(False, index=records.index)
        part = records[~swept & records[name].notna()]
        values = part[name].astype(str)
        if values.nunique() <= 1:
            continue
        counts = values.value_counts()
        common = counts.index[0]
        runs = sorted(part.loc[values != common, "run_dir"].unique())
        shown = ", ".join(runs[:5]) + (f" and {len(runs) - 5} more" if len(runs) > 5 else "")
        listed = ", ".join(f"{v} ({n} records)" for v, n in counts.items())
        raise ValueError(
            f"the sweep mixes evaluation settings: {key} = {listed}; re-evaluate these runs with "
            f"`{REEVALUATE} {key}=...` so every run has the same: {shown}"
        )


#: Training settings that never make runs incomparable: the recipe (the entry's name), the training seed (seeds are
#: replicates of one entry) and the dataset (a control setting of its own).
ENTRY_KEYS = ("loss", "seed", "data.name")


def training_settings(run_dir: Path | str) -> dict[str, str] | None:
    """The settings a run was trained with, as dotted key -> JSON value, from its fingerprint.json (the keys that
    determine the trained model, src.config.fingerprint); None when it has none (a hand-made or very old run).

    Keys added to the fingerprint after a run was made read as the value every earlier run had (ADDED_KEYS). An
    embedded dataset's folders are compared by their own names (dataset, size and data version), not by the cache
    they lie in: two caches of the same data are the same training data.
    """
    try:
        fp = json.loads((Path(run_dir) / "fingerprint.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(fp, dict):
        return None
    fp = without_throughput_keys(fp)  # (data folders by their content: embedded ones' names, shards' meta.json)
    fp.pop("streams", None)  # the version of the random streams: other draws of one configuration, as seeds are
    # What trainer.precision=null resolved to on the training device: runs recorded before it was kept lack it, so
    # comparing it would refuse to rank a sweep extended since. (The job refuses to resume at another one.)
    fp.pop(TRAINED_PRECISION, None)
    for section, added in ADDED_KEYS.items():
        fp[section] = {**added, **fp[section]} if isinstance(fp.get(section), dict) else fp.get(section, dict(added))
    return _flatten(fp)


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return out


def _named_by(key: str, names: Iterable[str]) -> bool:
    """Whether a dotted setting is one of these keys or lies under one (`model` covers `model.depth`)."""
    return any(key == n or key.startswith(f"{n}.") for n in names)


def check_training_settings(records: pd.DataFrame, by_sweep: bool = False) -> None:
    """Refuse, in one line naming the setting, its values and the runs, to rank runs trained differently together.

    Runs are compared within each dataset (the control settings they share): every training setting of their
    fingerprint.json must agree, except the recipe, the training seed and the values swept on purpose (the run's
    tag, part of its entry's name: `-m optim.lr=1e-4,3e-4` ranks two entries). Backbone settings (model.*) are
    compared among runs of one backbone, which names its entries (`rf [DiT]`). A relaunch with another
    train.max_steps trains only the new recipes (the others' directories hold the older configuration), and two
    sweeps of different budgets pooled into one report would otherwise rank 9-step models against 8-step ones.
    With by_sweep every sweep's entries are their own, so runs are compared within each sweep. Runs without a
    fingerprint.json are not checked.
    """
    if records.empty:
        return
    columns = ["run_dir", "dataset", "tags", "sweep"]
    runs = records[[c for c in columns if c in records.columns]].drop_duplicates("run_dir")
    values: dict[tuple, dict[str, list[str]]] = {}  # (group, key) -> value -> runs
    for run in runs.itertuples(index=False):
        settings = training_settings(run.run_dir)
        if settings is None:
            continue
        swept = _tag_keys(getattr(run, "tags", None))
        group = (str(run.dataset), str(getattr(run, "sweep", "")) if by_sweep else "")
        for key, value in settings.items():
            if _named_by(key, ENTRY_KEYS) or _named_by(key, swept):
                continue
            where = (*group, str(settings.get("model._target_")) if key.startswith("model.") else "")
            values.setdefault((where, key), {}).setdefault(value, []).append(str(run.run_dir))
    differing = [(where, key, runs_by_value) for (where, key), runs_by_value in sorted(values.items())
                 if len(runs_by_value) > 1]
    if not differing:
        return
    where, key, runs_by_value = differing[0]
    ordered = sorted(runs_by_value.items(), key=lambda item: (-len(item[1]), item[0]))
    common = ordered[0][0]
    listed = ", ".join(f"{_shown(v)} ({len(r)} run{'s' * (len(r) != 1)})" for v, r in ordered)
    odd = sorted(r for v, rs in ordered[1:] for r in rs)
    shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
    others = sorted({k for _, k, _ in differing} - {key})
    also = f" (also differing: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''})" if others else ""
    involved = [r for rs in runs_by_value.values() for r in rs]
    sweeps = set(records.loc[records["run_dir"].isin(involved), "sweep"]) if "sweep" in records.columns else set()
    by_sweep_hint = ", or pass --by-sweep to rank each sweep's entries side by side" if len(sweeps) > 1 else ""
    raise ValueError(
        f"the runs ranked together were trained with different settings: {key} = {listed} on {where[0]}{also}; "
        "runs are ranked against each other only when trained alike (a value swept on purpose, in the run tag, "
        f"names its own entries): retrain these runs with {key}={_shown(common)} (delete their directories and "
        f"relaunch, or use another sweep_name){by_sweep_hint}: {shown}"
    )


def _shown(value: str) -> str:
    """A JSON value as a command line would give it (strings without their quotes)."""
    loaded = json.loads(value)
    return loaded if isinstance(loaded, str) else value


def _tag_keys(tags) -> list[str]:
    """The swept keys of a record's tags (a JSON object in the table, see _record_row)."""
    if isinstance(tags, str):
        tags = json.loads(tags) if tags else {}
    return list(tags) if isinstance(tags, dict) else []


def pool_seeds(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (entry, control setting): the seed-mean metrics, the number of seeds and their labels.

    'recipe' in the result is the entry. A seed whose metric is NaN (e.g. diverged samples) makes the mean NaN,
    which puts the entry in the last front of that setting: a recipe that sometimes diverges is not hidden.
    """
    if records.empty:
        return records.assign(recipe=records.get("entry"), n_seeds=pd.Series(dtype=int), seeds="")
    keys = ["entry", *SETTING_KEY]
    grouped = records.groupby(keys, sort=False)
    pooled = grouped[["steps", "cfg", "family", "shift", "n_samples", "sampler", "fid_features"]].first()
    for metric in METRICS:
        pooled[metric] = grouped[metric].agg(lambda s: float(np.mean(s.to_numpy(float))))
    pooled["n_seeds"] = grouped["train_seed"].nunique()
    pooled["seeds"] = grouped["train_seed"].agg(lambda s: ",".join(sorted(set(s), key=seed_order)))
    pooled = pooled.reset_index().rename(columns={"entry": "recipe"})
    return pooled


def seed_order(label: str):
    """Sort key of training-seed labels: numeric order when they are numbers (2 before 10)."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def seed_counts(records: pd.DataFrame) -> pd.DataFrame:
    """Per entry: 'seeds' (distinct training seeds) and 'seeds min' (fewest seeds in any of its settings)."""
    per_entry = records.groupby("entry")["train_seed"].nunique().rename("seeds")
    per_setting = records.groupby(["entry", *SETTING_KEY])["train_seed"].nunique().groupby("entry").min()
    return pd.concat([per_entry, per_setting.rename("seeds min")], axis=1)


def _read_overrides(run_dir: Path) -> str:
    """The job's Hydra overrides (.hydra/overrides.yaml) as one string, naming the recipe of a failed job."""
    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return ""
    return " ".join(map(str, overrides)) if isinstance(overrides, list) else ""


def _read_error(path: Path) -> str:
    """One-line summary of an error.json."""
    try:
        err = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable error.json: {exc}"
    if not isinstance(err, dict):
        return str(err).splitlines()[0] if str(err) else ""
    message = str(err.get("error", "")).strip().splitlines()
    kind = err.get("type", "")
    return f"{kind}: {message[0] if message else ''}".strip(": ")


def _record_row(rec: dict, run_dir: Path, results: Path, index: int) -> dict:
    """One results.json record as a flat table row, paths made absolute."""
    if not isinstance(rec, dict):
        raise ValueError(f"{results}: record {index} is a {type(rec).__name__}, expected an object")
    missing = [f for f in REQUIRED_FIELDS if f not in rec]
    if missing:
        raise ValueError(f"{results}: record {index} lacks required field(s) {', '.join(missing)}")
    # A null name would be dropped unsaid by the grouping per setting (or ranked as a recipe called None).
    for key in ("recipe", "dataset", "setting"):
        if not isinstance(rec[key], str) or not rec[key]:
            raise ValueError(f"{results}: record {index} has {key}={rec[key]!r}; expected a non-empty string")
    rec = upgrade(rec)  # legacy records get today's fields
    for key, kind in FIELD_KINDS.items():
        value = rec.get(key)
        if key == "sampler" and isinstance(value, dict):  # a mapping with the sampler's name (_sampler_name)
            value = value.get("name", value)
        if not _of_kind(value, kind) and (value is not None or key in NOT_NULL):
            raise ValueError(f"{results}: record {index} has {key}={rec.get(key)!r}; expected {kind}"
                             + ("" if key in NOT_NULL else " or null"))
    row = {f: rec[f] for f in REQUIRED_FIELDS}
    row.update({f: rec.get(f) for f in OPTIONAL_FIELDS})
    # The entry the record is ranked as, from its fields: recipe qualified by backbone, tags and sampler.
    row["recipe"] = entry_name(rec, drop=())
    row["run_dir"] = str(run_dir)
    # A hand-edited or foreign record's wrong type is named, not read as another setting ("false" is truthy).
    if isinstance(row["ema"], str) or row["ema"] not in (True, False):
        raise ValueError(f"{results}: record {index} has ema={row['ema']!r}; expected true or false")
    row["ema"] = bool(row["ema"])
    for key, kind in (("steps", int), ("cfg", float), *((m, float) for m in METRICS)):
        try:
            if isinstance(row[key], (bool, str)):  # true or "0.3": a number no writer stores
                raise TypeError
            row[key] = math.nan if key in METRICS and row[key] is None else kind(row[key])
        except (TypeError, ValueError):
            raise ValueError(f"{results}: record {index} has {key}={row[key]!r}; expected a number"
                             + (" or null" if key in METRICS else "")) from None
    for metric in METRICS:
        # Non-finite as null, as the writer stores it (Record.to_dict): an inf FID (JSON Infinity) of a diverged run
        # would otherwise dominate on its CLIP score instead of going to the last front.
        row[metric] = row[metric] if math.isfinite(row[metric]) else math.nan
    for key in ("params", "tags"):  # hashable in the table
        row[key] = json.dumps(row[key], sort_keys=True) if row[key] is not None else None
    for key in ("arrays", "reference_arrays"):
        row[key] = resolve_path(row[key], run_dir) if row[key] else None
    row["base_entry"], seed = split_seed(str(row["recipe"]))
    config = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    if seed is None and config.get("seed") is not None:  # a run outside a seed sweep: its configured seed
        seed = str(config["seed"])
    row["train_seed"] = "" if seed is None else str(seed)
    row["sampler"] = _sampler_name(rec.get("sampler"))
    row["fid_features"] = str(rec.get("fid_features") or LEGACY_FID_FEATURES)
    return row


def _of_kind(value, kind: str) -> bool:
    """Whether a JSON value is of a FIELD_KINDS kind (true and false are no numbers, "3" is no integer)."""
    if kind == "a string":
        return isinstance(value, str)
    if kind == "an object":
        return isinstance(value, dict)
    number = (int, float) if kind == "a number" else int
    return isinstance(value, number) and not isinstance(value, bool)


def resolve_path(path: str, run_dir: Path) -> str:
    """An absolute path for a results path: absolute as is, else relative to the run dir, else to the cwd."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    in_run = run_dir / p
    if in_run.exists() or not p.exists():
        return str(in_run.resolve())
    return str(p.resolve())


def _drop_duplicates(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep one record per (recipe, control setting): one its run's latest launch asked for (`_wanted`: e.g. the
    default eval.n_samples again after a relaunch with more), else the newest (a rerun job); return the dropped."""
    wanted = records["_wanted"] if "_wanted" in records.columns else pd.Series(True, index=records.index)
    records = records.drop(columns=["_wanted"], errors="ignore")
    if records.empty:
        return records.reset_index(drop=True), records.copy()
    order = records.assign(_w=wanted.fillna(True).astype(bool).to_numpy(),
                           _created=records["created"].fillna("").astype(str), _pos=np.arange(len(records)))
    order = order.sort_values(["_w", "_created", "_pos"], kind="stable")
    keep = ~order.duplicated(RECORD_KEY, keep="last")
    helpers = ["_w", "_created", "_pos"]
    kept = order[keep].sort_values("_pos").drop(columns=helpers).reset_index(drop=True)
    dropped = order[~keep].sort_values("_pos").drop(columns=helpers).reset_index(drop=True)
    return kept, dropped


# ---------------------------------------------------------------------------------------------- settings


def control_settings(records: pd.DataFrame) -> pd.DataFrame:
    """The control settings present, one row each (dataset, setting, ema, steps, cfg), in a stable order."""
    cols = [*SETTING_KEY, "steps", "cfg"]
    settings = records[cols].drop_duplicates(SETTING_KEY)
    order = ["dataset", "steps", "cfg", "setting", "ema"]
    settings = settings.sort_values(order, ascending=[True, True, True, True, False])  # EMA before raw
    return settings.reset_index(drop=True)


def setting_label(dataset: str, setting: str, ema: bool) -> str:
    """Human-readable name of a control setting."""
    return f"{dataset}, {setting}, {'EMA' if ema else 'raw'}"


def fifty_step_scales(records: pd.DataFrame, fifty_step_cfg: Sequence[float] | str | None = None) -> list[float] | None:
    """The CFG scales of the 50-step column: None for all, else a list.

    Default (None): CFG 5.0 when the sweep has 50-step settings at that scale, else all 50-step settings. The
    paper's 50-step averages are multiples of 0.25, i.e. four settings: one CFG scale x EMA/raw x two datasets;
    its 5-step column is at CFG 5.0, so 50 steps at CFG 5.0 is the matching choice. "all": every 50-step setting.
    """
    if isinstance(fifty_step_cfg, str):
        if fifty_step_cfg != "all":
            raise ValueError(f"--fifty-step-cfg {fifty_step_cfg!r}: give CFG scale(s) or 'all'")
        return None
    if fifty_step_cfg is None:
        fifty = records.loc[records["steps"] == 50, "cfg"].to_numpy(float)
        return [DEFAULT_FIFTY_STEP_CFG] if np.isclose(fifty, DEFAULT_FIFTY_STEP_CFG).any() else None
    return list(fifty_step_cfg)


def setting_groups(records: pd.DataFrame, fifty_step_cfg: Sequence[float] | str | None = None,
                   scope: str = "the sweep") -> dict[str, pd.Series]:
    """Row masks of the column groups: all settings, the 5-step ones, the 50-step ones (see fifty_step_scales);
    scope: what the records are, as an absent scale's error says it."""
    fifty = records["steps"] == 50
    scales = fifty_step_scales(records, fifty_step_cfg)
    if scales is not None:
        cfgs = [float(c) for c in scales]
        if not cfgs or not all(math.isfinite(c) for c in cfgs):
            raise ValueError(f"--fifty-step-cfg {' '.join(map(str, scales))}: give one or more finite CFG scales")
        present = sorted(records.loc[fifty, "cfg"].unique().tolist())
        absent = [c for c in cfgs if not np.isclose(present, c).any()]
        if absent:
            raise ValueError(
                f"--fifty-step-cfg {' '.join(map(str, cfgs))}: no 50-step setting has CFG scale "
                f"{', '.join(map(str, absent))}; {scope} has {', '.join(map(str, present)) or 'none'}"
            )
        fifty = fifty & np.isclose(records["cfg"].to_numpy()[:, None], cfgs).any(axis=1)
    return {"all": pd.Series(True, index=records.index), "5 steps": records["steps"] == 5, "50 steps": fifty}


def describe_fifty_step(records: pd.DataFrame, fifty_step_cfg: Sequence[float] | str | None) -> str:
    """One sentence stating which settings the 50-step column averages and why."""
    present = sorted(records.loc[records["steps"] == 50, "cfg"].unique().tolist())
    scales = fifty_step_scales(records, fifty_step_cfg)
    chosen = present if scales is None else sorted(float(c) for c in scales)
    if not present:
        return "50 steps column: the sweep has no 50-step settings."
    text = ", ".join(_cfg(c) for c in chosen)
    if fifty_step_cfg is None and scales is not None:
        how = ("the default: the paper's 50-step averages are multiples of 0.25, i.e. four settings (one CFG scale x "
               "EMA/raw x two datasets), and its 5-step column is at CFG 5.0, so 50 steps at CFG 5.0 matches it; "
               "--fifty-step-cfg chooses others")
    elif fifty_step_cfg is None:
        how = f"all 50-step settings (default when the sweep has none at CFG {_cfg(DEFAULT_FIFTY_STEP_CFG)})"
    elif scales is None:
        how = "all 50-step settings (--fifty-step-cfg all)"
    else:
        how = "chosen with --fifty-step-cfg"
    return f"50 steps column: the 50-step settings at CFG {text}, {how}."


def _cfg(c: float) -> str:
    return f"{c:.1f}" if round(c, 1) == c else f"{c:g}"


def describe_column(records: pd.DataFrame, mask) -> str:
    """Which control settings a column averages, e.g. '4 settings: digits, shapes x 50 steps, cfg 5.0 x EMA, raw'."""
    part = records[np.asarray(mask, bool)].drop_duplicates(SETTING_KEY)
    if part.empty:
        return "no settings"
    datasets = sorted(part["dataset"].unique())
    samplers = part.sort_values(["steps", "cfg"]).drop_duplicates("setting")["setting"].tolist()
    emas = [e for e in (True, False) if e in set(part["ema"])]
    n = len(part)
    if n == len(datasets) * len(samplers) * len(emas):  # the full product: say it as one
        return (f"{n} setting{'s' * (n != 1)}: {', '.join(datasets)} x {'; '.join(samplers)} x "
                f"{', '.join('EMA' if e else 'raw' for e in emas)}")
    labels = [setting_label(*k) for k in part[SETTING_KEY].itertuples(index=False, name=None)]
    return f"{n} settings: " + "; ".join(labels)


# ---------------------------------------------------------------------------------------------- ranking


def fronts_per_setting(records: pd.DataFrame, clip=None, fid=None) -> np.ndarray:
    """Front index of every record within its control setting; clip / fid may be (B, rows) bootstrap draws."""
    clip = records["clip_score"].to_numpy(float) if clip is None else np.asarray(clip, float)
    fid = records["fid_clip"].to_numpy(float) if fid is None else np.asarray(fid, float)
    single = clip.ndim == 1
    clip, fid = np.atleast_2d(clip), np.atleast_2d(fid)
    fronts = np.zeros(clip.shape, dtype=np.int64)
    maximize = [up for _, up in OBJECTIVES]
    for rows in records.groupby(SETTING_KEY, sort=False).indices.values():
        for b in range(clip.shape[0]):
            points = np.column_stack([clip[b, rows], fid[b, rows]])
            # A record whose metrics are NaN (e.g. diverged samples) goes to the last front of its setting.
            fronts[b, rows] = non_dominated_ranks(points, maximize, nan_policy="last")
    return fronts[0] if single else fronts


def rank_table(records: pd.DataFrame) -> pd.DataFrame:
    """The records with their front index ('front') within each control setting."""
    return records.assign(front=fronts_per_setting(records))


def column_indicators(
    records: pd.DataFrame, groups: dict[str, pd.Series], recipes: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per column a (rows, recipes) 0/1 integer matrix: row r counts towards recipe j's average in that column."""
    recipe_pos = {r: i for i, r in enumerate(recipes)}
    cols = records["recipe"].map(recipe_pos).to_numpy()
    indicators = {}
    for name, mask in groups.items():
        w = np.zeros((len(records), len(recipes)), dtype=np.int64)
        rows = np.flatnonzero(np.asarray(mask))
        w[rows, cols[rows]] = 1
        indicators[name] = w
    return indicators


def average_ranks(ranked: pd.DataFrame, groups: dict[str, pd.Series]) -> pd.DataFrame:
    """Mean front per recipe over each column's control settings, with the number of settings covered ('n <column>')
    and the share of those settings in which it is on the first front ('P(front 1) <column>')."""
    recipes = sorted(ranked["recipe"].unique())
    indicators = column_indicators(ranked, groups, recipes)
    fronts = ranked["front"].to_numpy(np.int64)
    table = pd.DataFrame(index=pd.Index(recipes, name="recipe"))
    for name in COLUMNS:
        table[name] = mean_over_settings(fronts, indicators[name])
        table[f"n {name}"] = indicators[name].sum(axis=0)
    for name in COLUMNS:
        table[f"P(front 1) {name}"] = mean_over_settings(fronts == 1, indicators[name])
    return table.sort_values(["all", "recipe"], na_position="last")


def mean_over_settings(values: np.ndarray, indicator: np.ndarray) -> np.ndarray:
    """Per recipe the mean of integer values (fronts, or first-front flags) over its settings, exactly.

    values (rows,) or (B, rows); indicator (rows, recipes) 0/1. The sum of integers is exact, and one division of
    two integers gives the float nearest the true mean: 2.5, never 2.4999999999999996. NaN for recipes with no
    settings.
    """
    sums = np.asarray(values).astype(np.int64) @ indicator
    counts = indicator.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = sums / counts
    out[..., counts == 0] = np.nan
    return out


def missing_settings(records: pd.DataFrame) -> dict[str, list[str]]:
    """For each recipe lacking some control setting of the sweep, the labels of the settings it lacks."""
    settings = control_settings(records)
    all_keys = list(settings[SETTING_KEY].itertuples(index=False, name=None))
    have = records.groupby("recipe")[SETTING_KEY].apply(lambda g: set(g.itertuples(index=False, name=None)))
    missing = {}
    for recipe in sorted(have.index):
        lacks = [setting_label(*key) for key in all_keys if key not in have[recipe]]
        if lacks:
            missing[recipe] = lacks
    return missing
