"""The results of a run: one record per evaluated setting, its identity, results.json, and when a run is complete.

Torch-free on purpose (no torch, no Lightning): the ranking, the planner and the report import it.

A record holds every setting that changes a number (the recipe and the run's swept values, the training seed, the
sampler setting, EMA, sampler, number of samples, initial-noise seed, feature extractor, FID feature definition and
the checkpoint chosen) next to the numbers. Its identity is the tuple of those settings. One rule decides
completeness for the training job, the evaluation, the planner and the report: a run is complete when every record
its configuration wants (`wanted_records`) exists with exactly those settings (`missing_records` is empty).
Records of other settings stay in results.json, kept apart by their identity; `select_current` picks the wanted
ones. The name a record is ranked under is built at ranking time from its fields (`entry_name`).

results.json is a JSON list of records, written atomically (temp file, rename) under a lock file, so readers never
see a partial file and concurrent writers in one run directory do not lose records.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from src.utils.io import atomic_write_json, file_lock, file_version, read_json_store, update_json_store

RESULTS_FILE = "results.json"
#: The FID feature definition of new records: raw (un-normalised) CLIP image embeddings, as the paper computes it.
FID_FEATURES = "clip_raw"
#: What records written before the field existed used: L2-normalised CLIP image embeddings.
LEGACY_FID_FEATURES = "clip_l2norm"
#: The sampler of records written before the field existed, and of configurations without a `sampler` group.
DEFAULT_SAMPLER = "rf_time"
#: The study's backbone; any other is named in the ranked entry (the backbone comparison).
DEFAULT_BACKBONE = "MMDiT"
CHECKPOINTS = ("best", "last")

#: The settings that make a record: two records with the same values are the same result (its identity).
IDENTITY_FIELDS = (
    "recipe", "family", "params", "dataset", "tags", "train_seed", "backbone",
    "setting", "steps", "cfg", "shift", "ema", "sampler",
    "n_samples", "eval_seed", "feature_extractor", "fid_features", "checkpoint",
)
METRIC_FIELDS = ("clip_score", "fid_clip", "fid_inception")
#: The fields without which a stored record is no record (every schema had them; the rank report needs them).
RECORD_REQUIRED = ("recipe", "dataset", "setting", "steps", "cfg", "ema", "clip_score", "fid_clip")
#: Which configuration key sets each evaluation setting (for the one-line "results for ... missing" message).
CONFIG_KEYS = {
    "setting": "eval.settings", "steps": "eval.settings", "cfg": "eval.settings", "shift": "eval.shift",
    "ema": "eval.ema", "sampler": "sampler", "n_samples": "eval.n_samples", "eval_seed": "eval.seed",
    "feature_extractor": "eval.clip", "fid_features": "fid_features", "checkpoint": "eval.checkpoint",
    "inception_extractor": "eval.inception", "sampler_code": "the sampler's code",
    "decoder": "the autoencoder (eval.autoencoder_path)",
}


@dataclass
class Record:
    """One evaluation result: a run's checkpoint sampled at one setting, with or without EMA weights."""

    recipe: str  # the formulation's name, e.g. "rf/lognorm(0.00, 1.00)" (not qualified: see entry_name)
    family: str
    params: dict[str, float]
    dataset: str
    tags: dict[str, Any]  # the job's swept values outside the run name (its run_tag), e.g. {"optim.lr": 0.0001}
    train_seed: int | None  # cfg.seed: initialisation and data order of the training
    backbone: str  # class name of the backbone, e.g. "MMDiT", "DiT"
    setting: str  # setting_label(steps, cfg, shift), e.g. "50 steps, cfg 5.0"
    steps: int
    cfg: float
    shift: float
    ema: bool
    sampler: str  # the sampler's name (cfg.sampler.name), "rf_time" by default
    n_samples: int
    eval_seed: int  # initial-noise seed (common random numbers)
    feature_extractor: str | None  # CLIP model and its weights' content: "tiny_clip:<sha256[:12]>", "ViT-L-14:<sha...>"
    fid_features: str  # the FID feature definition: "clip_raw" (raw image embeddings) or legacy "clip_l2norm"
    checkpoint: str  # "best" (lowest EMA validation loss, else last) or "last"
    checkpoint_step: int | None
    clip_score: float | None  # mean raw cosine (src/metrics/clip.py)
    fid_clip: float | None  # Frechet distance on CLIP image features (fid_features says which)
    fid_inception: float | None  # torch-fidelity Inception pool features; None when not computed
    n_reference: int  # evaluation images behind the reference statistics
    arrays: str  # npz relative to the run dir: clip_scores (n,), features (n, d), prompts (n,) [, inception_features]
    reference_arrays: str  # npz with the evaluation images' features (m, d); relative to the run dir or absolute
    # The Inception weights behind fid_inception, "inception-v3-2048:<sha256[:12]>"; None without (and in records
    # written before the field: their Inception FID cannot say which weights it measured).
    inception_extractor: str | None = None
    # The content of a sampler from outside the repository, "ab2.py:<sha256[:12]>" (a record of an edited sampler's
    # code is not a current result); None for the built-in samplers and in records written before the field.
    sampler_code: str | None = None
    # What decoded latent samples to pixels, by content: "AutoencoderKL:<name>:<sha256[:12]>"
    # (src.evaluation.decoding.decoder_name); None for pixel-space data and in records written before the field.
    decoder: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite metrics become null."""
        return _finite_or_null(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        """Rebuild a record (a legacy one gets its defaults, see upgrade); a missing field is an error naming it."""
        d = upgrade(d)
        names = [f.name for f in fields(cls)]
        optional = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
        missing = [n for n in names if n not in d and n not in optional]
        if missing:
            raise ValueError(f"results record lacks field(s) {', '.join(missing)}; has {', '.join(sorted(d))}")
        return cls(**{n: d[n] for n in names if n in d})


FIELDS = tuple(f.name for f in fields(Record))


# ---- names and tags ----------------------------------------------------------------------------------------
def _num(x: float) -> str:
    """At least one decimal (5.0, 2.5), more only where needed (7.25)."""
    return f"{x:.1f}" if round(x, 1) == x else f"{x:g}"


def setting_label(steps: int, cfg: float, shift: float = 1.0) -> str:
    """e.g. "50 steps, cfg 5.0" (", shift 3.0" appended when shifted)."""
    text = f"{int(steps)} steps, cfg {_num(float(cfg))}"
    return text if float(shift) == 1.0 else f"{text}, shift {_num(float(shift))}"


def _value(text: str) -> Any:
    """A tag value as the number it spells (1, 0.0001, true) or the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _as_swept(text: str) -> str:
    """A string tag value as run tags show it: run tags written before strings were shown as themselves hold the
    sweeper's text, quoted ('a b', quotes kept) or escaped for Hydra's parser (ab2\\:AB2, a\\ b)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return re.sub(r"\\(['\"])", r"\1", text[1:-1])
    return re.sub(r"\\([\\()\[\]{}:=, \t])", r"\1", text)  # only what Hydra escapes


def same_tags(tags: Mapping[str, Any]) -> dict[str, Any]:
    """Tags as today's run tags give them, for tags stored from an older run tag (_as_swept)."""
    return {k: _value(_as_swept(v)) if isinstance(v, str) else v for k, v in tags.items()}


def parse_run_tag(run_tag: str | None) -> dict[str, Any]:
    """The swept values of a run_tag: "/optim.lr=0.0001,seed=1" -> {"optim.lr": 0.0001, "seed": 1}.

    The tagging sweeper (src/launch/sweeper.py) writes "/k1=v1,k2=v2"; "/" between items is read too. A piece
    without "=" belongs to the previous value (a value holding a comma)."""
    tags: dict[str, Any] = {}
    last = None
    for piece in str(run_tag or "").replace("/", ",").split(","):
        if "=" in piece:
            last, text = piece.split("=", 1)
            tags[last.strip()] = text.strip()
        elif last is not None and piece:
            tags[last] += "," + piece
    return {k: _value(_as_swept(v)) for k, v in tags.items()}


def _show(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def entry_name(record: Mapping[str, Any], drop: Sequence[str] = ("seed",)) -> str:
    """The name a record is ranked under: its recipe qualified by a backbone other than MMDiT, its tags (minus
    `drop`; the training seed by default, so seeds pool as replicates) and a sampler other than the default.

    e.g. "rf/lognorm(0.00, 1.00)", "rf [optim.lr=0.0001]", "rf [DiT]", "eps/linear [sampler=native]".
    """
    rec = upgrade(record)
    tags = {k: v for k, v in same_tags(rec["tags"]).items() if k not in drop}
    qualifiers = []
    if rec["backbone"] != DEFAULT_BACKBONE and "model" not in tags:  # a swept model names the backbone already
        qualifiers.append(rec["backbone"])
    qualifiers += [f"{k}={_show(v)}" for k, v in tags.items()]
    if rec["sampler"] != DEFAULT_SAMPLER and not {"sampler", "sampler.name"} & set(rec["tags"]):  # swept: named
        qualifiers.append(f"sampler={rec['sampler']}")
    return f"{rec['recipe']} [{', '.join(qualifiers)}]" if qualifiers else rec["recipe"]


# ---- legacy records ----------------------------------------------------------------------------------------
def _split_legacy_name(recipe: str) -> tuple[str, str | None, dict[str, Any]]:
    """A legacy recipe field "rf [DiT, optim.lr=0.0001]" -> ("rf", "DiT", {"optim.lr": 0.0001})."""
    if not (recipe.endswith("]") and " [" in recipe):
        return recipe, None, {}
    base, inside = recipe[:-1].rsplit(" [", 1)
    backbone, tags = None, {}
    for part in inside.split(", "):
        if "=" in part:
            tags.update(parse_run_tag(part))
        else:
            backbone = part
    return base, backbone, tags


def upgrade(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with every field of today's schema: legacy records (before tags, sampler, ...) get defaults.

    Legacy records named their ranked entry in `recipe` ("rf [optim.lr=0.0001]"); the name is split into the
    recipe, the backbone and the tags. Defaults: train_seed from the stored config, sampler "rf_time", eval_seed
    from `seed`, fid_features "clip_l2norm" (what the metric computed then), checkpoint "best", feature_extractor
    None (not recorded: such a record never matches a wanted one, so it is recomputed, not trusted).
    """
    d = dict(record)
    if "tags" in d and "backbone" in d:
        return d
    config = d.get("config") if isinstance(d.get("config"), Mapping) else {}
    recipe, backbone, tags = _split_legacy_name(str(d.get("recipe", "")))
    if "recipe" in d:
        d["recipe"] = recipe
    if "run_tag" in config:
        tags = parse_run_tag(config.get("run_tag"))
    target = (config.get("model") or {}).get("_target_") if isinstance(config.get("model"), Mapping) else None
    d.setdefault("tags", tags)
    d.setdefault("backbone", str(target).rsplit(".", 1)[-1] if target else backbone or DEFAULT_BACKBONE)
    d.setdefault("train_seed", config.get("seed"))
    d.setdefault("sampler", DEFAULT_SAMPLER)
    if "eval_seed" not in d and "seed" in d:
        d["eval_seed"] = d.pop("seed")
    d.setdefault("fid_features", LEGACY_FID_FEATURES)
    d.setdefault("feature_extractor", None)
    d.setdefault("checkpoint", "best")
    d.setdefault("inception_extractor", None)
    d.setdefault("sampler_code", None)
    d.setdefault("decoder", None)
    return d


# ---- identity ------------------------------------------------------------------------------------------------
def _canonical(name: str, value: Any) -> Any:
    if name == "tags" and isinstance(value, Mapping):  # an older run tag's 'a b' is today's a b
        value = same_tags(value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if name == "ema":
        return bool(value)
    if name in ("cfg", "shift") and value is not None:
        return float(value)
    if name in ("steps", "n_samples", "eval_seed", "train_seed") and value is not None and not isinstance(value, bool):
        return int(value)
    return value


def record_identity(record: Mapping[str, Any] | Record) -> tuple:
    """The settings of a record (IDENTITY_FIELDS, in that order), comparable and hashable; not its numbers."""
    d = upgrade(record.to_dict() if isinstance(record, Record) else record)
    return tuple(_canonical(k, d.get(k)) for k in IDENTITY_FIELDS)


# ---- results.json ------------------------------------------------------------------------------------------
# What to do about a damaged results.json (written atomically by this project, so damaged by something else).
REDO = "delete it and rerun the command to evaluate the run again (its training is kept)"


def results_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RESULTS_FILE


def read_results(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run directory as stored ([] when it has no results.json); see upgrade for legacy ones."""
    path = results_path(run_dir)
    if not path.is_file():
        if os.path.lexists(path):  # a folder, a dangling link: written over, or evaluated into, it would be lost
            kind = "a folder" if path.is_dir() else "a link to nothing" if path.is_symlink() else "not a regular file"
            raise ValueError(f"{path}: {kind}, not a results file; move it away and rerun the command to evaluate "
                             "the run again (its training is kept)")
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); {REDO}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of record objects; {REDO}")
    for i, r in enumerate(data):  # else kept and added to, and the rank report refuses the file later
        lacking = [k for k in RECORD_REQUIRED if k not in r]
        if lacking:
            raise ValueError(f"{path}: record {i} lacks required field(s) {', '.join(lacking)}; {REDO}")
    return data


def write_results(run_dir: str | os.PathLike, records: Iterable[Mapping[str, Any] | Record]) -> Path:
    """Replace results.json atomically with these records (non-finite metrics as null, as Record.to_dict)."""
    rows = [r.to_dict() if isinstance(r, Record) else _finite_or_null(dict(r)) for r in records]
    return atomic_write_json(results_path(run_dir), rows)


def _finite_or_null(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its non-finite metrics set to null: strict JSON has no NaN or Infinity (an older writer's, or
    another tool's, which json reads) and the strict writer refuses them, so a merge into such a file failed."""
    for k in METRIC_FIELDS:
        value = record.get(k)
        if isinstance(value, float) and not math.isfinite(value):
            record[k] = None
    return record


def merge_results(run_dir: str | os.PathLike, new: Iterable[Mapping[str, Any] | Record]) -> list[dict[str, Any]]:
    """Add records to results.json, replacing those with the same identity (records of other settings stay, and
    so do those of another checkpoint step: a run trained longer keeps its earlier step's results, which of_step
    tells apart); atomic and locked. Returns all records."""
    run_dir = Path(run_dir)
    rows = [r.to_dict() if isinstance(r, Record) else dict(r) for r in new]
    with file_lock(run_dir / f".{RESULTS_FILE}.lock"):
        records = read_results(run_dir)
        replaced = {(record_identity(r), r.get("checkpoint_step")) for r in rows}
        records = [_finite_or_null(r) for r in records if not _replaced_by(r, replaced)] + rows
        write_results(run_dir, records)
    return records


def _replaced_by(record: Mapping[str, Any], replaced: set[tuple]) -> bool:
    """Whether a new record of the same identity and checkpoint step (either unknown: the same) replaces record."""
    identity, step = record_identity(record), record.get("checkpoint_step")
    return any(identity == i and None in (step, s) or (identity, step) == (i, s) for i, s in replaced)


def find_record(records: Iterable[Mapping[str, Any]], identity: tuple) -> dict[str, Any] | None:
    """The record with this identity (record_identity), or None (the last one if several)."""
    found = None
    for r in records:
        if record_identity(r) == identity:
            found = dict(r)
    return found


# ---- what a configuration wants, and the completeness rule -----------------------------------------------------
def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg[key] for a dotted key of a DictConfig or nested mapping, default when absent or None."""
    node = cfg
    for part in key.split("."):
        try:
            node = node[part] if isinstance(node, Mapping) or hasattr(node, "__getitem__") else getattr(node, part)
        except (KeyError, AttributeError, TypeError, IndexError):
            return default
        if node is None:
            return default
    return node


def run_fields(cfg: Any) -> dict[str, Any]:
    """The fields every record of a run shares, from its configuration (recipe fields excepted)."""
    target = str(_get(cfg, "model._target_", DEFAULT_BACKBONE))
    return {
        "dataset": str(_get(cfg, "data.name")),
        "tags": parse_run_tag(_get(cfg, "run_tag", "")),
        "train_seed": _get(cfg, "seed"),
        "backbone": target.rsplit(".", 1)[-1],
    }


def wanted_records(cfg: Any, recipe: Mapping[str, Any], feature_extractor: str,
                   inception_extractor: str | None = None, sampler_code: str | None = None,
                   decoder: str | None = None) -> list[dict[str, Any]]:
    """The identity fields of every record the configuration asks for: sampler settings x EMA, each with the
    configured sampler, n_samples, eval seed, shift, feature extractor, FID features and checkpoint (and the
    Inception extractor, which a stored record must match when one is configured, see missing_records).

    recipe: {"recipe": name, "family": ..., "params": {...}} of the run's formulation; feature_extractor,
    inception_extractor, decoder: their names (src.evaluation.run.feature_extractor_name, inception_extractor_name,
    src.evaluation.decoding.decoder_name)."""
    ev = _get(cfg, "eval")
    shift = float(_get(ev, "shift", 1.0))
    common = {
        "recipe": recipe["recipe"], "family": recipe["family"], "params": dict(recipe["params"]),
        **run_fields(cfg),
        "shift": shift, "sampler": str(_get(cfg, "sampler.name", DEFAULT_SAMPLER)),
        "n_samples": int(ev["n_samples"]), "eval_seed": int(ev["seed"]),
        "feature_extractor": feature_extractor, "fid_features": FID_FEATURES,
        "checkpoint": str(_get(ev, "checkpoint", "best")), "inception_extractor": inception_extractor,
        "sampler_code": sampler_code, "decoder": decoder,
    }
    return [
        {**common, "setting": setting_label(s["steps"], s["cfg"], shift), "steps": int(s["steps"]),
         "cfg": float(s["cfg"]), "ema": bool(ema)}
        for s in ev["settings"] for ema in ev["ema"]
    ]


def _usable(record: Mapping[str, Any], run_dir: Path | None, need_inception: bool,
            readable: Callable[[Path], bool] | None = None) -> bool:
    """A record counts when it has what is configured and its arrays are on disk and read whole (the report reads
    them); readable(path) says whether they do (default: _readable_npz, every time)."""
    if need_inception and not _has_inception(record):
        return False
    readable = readable or _readable_npz
    return run_dir is None or bool(record.get("arrays") and readable(Path(run_dir) / record["arrays"]))


def _readable_npz(path: Path) -> bool:
    """The file is there and reads whole: its zip directory (a truncated file fails there) and every array's CRC (a
    file damaged inside, e.g. overwritten in part, keeps its directory but fails the report's bootstrap)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist()) and z.testzip() is None
    except Exception:  # noqa: BLE001 -- zipfile and zlib raise many kinds for a damaged member: all mean unreadable
        return False


#: Where the completeness check remembers the arrays files it has read whole, under paths.cache_dir.
VERIFIED_ARRAYS_FILE = "verified_arrays.json"
#: A file changed this recently when it was read is read again next time: a rewrite within the file system's
#: timestamp granularity (a clock tick, up to 2 s on some) could leave its size, mtime and ctime as they were.
SETTLED_NS = 3_000_000_000
_VERIFIED: set[tuple] = set()  # file versions (resolved path, size, mtime_ns, ctime_ns) read whole in this process
_STORES: dict[str, dict] = {}  # each VERIFIED_ARRAYS_FILE's entries as this process read or wrote them


class VerifiedArrays:
    """_readable_npz once per file version: reading every array's CRC reads every byte (about 23 GB for the paper's
    grid), at every plan, report and job. A version (resolved path, size, mtime_ns, ctime_ns, as
    src.utils.io.weights_sha256 keys its checksums) read whole is remembered in this process and, with cache_dir, in
    cache_dir/verified_arrays.json, so that a later command reads it only when it changed (rewritten, damaged in
    place, replaced). Only the cache folder is written, never a run directory: the plan and the report read runs
    they do not own. Unreadable files are not remembered (checked again each time, and rare)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.store = Path(cache_dir) / VERIFIED_ARRAYS_FILE if cache_dir is not None else None
        self.found: dict[str, dict[str, int]] = {}  # verified here, for save()

    def _stored(self) -> dict:
        key = str(self.store)
        if key not in _STORES:  # read once per process: entries other processes add later only cost a read
            _STORES[key] = read_json_store(self.store)
        return _STORES[key]

    def __call__(self, path: Path) -> bool:
        try:
            version = file_version(Path(path).resolve())
        except OSError:
            return False
        if version in _VERIFIED:
            return True
        stamp = dict(zip(("size", "mtime_ns", "ctime_ns"), version[1:]))
        if self.store is not None and self._stored().get(version[0]) == stamp:
            _VERIFIED.add(version)
            return True
        if not _readable_npz(path):
            return False
        try:  # written to while read, or too recently to tell a rewrite apart: verified now, not remembered
            settled = file_version(Path(version[0])) == version and time.time_ns() - max(version[2:]) >= SETTLED_NS
        except OSError:
            settled = False
        if settled:
            _VERIFIED.add(version)
            self.found[version[0]] = stamp
        return True

    def save(self) -> None:
        """Add the versions verified since the last save to the cache file (one write per completeness check)."""
        if self.store is not None and self.found:
            data = update_json_store(self.store, self.found)
            if data is not None:
                _STORES[str(self.store)] = data
            self.found = {}


def _same_inception(record: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Where the wanted record names Inception weights, the stored one's Inception FID is of those weights."""
    name = wanted.get("inception_extractor")
    return name is None or (_has_inception(record) and record.get("inception_extractor") == name)


def _has_inception(record: Mapping[str, Any]) -> bool:
    """An Inception FID was computed: a number, or null beside a null CLIP FID where its extractor is named (samples
    that diverged: every metric is null, and sampling them again gives the same)."""
    return record.get("fid_inception") is not None or (
        record.get("inception_extractor") is not None and record.get("fid_clip") is None)


def _same_sampler_code(record: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """A sampler from outside: the stored record was sampled by its code as it is now ("unknown" where its module
    cannot be found, e.g. a report read on another machine: then any stored record counts)."""
    code = wanted.get("sampler_code")
    return code in (None, "unknown") or record.get("sampler_code") == code


def _same_decoder(record: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Latent samples were decoded by the autoencoder the wanted record names (None: pixel space; "unknown": the
    shards or the autoencoder are not on this machine, e.g. a report read off the cluster: then any record counts).
    A latent-space record without the field is not trusted: it is evaluated again, as one without a CLIP name."""
    name = wanted.get("decoder")
    return name in (None, "unknown") or record.get("decoder") == name


def missing_records(records: Iterable[Mapping[str, Any]], wanted: Iterable[Mapping[str, Any]],
                    run_dir: str | os.PathLike | None = None, need_inception: bool = False,
                    cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """THE completeness rule: the wanted records that no stored record matches with exactly those settings
    (same identity, its arrays present in run_dir when given and read whole, an Inception FID when one is
    configured, of the Inception weights the wanted record names, sampled by the sampler code and decoded by the
    autoencoder it names). A run is complete when this is empty.

    The Inception extractor is not part of the identity: a record evaluated again with other Inception weights
    replaces the one before (its CLIP numbers are the same), and turning Inception off keeps records complete.
    Arrays are read once per file version (VerifiedArrays; remembered under cache_dir, the configuration's
    paths.cache_dir, when given), and only those of records of wanted settings."""
    run_dir = Path(run_dir) if run_dir is not None else None
    wanted = [dict(w) for w in wanted]
    ids = {record_identity(w) for w in wanted}
    readable = VerifiedArrays(cache_dir) if run_dir is not None else None
    have: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        key = record_identity(r)
        if key in ids and _usable(r, run_dir, need_inception, readable):
            have.setdefault(key, []).append(r)
    if readable is not None:
        readable.save()
    return [w for w in wanted
            if not any(_same_inception(r, w) and _same_sampler_code(r, w) and _same_decoder(r, w)
                       for r in have.get(record_identity(w), []))]


def of_step(records: Iterable[Mapping[str, Any]], checkpoint: str, step: int | None) -> list[dict[str, Any]]:
    """The records without those of this checkpoint ("best" or "last") at another step than its step now (none left
    out when step is None): those were scored before training went on, and are not this model's results."""
    return [dict(r) for r in records if step is None or r.get("checkpoint_step") in (None, step)
            or upgrade(r)["checkpoint"] != checkpoint]


def select_current(records: Iterable[Mapping[str, Any]], wanted: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The stored records matching a wanted setting (the newest where several), in the order of `wanted`."""
    by_identity: dict[tuple, dict] = {}
    for r in records:
        key = record_identity(r)
        if key not in by_identity or str(r.get("created", "")) >= str(by_identity[key].get("created", "")):
            by_identity[key] = dict(r)
    return [by_identity[k] for k in (record_identity(w) for w in wanted) if k in by_identity]


def describe_missing(missing: Sequence[Mapping[str, Any]], records: Iterable[Mapping[str, Any]]) -> str:
    """What is missing, in configuration terms: "eval.n_samples=200", "eval.clip=<name>", "all settings"...

    Names each evaluation setting whose wanted value no stored record has; "all settings (none evaluated yet)" when
    there are none."""
    records = [upgrade(r) for r in records]
    if not missing:
        return "nothing"
    if not records:
        return "all settings (none evaluated yet)"
    changed = []
    for name in ("sampler", "n_samples", "eval_seed", "shift", "feature_extractor", "fid_features", "checkpoint",
                 "inception_extractor", "sampler_code", "decoder", "train_seed", "tags"):
        values = {_canonical(name, m.get(name)) for m in missing}
        if name in ("inception_extractor", "sampler_code", "decoder"):
            values -= {None, "unknown"}  # not configured, built in, or not at hand: no record is missing for them
        absent = sorted((v for v in values if v not in {_canonical(name, r.get(name)) for r in records}), key=str)
        if absent:
            key = CONFIG_KEYS.get(name, name)
            changed.append(f"{key}={','.join(_show(v) for v in absent)}")
    if not changed:  # the same evaluation settings: some sampler settings or EMA flags are missing
        labels = sorted({f"{m['setting']} ({'ema' if m['ema'] else 'raw'})" for m in missing})
        changed.append(f"{len(missing)} setting(s): {'; '.join(labels[:4])}{' ...' if len(labels) > 4 else ''}")
    return ", ".join(changed)
