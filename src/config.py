"""Configuration helpers shared by the entry point and the tests: resolvers and up-front checks."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training starts."""


def _frozen(value: Any):
    """A hashable copy of a plain config value (dicts and lists nested), for the parse cache."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _types(value: Any):
    """The types of a plain config value's leaves: part of the parse cache's key, as a tuple compares True == 1 ==
    1.0, so loss.s=true after loss.s=1.0 in one process took the earlier parse (1.0's) and was not refused."""
    if isinstance(value, Mapping):
        return tuple(_types(v) for _, v in sorted((str(k), v) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_types(v) for v in value)
    return type(value).__name__


@functools.lru_cache(maxsize=256)
def _parse_frozen(frozen: tuple, types: tuple):  # types: only for the cache's key
    from src.formulations import from_config

    try:
        return from_config(dict(frozen))
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None


def parse_loss(loss: Any):
    """The formulation a `loss` config describes, or a one-line ConfigError ("loss: ...").

    The one parse of the loss config: the run name's `${recipe_slug:${loss}}` and the training job both call it
    (cached, so a sweep of 61 recipes parses each once).
    """
    cfg = OmegaConf.to_container(loss, resolve=True) if isinstance(loss, DictConfig) else dict(loss)
    return _parse_frozen(_frozen(cfg), _types(cfg))


def _recipe_slug(loss: Any) -> str:
    # An invalid recipe raises: configuration errors are found before Hydra creates a run directory
    # (src/launch/validate.py), so no directory is ever named after one.
    return parse_loss(loss).slug


def register_resolvers() -> None:
    """Register `${recipe_slug:${loss}}` (idempotent)."""
    if not OmegaConf.has_resolver("recipe_slug"):
        OmegaConf.register_new_resolver("recipe_slug", _recipe_slug)


def to_dict(cfg: DictConfig | Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


# Throughput settings (src/models/perf.py): how the same model is computed, not which model is trained, so a run
# may resume under other values (a GPU run resumed on another device, compilation switched off to debug).
THROUGHPUT_KEYS = {"model": ("compile", "compile_backend", "fused_qkv", "fused_modulation", "attention_backend",
                             "activation_checkpointing"), "optim": ("fused",),
                   # How often the loss is read back for the NaN check: when a divergence is found, not the weights.
                   "train": ("loss_check_every",),
                   # Streaming and in-memory loading give the same batches (src/training/datamodule.py).
                   "data": ("num_workers", "in_memory")}


def without_throughput_keys(fp: dict) -> dict:
    """A fingerprint without THROUGHPUT_KEYS (also applied to fingerprints written before they were dropped), the
    data's folders named as their content is (below)."""
    out = {k: {kk: vv for kk, vv in v.items() if kk not in THROUGHPUT_KEYS.get(k, ())} if isinstance(v, dict) else v
           for k, v in fp.items()}
    data = out.get("data")
    if isinstance(data, dict) and data.get("kind") == "embedded":
        # <cache dir>/data/<name>-v<version>-<hash>/train: the folder's name says what it holds; where the cache
        # lies (paths.cache_dir) does not change the data. Stored fingerprints with whole paths compare the same.
        out["data"] = {k: "/".join(Path(str(v)).parts[-2:]) if k in ("train_dir", "eval_dir") and v else v
                       for k, v in data.items()}
    elif isinstance(data, dict) and data.get("kind") == "shards":
        # Shard folders moved elsewhere (another file system, a renamed folder) are the same data, and a folder
        # written again at its path is not: each is named by its content where it is found (a stored path that is
        # gone stays a path, so a run trained before this compares as before).
        out["data"] = {k: shard_folder_id(v) or v if k in ("train_dir", "eval_dir") and v else v
                       for k, v in data.items()}
    return out


def shard_folder_id(folder: Any) -> str | None:
    """A shard folder by its content: the sha256 of its meta.json, which the writer saves once, last (the count, each
    shard's name and size, the latent statistics, the encoders and autoencoder). The value itself when it is one
    already; None where there is no meta.json (not a shard folder, or gone)."""
    if str(folder).startswith(SHARD_ID_PREFIX):
        return str(folder)
    try:
        text = (Path(str(folder)) / "meta.json").read_bytes()
    except OSError:
        return None
    return SHARD_ID_PREFIX + hashlib.sha256(text).hexdigest()[:16]


SHARD_ID_PREFIX = "meta.json sha256 "


#: Lightning's precision aliases (None: bf16-mixed on a GPU, else 32-true), as the fingerprint records them.
PRECISION_ALIASES = {None: None, 32: "32-true", 16: "16-mixed", 64: "64-true", "32": "32-true", "16": "16-mixed",
                     "64": "64-true", "bf16": "bf16-mixed"}
#: fingerprint.json's record of the precision a run was trained at (trainer.precision=null resolves by device): not a
#: setting; the job refuses to resume at another one (src.training.prepare.check_trained_precision).
TRAINED_PRECISION = "trained_precision"
TRAINER_KEYS = ("gradient_clip_val", "precision")  # the trainer settings in the fingerprint (each null before)

# Keys added to the configuration after runs were fingerprinted, with the value every earlier run had: a stored
# fingerprint that lacks one matches a configuration holding that value (an old run still resumes), not another one.
ADDED_KEYS = {"data": {"image_size": 16}, "trainer": dict.fromkeys(TRAINER_KEYS), "train": {"shift": 1.0}}


def with_added_keys(stored: dict, current: dict) -> dict:
    """stored, with each ADDED_KEYS key it lacks filled in where current holds that key's earlier value."""
    out = dict(stored)
    for section, added in ADDED_KEYS.items():
        if section not in out and isinstance(current.get(section), dict):
            out[section] = {}  # a section added whole (trainer)
        if not isinstance(out.get(section), dict) or not isinstance(current.get(section), dict):
            continue
        missing = {k: v for k, v in added.items() if k not in out[section] and current[section].get(k) == v}
        out[section] = {**out[section], **missing}
    return out


def outside_code(cfg: DictConfig) -> dict[str, str]:
    """The source of the code a configuration names from outside this repository (a formulation's builder, a
    backbone's _target_), by content: editing it changes the model a run trains, as a changed setting does. Only the
    named module's own file counts (not what it imports; a package: its and its subpackages' .py files)."""
    from src.utils.plugins import module_digest

    out = {}
    family = OmegaConf.select(cfg, "loss.family", default=None)
    if isinstance(family, str) and ":" in family:
        out["loss.family"] = module_digest(family.split(":", 1)[0])
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if isinstance(target, str) and "." in target and not target.startswith("src."):
        out["model._target_"] = module_digest(target.rsplit(".", 1)[0])
    return out


def fingerprint(cfg: DictConfig) -> dict:
    """The parts of a configuration that determine a trained model; a run directory is tied to one. With code from
    outside the repository, its content too ("code": outside_code)."""
    keys = ("loss", "model", "optim", "train", "seed")
    out = {k: to_dict(cfg[k]) if isinstance(cfg[k], DictConfig) else cfg[k] for k in keys}
    if code := outside_code(cfg):
        out["code"] = code
    out["data"] = to_dict(cfg.data)
    # The trainer settings that change the trained weights (the rest: devices, logging, progress).
    out["trainer"] = {k: cfg.trainer.get(k) for k in TRAINER_KEYS}
    precision = out["trainer"]["precision"]  # an alias names the same precision (16 = 16-mixed)
    out["trainer"]["precision"] = PRECISION_ALIASES.get(precision, precision) if isinstance(
        precision, (str, int, type(None))) else precision
    return without_throughput_keys(out)


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
