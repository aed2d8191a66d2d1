"""Everything that may refuse a job, before anything is built or written (src/training/job.py runs it first):
the configuration checks, the data (built into the cache if embedded, else checked), the autoencoder the evaluation
decodes with, and the run directory's fingerprint, which ties the directory to one configuration once the job binds
it. No Lightning here: the launcher checks every job of a sweep with these before launching any
(src/launch/validate.py), and the planner reads run directories with them (src/plan.py).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import inspect
import json
import math
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.config import (
    PRECISION_ALIASES, TRAINED_PRECISION, ConfigError, diff_keys, fingerprint, outside_code, parse_loss,
    with_added_keys, without_throughput_keys,
)
from src.utils.io import atomic_write_bytes, atomic_write_json

DIM_KEYS = ("latent_channels", "latent_size", "context_dim", "pooled_dim")
CONFIG_FILE = "config.yaml"  # the run's resolved configuration, written when the job binds its directory
REUSED_FILE = "reused_training.json"  # names the run directory whose checkpoints this run evaluates


# ---- configuration checks: every one before any data is built or any file is written --------------------------
def build_formulation(cfg: DictConfig):
    """The recipe's formulation (the loss config is parsed once, in src.config.parse_loss)."""
    return parse_loss(cfg.loss)


def embedded_shapes(name: str, image_size: int) -> dict:
    """What the embedded dataset `name` will feed the backbone, known without building it: its images (pixel
    space) and the tiny CLIP text encoder's widths. Checked against the built shards' meta.json by resolve_data."""
    from src.data import digits, shapes
    from src.text import tiny_clip_paths

    images = {"digits": digits, "shapes": shapes}[name]
    clip = tiny_clip_paths.model_config()
    return {"latent_channels": images.CHANNELS, "latent_size": image_size, "context_dim": clip["text_cfg"]["width"],
            "pooled_dim": clip["embed_dim"], "context_length": clip["text_cfg"]["context_length"]}


def _eval_count(data: DictConfig) -> int:
    """How many samples the evaluation split holds (the validation loss draws data.val_samples of them)."""
    from src.data import digits, shapes
    from src.data.shards import read_meta

    if data.kind == "embedded":
        return {"digits": digits.EVAL_SIZE, "shapes": shapes.SPLIT_SIZES["eval"]}[data.name]
    return int(read_meta(data.eval_dir)["count"])


def _missing_shards_fix(data: DictConfig, key: str) -> str:
    """What to do about a shard folder that is not there, naming the setting the user sets: the paper grid derives
    data.train_dir and data.eval_dir from paths.shards_dir, so a user who gave that one looks for it."""
    raw = str(data._get_node(key)._value())  # the value as configured, before interpolation
    setting = "paths.shards_dir" if "paths.shards_dir" in raw else f"data.{key}"
    return f"write it with python -m src.preprocess (README: Real data), or set {setting} to where it is"


def check_data(cfg: DictConfig) -> dict:
    """The data settings, checked without building anything; returns the shapes (DIM_KEYS) the backbone will see, and
    the text tokens' layout (context_length, text_groups) where the data say."""
    from src.data.expectations import SAME_ENCODING, split_differences
    from src.data.shards import damaged_shards, read_meta

    data = cfg.data
    if data.kind == "embedded":
        from src.data.embedded import check_dataset, check_image_size

        try:
            check_dataset(data.name)
        except ValueError as e:
            raise ConfigError(f"data.name={data.name}: {e}") from None
        try:
            check_image_size(data.image_size)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
        found = embedded_shapes(data.name, data.image_size)
        where = f"the embedded {data.name} data at {data.image_size}x{data.image_size}"
    elif data.kind == "shards":
        for key in ("train_dir", "eval_dir"):
            if OmegaConf.is_missing(data, key) or data[key] is None:
                raise ConfigError(f"data.{key} is not set: a folder of shards (python -m src.preprocess ...)")
            if not (Path(data[key]) / "meta.json").exists():
                raise ConfigError(f"data.{key}={data[key]}: no webdataset shard folder there (meta.json missing); "
                                  f"{_missing_shards_fix(data, key)}")
        metas = {}
        for key in ("train_dir", "eval_dir"):  # not JSON, not a JSON object, not marked complete: named here
            try:
                metas[key] = read_meta(data[key])
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"data.{key}={data[key]}: {e}") from None
        found, where = metas["train_dir"], f"the shards in {data.train_dir}"
        for key in ("train_dir", "eval_dir"):  # a shard cut short fails mid-training, in a reader's traceback
            damaged = damaged_shards(data[key], metas[key])
            if damaged:
                raise ConfigError(f"data.{key}={data[key]}: {', '.join(damaged[:3])} missing or not of the size "
                                  f"meta.json records (cut short?); write the folder again")
        if not isinstance(found["latent_size"], int):  # ShardWriter records [H, W] for H != W: no one size to build
            h, w = found["latent_size"]
            raise ConfigError(f"data.train_dir={data.train_dir}: latents of {h} x {w}; allowed: square latents "
                              f"(data.latent_size is their side)")
        # Else the first validation fails in a traceback (other shapes), or the evaluation silently conditions on
        # another encoder's embeddings.
        diffs = split_differences(found, metas["eval_dir"], SAME_ENCODING)
        if diffs:
            raise ConfigError(f"data.eval_dir={data.eval_dir} is not encoded like data.train_dir ({'; '.join(diffs)})"
                              f": preprocess it with the same models and --stats-from the training folder")
    else:
        raise ConfigError(f"data.kind={data.kind!r}: allowed values are 'embedded', 'shards'")
    shapes = {}
    for key in DIM_KEYS:
        if data[key] is not None and int(data[key]) != int(found[key]):
            raise ConfigError(f"data.{key}={data[key]}: {where} have {found[key]}")
        shapes[key] = int(found[key])
    text = {k: found[k] for k in ("context_length", "text_groups") if k in found}  # for model.context_split
    held_out = _eval_count(data)
    if data.val_samples > held_out:
        raise ConfigError(f"data.val_samples={data.val_samples}: the evaluation split holds {held_out} samples; "
                          f"allowed: 1 to {held_out}")
    return {**shapes, **text}


#: The ranges of a train.cond_groups entry and the data size each lies within (src/training/conditioning.py).
COND_GROUP_RANGES = {"context_tokens": "context_length", "context_channels": "context_dim",
                     "pooled_channels": "pooled_dim"}


def check_cond_groups(cfg: DictConfig, shapes: dict) -> None:
    """train.cond_groups, the text encoders' parts that dropout zeroes: each range within the data (a range past
    the end would drop nothing), no key the dropout would not read (a misspelt context_channels drops every
    channel), and none missing (it would fail at the first step, in a traceback)."""
    groups = OmegaConf.select(cfg, "train.cond_groups")
    if groups is None:
        return
    if not OmegaConf.is_list(groups) or len(groups) == 0:
        raise ConfigError(f"train.cond_groups={groups}: must be null (the shards' text groups) or a non-empty list "
                          f"of {{context_tokens: [start, end], pooled_channels: [start, end]}}")
    for i, group in enumerate(groups):
        if not OmegaConf.is_dict(group):
            raise ConfigError(f"train.cond_groups.{i}={group}: must be a mapping {{context_tokens: [start, end], "
                              f"pooled_channels: [start, end]}}")
        other = sorted(set(group) - set(COND_GROUP_RANGES) - {"name"})
        if other:
            raise ConfigError(f"train.cond_groups.{i}.{other[0]}: no such key; a group has "
                              f"{', '.join(COND_GROUP_RANGES)} (optional) and a name")
        for key, size_key in COND_GROUP_RANGES.items():
            value = group.get(key)
            if value is None and key == "context_channels":  # optional: every channel
                continue
            size = int(shapes[size_key])
            r = list(value) if OmegaConf.is_list(value) else []
            if not (len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                    and 0 <= r[0] <= r[1] <= size):
                raise ConfigError(f"train.cond_groups.{i}.{key}={value}: not allowed; allowed: [start, end] with "
                                  f"0 <= start <= end <= {size} (the data's {size_key})")


def check_model(cfg: DictConfig, shapes: dict) -> None:
    """Build the configured backbone on the meta device (no memory, no weights) for the data's shapes: a model
    setting that cannot work is a one-line error before the data are built."""
    checked = copy.deepcopy(cfg)
    with open_dict(checked):
        for key in DIM_KEYS:
            checked.data[key] = shapes[key]
    fill_context_split(checked, shapes)
    try:
        key = repr(OmegaConf.to_container(checked.model, resolve=True))
        if key in _CHECKED_MODELS:
            return
        with torch.device("meta"):
            backbone = hydra.utils.instantiate(checked.model)
        # Read by the training module for every backbone, one of your own included (it takes them as unread keys).
        from src.models.perf import COMPILE_BACKENDS, check_choice, compile_setting

        compile_setting(OmegaConf.select(checked, "model.compile", default=False))
        check_choice("compile_backend", OmegaConf.select(checked, "model.compile_backend", default="default"),
                     COMPILE_BACKENDS)
    except Exception as e:  # instantiate wraps constructor errors; surface the model's own message
        raise model_error(checked.model, e) from None
    check_backbone_call(backbone, shapes)
    _CHECKED_MODELS.add(key)


def check_backbone_call(backbone: torch.nn.Module, shapes: dict, within=None) -> bool:
    """One forward on the meta device: backbone(x, t, context, pooled) must return a tensor shaped like x
    (docs/backbone.md#a-backbone-of-your-own). A backbone of one's own with another signature failed at the first
    training step, and one returning another shape trained and was ranked: the loss and the sampler broadcast it.
    A forward the meta device cannot run (data-dependent code) is left to the job. within: a context the forward
    runs in (src.plan counts its FLOPs, not running a second one). Whether the forward ran."""
    if not isinstance(backbone, torch.nn.Module) or shapes.get("context_length") is None:
        return False
    c, s = int(shapes["latent_channels"]), int(shapes["latent_size"])
    with torch.device("meta"):
        x = torch.zeros(1, c, s, s)
        args = (x, torch.zeros(1), torch.zeros(1, int(shapes["context_length"]), int(shapes["context_dim"])),
                torch.zeros(1, int(shapes["pooled_dim"])))
    try:
        inspect.signature(backbone.forward).bind(*args)
    except TypeError as e:
        raise ConfigError(f"model: {type(backbone).__name__}.forward cannot be called as backbone(x, t, context, "
                          f"pooled) ({e})") from None
    try:
        with within or contextlib.nullcontext(), torch.no_grad():
            out = backbone(*args)
    except Exception:  # noqa: BLE001 -- not runnable on the meta device; the job runs it for real
        return False
    if getattr(out, "shape", None) != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model: {type(backbone).__name__} returns {got} for x of shape {tuple(x.shape)}; a backbone "
                          "must return a tensor shaped like x (docs/backbone.md#a-backbone-of-your-own)")
    return True


def model_error(model: DictConfig, e: Exception) -> ConfigError:
    """The one-line error of a backbone that hydra.utils.instantiate could not build: its class that cannot be
    imported (Hydra's own message spans three lines), else the constructor's own message."""
    cause = e.__cause__ or e
    target = OmegaConf.select(model, "_target_")
    if not isinstance(target, str) or not target:  # Hydra: "Expected a callable target, got 'None' of type ..."
        return ConfigError(f"model._target_={target}: not allowed; need the import path of a backbone class, e.g. "
                           "src.models.MMDiT (docs/backbone.md#a-backbone-of-your-own)")
    if str(e).startswith("Error locating target") and isinstance(cause, ImportError):
        inner, target = cause.__cause__ or cause, str(OmegaConf.select(model, "_target_"))
        module_name, _, name = target.rpartition(".")
        try:  # the module imports, the class name is wrong (convnet.ConvNt): say that, not "No module named"
            module = importlib.import_module(module_name) if module_name else None
        except Exception:  # noqa: BLE001 -- the module itself does not import: said below
            module = None
        if module is not None and not hasattr(module, name):
            close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return ConfigError(f"model._target_={target}: {module_name} has no {name}{hint}")
        return ConfigError(f"model._target_={target}: cannot import it "
                           f"({type(inner).__name__}: {inner}); the module must be importable where the job runs "
                           "(the working directory or PYTHONPATH)")
    return ConfigError(f"model: {cause}")


_CHECKED_MODELS: set[str] = set()  # model configs already built on the meta device (a sweep checks each once)


def check_config(cfg: DictConfig, multirun: bool = False) -> dict:
    """Every configuration check (values, loss, data, model, evaluation, launch), in that order, before anything is
    built or written; a ConfigError names the setting. Returns the data shapes."""
    from src.launch.checks import check_launch

    check_values(cfg)
    check_choices(cfg)
    formulation = build_formulation(cfg)
    check_run_name(cfg)  # after the recipe's check: the default run name holds the recipe's slug
    shapes = check_data(cfg)
    check_cond_groups(cfg, shapes)
    check_model(cfg, shapes)
    if cfg.eval.enabled:
        from src.evaluation.run import check_eval_files
        from src.sampling.registry import check_steps, get_sampler

        check_eval_files(cfg.eval)
        try:  # else a typo is found after the training, when the evaluation starts
            get_sampler(cfg.sampler.name)
            check_steps(str(cfg.sampler.name), tuple(sorted({int(s.steps) for s in cfg.eval.settings})),
                        float(cfg.eval.get("shift", 1.0)))
        except ValueError as e:
            raise ConfigError(f"sampler.name={cfg.sampler.name}: {e}") from None
        check_sampler_grids(cfg, formulation)
    check_launch(cfg, multirun)
    return shapes


def check_sampler_grids(cfg: DictConfig, formulation) -> None:
    """The sampler's grid of each evaluation setting, built for the recipe: a grid's own limits (sampler=native on a
    discrete schedule: steps <= its 1000 levels) were found when the evaluation started, after the training."""
    from src.sampling.registry import sampler_times

    shift = float(cfg.eval.get("shift", 1.0))
    for i, entry in enumerate(cfg.eval.settings):
        try:
            sampler_times(str(cfg.sampler.name), formulation, int(entry.steps), shift)
        except ValueError as e:
            raise ConfigError(f"eval.settings.{i}.steps={entry.steps}: {e}") from None


def resolve_data(cfg: DictConfig) -> dict:
    """Locate (or build, for embedded data) the shards and fill the data shape keys from their meta.json."""
    from src.data.shards import read_meta

    check_data(cfg)
    data = cfg.data
    if data.kind == "embedded":
        from src.data.embedded import prepare_embedded

        dirs = prepare_embedded(data.name, Path(cfg.paths.cache_dir) / "data", image_size=data.image_size)
        train_dir, eval_dir = str(dirs["train"]), str(dirs["eval"])
    else:
        train_dir, eval_dir = data.train_dir, data.eval_dir
    meta = read_meta(train_dir)
    with open_dict(cfg):
        cfg.data.train_dir, cfg.data.eval_dir = train_dir, eval_dir
        for key in DIM_KEYS:
            if cfg.data[key] is None:
                cfg.data[key] = meta[key]
            elif int(cfg.data[key]) != int(meta[key]):
                raise ConfigError(f"data.{key}={cfg.data[key]}: the shards in {train_dir} have {meta[key]}")
    fill_context_split(cfg, meta)
    fill_cond_dropout(cfg, meta)
    return meta


def fill_cond_dropout(cfg: DictConfig, meta: dict) -> None:
    """train.cond_dropout=auto: per text encoder of the data (train.cond_groups, else meta.json's text_groups), the
    probability that leaves 10% of samples fully unconditional (src.training.conditioning.per_encoder_dropout); set
    before the run is fingerprinted, so the fingerprint holds the number trained with."""
    cfg.train.cond_dropout = resolved_cond_dropout(cfg, meta)


def resolved_cond_dropout(cfg: DictConfig, meta: dict) -> float:
    """train.cond_dropout as a number (fill_cond_dropout)."""
    from src.training.conditioning import per_encoder_dropout

    if cfg.train.get("cond_dropout") != "auto":
        return cfg.train.cond_dropout
    groups = cfg.train.get("cond_groups") or meta.get("text_groups")
    return per_encoder_dropout(len(groups) if groups else 1)


def fill_context_split(cfg: DictConfig, meta: dict) -> None:
    """model.context_split: null (the 3-stream MM-DiT) = where the data's second text group begins (77 CLIP tokens
    in the paper's data; src.data.shards.text_split), set before the model is built and fingerprinted; one given
    must lie inside the data's context, else the first training step fails (every caller fills, then builds)."""
    from src.data.shards import text_split

    if "context_split" in cfg.model and cfg.model.context_split is None:
        cfg.model.context_split = text_split(meta)
    split, length = OmegaConf.select(cfg, "model.context_split"), meta.get("context_length")
    if type(split) is int and length and not 1 <= split < int(length):
        raise ConfigError(f"model.context_split={split} is not allowed; allowed: 1 to {int(length) - 1} (the data's "
                          f"context has {length} tokens, the rest form the second text stream), or null")


def check_values(cfg: DictConfig) -> None:
    """Numeric settings in range, or a one-line error naming the setting, its value and what is allowed."""
    integer, number, boolean = (int,), (int, float), (bool,)
    checks = [  # key, allowed types, range test (None: any value of the type), what is allowed
        ("train.max_steps", integer, lambda v: v >= 1, ">= 1"),
        ("train.ema_every", integer, lambda v: v >= 1, ">= 1"),
        ("train.ema_decay", number, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
        ("train.val_levels", integer, lambda v: v >= 2, ">= 2"),
        ("train.shift", number, lambda v: v > 0 and math.isfinite(v), "> 0 (1.0 = no shift)"),
        ("train.val_every", integer, lambda v: v >= 1, ">= 1"),
        ("train.ckpt_every", integer, lambda v: v >= 1, ">= 1 (resume starts from the last checkpoint)"),
        # finite: an infinite rate or warm-up passes "> 0" and ">= 0", and fails in the job (or never trains)
        ("optim.lr", number, lambda v: 0 < v < math.inf, "> 0, finite"),
        ("optim.warmup_steps", number, lambda v: 0 <= v < math.inf,
         ">= 0, finite (0: the full rate from the first step)"),
        ("data.batch_size", integer, lambda v: v >= 1, ">= 1"),
        ("data.val_samples", integer, lambda v: v >= 1, ">= 1"),
        ("data.in_memory", boolean, None, "(true or false)"),  # any other value would read as true or false
        ("seed", integer, lambda v: v >= 0, ">= 0"),
        ("eval.enabled", boolean, None, "(true or false)"),
    ]
    optional = [("torch_threads", integer, lambda v: v >= 1, ">= 1 (or null: torch's default)"),
                ("data.num_workers", integer, lambda v: v >= 0, ">= 0"),
                # Lightning clips nothing at <= 0, and takes a string only when it builds the trainer.
                ("trainer.gradient_clip_val", number, lambda v: 0 < v < math.inf, "> 0 (or null: no clipping)"),
                # Read as truth values: fail_fast=no would stop the sweep, reuse_training=no would still reuse.
                ("fail_fast", boolean, None, "(true or false)"), ("reuse_training", boolean, None, "(true or false)"),
                ("verbose", boolean, None, "(true or false)"),
                # Lightning takes any value: "maybe" reads as true, a negative interval as every step.
                ("trainer.enable_progress_bar", boolean, None, "(true or false)"),
                ("trainer.log_every_n_steps", integer, lambda v: v >= 0, ">= 0 (0: no training loss rows)")]
    checks += [c for c in optional if OmegaConf.select(cfg, c[0]) is not None]
    if OmegaConf.select(cfg, "train.cond_dropout") != "auto":
        checks.append(("train.cond_dropout", number, lambda v: 0.0 <= v < 1.0,
                       "in [0, 1) (or auto: 10% of samples without any text conditioning)"))
    if OmegaConf.select(cfg, "train.loss_check_every", default="auto") != "auto":
        checks.append(("train.loss_check_every", integer, lambda v: v >= 1,
                       ">= 1 (or auto: 1 on the CPU, 50 on a GPU)"))
    if cfg.eval.enabled is True:  # checked before training, not found out when the evaluation starts
        for key in ("eval.settings", "eval.ema"):
            value = OmegaConf.select(cfg, key)
            if not OmegaConf.is_list(value) or len(value) == 0:
                example = "[{steps: 25, cfg: 5.0}]" if key == "eval.settings" else "[true, false]"
                raise ConfigError(f"{key}={value}: must be a non-empty list, e.g. {key}='{example}'")
        checks += [
            ("eval.n_samples", integer, lambda v: v >= 2, ">= 2 (FID needs two samples)"),
            ("eval.batch_size", integer, lambda v: v >= 1, ">= 1"),
            ("eval.seed", integer, lambda v: v >= 0, ">= 0"),
            # finite: an infinite shift or guidance scale passes "> 0" but fails the sampler, after the training
            ("eval.shift", number, lambda v: v > 0 and math.isfinite(v), "> 0 (1.0 = no shift)"),
        ]
        check_setting_keys(cfg.eval.settings)
        for i in range(len(cfg.eval.settings)):
            checks += [(f"eval.settings.{i}.steps", integer, lambda v: v >= 1, ">= 1"),
                       (f"eval.settings.{i}.cfg", number, lambda v: v >= 0 and math.isfinite(v), ">= 0, finite")]
        checks += [(f"eval.ema.{i}", boolean, None, "(true or false)") for i in range(len(cfg.eval.ema))]
    for key in ("paths.root_dir", "paths.output_dir", "paths.cache_dir"):  # empty: files land in the current folder
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}={'' if value is None else value}: must be a folder (relative paths are taken "
                              f"from the directory the command is launched in)")
    # The sweep's folder is <output_dir>/multirun/<sweep_name>: an empty name made multirun/ itself the sweep (its
    # runs read as sweeps named after the datasets), null a folder "None", and ".." a folder outside multirun/.
    name = OmegaConf.select(cfg, "sweep_name")
    name = str(name) if isinstance(name, int) and not isinstance(name, bool) else name  # sweep_name=2024: an int
    if not isinstance(name, str) or not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ConfigError(f"sweep_name={'null' if name is None else name}: must name a folder inside "
                          f"{cfg.paths.output_dir}/multirun, e.g. sweep_name=lr_study")
    for key, types, ok, allowed in checks:
        value = OmegaConf.select(cfg, key)
        kind = {integer: "an integer", number: "a number", boolean: "a boolean"}[types]
        # bool is an int subclass: True is no step count, and 1 is no boolean.
        if isinstance(value, bool) != (types == boolean) or not isinstance(value, types):
            raise ConfigError(f"{key}={value}: must be {kind} {allowed}")
        if ok is not None and not ok(value):
            raise ConfigError(f"{key}={value}: must be {kind} {allowed}")
    if cfg.eval.enabled is True:
        check_no_repeats(cfg.eval)


def check_run_name(cfg: DictConfig) -> None:
    """The run directory is <output_dir>/runs/<run_name> (a sweep's: <sweep dir>/<run_name>): an empty run_name made
    runs/ (or the sweep's folder) the run directory, null a folder "None", and ".." a folder outside them."""
    try:
        name = cfg.get("run_name")
    except Exception:  # noqa: BLE001 -- an interpolation that resolves only where Hydra runs (${hydra:...})
        return
    name = str(name) if isinstance(name, (int, float)) and not isinstance(name, bool) else name
    if not isinstance(name, str) or not name.strip("/ ") or ".." in Path(name).parts:
        raise ConfigError(f"run_name={'null' if name is None else name}: must name a folder inside the sweep's "
                          f"folder (or {cfg.paths.output_dir}/runs), e.g. the default "
                          "run_name='${data.name}/${recipe_slug:${loss}}${run_tag}'")
    # A folder name over the file systems' 255 bytes (a sweep's run tag of long values) failed only at the launch's
    # mkdir (`File name too long`), ending the sweep after it wrote its files, the valid jobs not run.
    long = next((p for p in Path(name).parts if len(p.encode()) > NAME_MAX), None)
    if long is not None:
        raise ConfigError(f"run_name={name[:80]}...: its folder {long[:40]}... is {len(long.encode())} bytes, over the "
                          f"{NAME_MAX} a file system allows; sweep shorter values, or set a shorter run_name")


#: The longest folder name (bytes) of the common file systems (ext4, XFS, Btrfs, ZFS, Lustre, GPFS).
NAME_MAX = 255


#: The keys of one eval.settings entry; the shift is one for all settings (eval.shift), as records name it.
SETTING_KEYS = ("steps", "cfg")


def check_setting_keys(settings) -> None:
    """Each eval.settings entry is {steps, cfg}: any other key (a per-setting shift, a typo) would be read by nothing,
    and the records of the setting without it would be served as its results."""
    for i, entry in enumerate(settings):
        if not OmegaConf.is_dict(entry):
            raise ConfigError(f"eval.settings.{i}={entry}: must be a mapping {{steps: N, cfg: W}}")
        other = sorted(set(entry) - set(SETTING_KEYS))
        if other:
            hint = "; the shift is eval.shift, one for all settings" if "shift" in other else ""
            raise ConfigError(f"eval.settings.{i}.{other[0]}: no such key; an entry has only "
                              f"{', '.join(SETTING_KEYS)}{hint}")


def check_no_repeats(ev) -> None:
    """A setting or EMA flag listed twice would be sampled twice and reported (and counted as wanted) twice."""
    seen: dict[tuple, int] = {}
    for i, entry in enumerate(ev.settings):
        key = (int(entry.steps), float(entry.cfg))
        if key in seen:
            raise ConfigError(f"eval.settings.{i}={{steps: {entry.steps}, cfg: {entry.cfg}}}: the same setting as "
                              f"eval.settings.{seen[key]}; list each setting once")
        seen[key] = i
    flags = [bool(e) for e in ev.ema]
    if len(set(flags)) < len(flags):
        raise ConfigError(f"eval.ema={flags}: lists a value twice; allowed: [true, false], [true] or [false]")


PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "64-true", "transformer-engine",
              "transformer-engine-float16")  # and Lightning's aliases (src.config.PRECISION_ALIASES)
#: Lightning precisions that hold the weights themselves in half precision: the EMA and AdamW would update them there.
HALF_WEIGHTS = ("bf16-true", "16-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
WANDB_MODES = ("offline", "online", "disabled", "shared", "dryrun", "run")  # what wandb.Settings(mode=...) takes


def resolved_precision(trainer: DictConfig) -> str:
    """The precision the job trains at: trainer.precision by Lightning's own name for it (an alias resolved); null
    is bf16-mixed where a GPU trains, else 32-true."""
    precision = trainer.precision
    if precision is None:
        return "bf16-mixed" if trains_on_gpu(trainer) else "32-true"
    return PRECISION_ALIASES.get(precision, precision)


def trains_on_gpu(trainer: DictConfig) -> bool:
    return torch.cuda.is_available() and trainer.accelerator != "cpu"


def check_device_settings(cfg: DictConfig) -> None:
    """Settings the job's device cannot run, checked in the job (a launch from a login node without a GPU is no
    sign that its jobs have none): a CUDA-only attention kernel on the CPU failed at the first forward."""
    from src.models.perf import ATTENTION_BACKENDS, CUDA_ONLY_ATTENTION

    backend = OmegaConf.select(cfg, "model.attention_backend", default="auto")
    if backend in CUDA_ONLY_ATTENTION and not trains_on_gpu(cfg.trainer):
        allowed = ", ".join(b for b in ATTENTION_BACKENDS if b not in CUDA_ONLY_ATTENTION)
        raise ConfigError(f"model.attention_backend={backend}: a kernel for CUDA GPUs, and this job trains on the CPU; "
                          f"allowed here: {allowed}")


def check_choices(cfg: DictConfig) -> None:
    """The optimizer's and the trainer's settings: a ConfigError naming the setting, its value and what is allowed
    (else Lightning or torch refuses them mid-launch, after the run directory exists, in a traceback)."""
    from src.models.perf import AUTO_BOOL

    def refuse(key, value, allowed):
        raise ConfigError(f"{key}={value}: not allowed; allowed: {allowed}")

    optim = cfg.optim
    if optim.fused not in AUTO_BOOL:
        refuse("optim.fused", optim.fused, "auto, true, false")
    if isinstance(optim.eps, bool) or not isinstance(optim.eps, (int, float)) or not 0 < optim.eps < math.inf:
        refuse("optim.eps", optim.eps, "a number > 0, finite")
    wd = optim.weight_decay
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0 <= wd < math.inf:  # nan, inf: NaN weights
        refuse("optim.weight_decay", wd, "a number >= 0, finite")
    betas = list(optim.betas) if OmegaConf.is_list(optim.betas) else None
    if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                   and 0 <= b < 1 for b in betas):
        refuse("optim.betas", optim.betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    tr = cfg.trainer
    if tr.precision in HALF_WEIGHTS:  # Lightning takes them, and the run learns next to nothing, silently
        raise ConfigError(f"trainer.precision={tr.precision}: not allowed: the weights, their EMA and AdamW's state "
                          "would be half precision, where an update of optim.lr or an EMA step of 1 - "
                          "train.ema_decay mostly rounds to no change; allowed: bf16-mixed (the GPU default), "
                          "16-mixed, 32-true")
    if tr.precision not in PRECISIONS and tr.precision not in PRECISION_ALIASES:
        refuse("trainer.precision", tr.precision, "null (bf16-mixed on a GPU, else 32-true), " + ", ".join(PRECISIONS))
    if tr.accelerator not in ACCELERATORS:
        refuse("trainer.accelerator", tr.accelerator, ", ".join(ACCELERATORS))
    deterministic = tr.get("deterministic")
    if not (deterministic is None or isinstance(deterministic, bool) or deterministic == "warn"):
        # Lightning reads any other value as true or false
        refuse("trainer.deterministic", deterministic, "true, false, warn")
    if (error := strategy_error(tr.strategy)) is not None:  # else Lightning's ValueError, in the run directory
        refuse("trainer.strategy", tr.strategy, error)

    def index(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    nodes = tr.num_nodes
    if not (index(nodes) and nodes >= 1):
        refuse("trainer.num_nodes", nodes, "an integer >= 1")
    devices = tr.devices
    chosen = list(devices) if OmegaConf.is_list(devices) else (
        [d.strip() for d in devices.split(",") if d.strip()] if isinstance(devices, str) and "," in devices else None)
    if chosen is not None:  # which devices: [0, 1] or "0,1"
        ok = bool(chosen) and all(index(d) or (isinstance(d, str) and d.isdigit()) for d in chosen)
    else:
        ok = (index(devices) and devices >= 1) or devices in (-1, "auto")
    if not ok:
        refuse("trainer.devices", devices, "an integer >= 1, -1 (all), auto, or device indices ([0, 1] or '0,1')")
    # W&B refuses an unknown mode in wandb.init, inside the job: after the run directory exists, in words of its own.
    w = cfg.logger.wandb
    for key, value in (("logger.csv", cfg.logger.csv), ("logger.wandb.enabled", w.enabled)):
        if not isinstance(value, bool):
            refuse(key, value, "true, false")
    if w.enabled:
        for key, mode in (("logger.wandb.mode", w.mode), ("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))):
            if mode not in WANDB_MODES:
                refuse(key, mode, ", ".join(WANDB_MODES))


#: Strategy names that need no look-up (Lightning's registry is read only for other names: importing it takes seconds).
COMMON_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed")


def strategy_error(strategy) -> str | None:
    """What trainer.strategy allows, for a name that Lightning would refuse when the job builds its trainer; None
    for a known name or a configuration with a _target_ (instantiated by the job)."""
    if OmegaConf.is_dict(strategy) and "_target_" in strategy:
        return None
    if isinstance(strategy, str) and strategy in COMMON_STRATEGIES:
        return None
    from lightning.pytorch.strategies import StrategyRegistry

    names = ["auto", *StrategyRegistry.available_strategies()]
    if isinstance(strategy, str) and strategy in names:
        return None
    shown = ", ".join(n for n in names if "find_unused" not in n)
    return f"{shown} (and their _find_unused_parameters_* forms), or a configuration with _target_ (trainer=fsdp)"


def is_bound(run_dir: Path) -> bool:
    """Whether something was trained or evaluated in run_dir (then it belongs to its fingerprint's configuration).
    A launch that failed before its first checkpoint (a typo in a setting, a missing file) leaves nothing to protect."""
    return any((run_dir / "checkpoints").glob("*.ckpt")) or (run_dir / "results.json").exists()


def _fingerprint_json(cfg: DictConfig) -> dict:
    return json.loads(json.dumps(fingerprint(cfg), default=str))


def run_streams(run_dir: Path) -> int:
    """The version of the training's random streams in run_dir (src.training.streams.STREAMS): the one its
    fingerprint.json was bound with, 1 for a run bound before the key existed (so it resumes exactly); today's for a
    directory with nothing trained (every rank of a job reads the same, before or after rank 0 binds it)."""
    from src.training.streams import STREAMS

    if not is_bound(run_dir):
        return STREAMS
    try:
        stored = json.loads((run_dir / "fingerprint.json").read_text())
    except (OSError, ValueError):  # check_fingerprint has named a damaged one already
        return STREAMS
    return int(stored.get("streams", 1)) if isinstance(stored, dict) else STREAMS


def fingerprint_changes(cfg: DictConfig, run_dir: Path) -> list[str]:
    """The keys whose values differ from the configuration a run in run_dir was trained with ([] when the directory
    holds nothing trained or evaluated yet: a launch that failed before its first checkpoint leaves nothing to
    protect). cfg must have its data resolved (resolve_data)."""
    path = run_dir / "fingerprint.json"
    if not path.exists() or not is_bound(run_dir):
        return []
    current = _fingerprint_json(cfg)
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # this project writes it atomically: damaged elsewhere
        raise ConfigError(f"{path}: not valid JSON ({e}); it records the configuration this directory was trained "
                          f"with: restore it, or move the directory away to train anew") from e
    if "code" not in stored:  # trained before the code from outside was recorded: its content is unknown
        current.pop("code", None)
    stored.pop("streams", None)  # the run's own draws (run_streams), not a setting: any version resumes as it was
    trained = stored.pop(TRAINED_PRECISION, None)  # null resolved (check_trained_precision): the same run if named
    if isinstance(stored.get("trainer"), dict) and stored["trainer"].get("precision") is None and trained is not None \
            and current["trainer"]["precision"] == trained:
        stored["trainer"] = {**stored["trainer"], "precision": trained}
    # A paper recipe by name (loss=recipe loss.recipe='rf/lognorm(0.50, 0.60)') is the same model as its family and
    # parameters (loss=rf_lognorm loss.m=0.5 loss.s=0.6, loss=paper/rf_lognorm_0.50_0.60), in one directory.
    for fp in (stored, current):
        if isinstance(fp.get("loss"), dict):
            fp["loss"] = recipe_as_family(fp["loss"])
    return diff_keys(with_added_keys(without_throughput_keys(stored), current), current)


def recipe_as_family(loss: dict) -> dict:
    """{"recipe": paper name} as the {"family": key, **params} it names; any other loss config as it is."""
    from src.formulations.registry import RECIPE_SPECS

    if set(loss) != {"recipe"} or loss["recipe"] not in RECIPE_SPECS:
        return loss
    family, params = RECIPE_SPECS[loss["recipe"]]
    return {"family": family, **params}


def check_fingerprint(cfg: DictConfig, run_dir: Path, multirun: bool = True) -> None:
    """A run directory belongs to one configuration: resuming with another one is an error, not a silent mix.
    Reads only: a refused launch leaves the directory exactly as it was. multirun: the way out names sweep_name,
    which a single run's directory (outputs/runs/<run_name>) does not depend on."""
    changed = fingerprint_changes(cfg, run_dir)
    if changed == ["train.max_steps"]:  # training it longer goes on from last.ckpt; shorter is refused
        check_extension(cfg, run_dir, multirun)
        return
    if changed:
        # The code differs under the same setting: edited. Under another setting (model._target_=other.Net) it is
        # other code, which the changed setting already says.
        edited = [k.removeprefix("code.") for k in changed if k.startswith("code.") and k[5:] not in changed]
        what = f"; the code its {' and '.join(edited)} names has been edited since" if edited else ""
        raise ConfigError(
            f"{run_dir} holds a run with a different configuration ({', '.join(changed[:5])}{what}); "
            f"{'use another sweep_name, ' if multirun else ''}give this configuration its own directory with "
            "run_tag=/<label>, or delete the directory"
        )


def trained_max_steps(run_dir: Path) -> int | None:
    """The train.max_steps of the run bound to run_dir (its fingerprint.json); None when unreadable."""
    try:
        return int(json.loads((run_dir / "fingerprint.json").read_text())["train"]["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extension(cfg: DictConfig, run_dir: Path, changed: list[str] | None = None) -> tuple[int, int] | None:
    """(the steps run_dir's run was trained to, cfg's train.max_steps) when cfg only asks to train it longer: its
    fingerprint differs in a larger train.max_steps alone (changed: fingerprint_changes, if known). Such a run goes
    on from last.ckpt to exactly the run trained straight to the new steps: the learning rate is constant after
    warm-up (no schedule reads max_steps), and data, times and noise depend on (seed, step) only."""
    if (fingerprint_changes(cfg, run_dir) if changed is None else changed) != ["train.max_steps"]:
        return None
    trained, wanted = trained_max_steps(run_dir), int(cfg.train.max_steps)
    return (trained, wanted) if trained is not None and wanted > trained else None


def check_extension(cfg: DictConfig, run_dir: Path, multirun: bool = True) -> None:
    """Another train.max_steps alone: more steps train the run on (extension), fewer would need other weights."""
    if extension(cfg, run_dir, ["train.max_steps"]) is None:
        trained = trained_max_steps(run_dir)
        raise ConfigError(
            f"train.max_steps={cfg.train.max_steps}: {run_dir} holds a run trained to {trained} steps; allowed: more "
            f"than {trained} (it trains on from its last.ckpt), or fewer in a directory of its own "
            f"({'another sweep_name, or ' if multirun else ''}run_tag=/<label>)")


def extend_fingerprint(cfg: DictConfig, run_dir: Path) -> None:
    """Record the new train.max_steps of a run trained longer (extension), in fingerprint.json and config.yaml;
    the rest as bound (streams, precision, code: the run's own)."""
    stored = json.loads((run_dir / "fingerprint.json").read_text())
    stored["train"]["max_steps"] = int(cfg.train.max_steps)
    atomic_write_json(run_dir / "fingerprint.json", stored)
    if (run_dir / CONFIG_FILE).exists():
        config = OmegaConf.load(run_dir / CONFIG_FILE)
        config.train.max_steps = int(cfg.train.max_steps)
        atomic_write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(config).encode("utf-8"))
    else:
        write_run_config(cfg, run_dir)
    # Its checkpoints are its own from now on, not the twin's it evaluated (reuse_training)
    (run_dir / REUSED_FILE).unlink(missing_ok=True)


def check_trained_precision(cfg: DictConfig, run_dir: Path, here: str, where: str = "here") -> None:
    """trainer.precision=null resolves by device: a run trained on a GPU (bf16-mixed) and resumed on the CPU, or the
    reverse, would go on at another precision without a word. here: what null resolves to where the run would go on,
    known in the job (resolved_precision); the launcher, on a login node, passes what the launch names
    (src.launch.validate.launch_precision)."""
    trained = other_trained_precision(cfg, run_dir, here)
    if trained is not None:
        raise ConfigError(f"trainer.precision=null: {run_dir} was trained at {trained}, and null is {here} {where} "
                          f"(bf16-mixed on a GPU, else 32-true); resume it with trainer.precision={trained}, or train "
                          "anew in another directory")


def other_trained_precision(cfg: DictConfig, run_dir: Path, here: str) -> str | None:
    """The precision run_dir was trained at when trainer.precision=null, resolving to `here`, would resume it at
    another; else None."""
    if cfg.trainer.precision is not None or not is_bound(run_dir):
        return None
    try:
        trained = json.loads((run_dir / "fingerprint.json").read_text()).get(TRAINED_PRECISION)
    except (OSError, ValueError, AttributeError):  # none (a run bound before it was recorded), or named already
        return None
    return trained if trained is not None and trained != here else None


def check_trained_code(cfg: DictConfig, run_dir: Path) -> None:
    """Re-evaluating a trained run (src.evaluate): its settings are the run's own, but the code from outside the
    repository it names (fingerprint "code") may have been edited since; sampling with the edited code would evaluate
    another model than the one trained. Reads only."""
    try:
        stored = json.loads((run_dir / "fingerprint.json").read_text()).get("code")
    except (OSError, ValueError, AttributeError):  # no fingerprint (an older run): nothing recorded to compare
        return
    if not isinstance(stored, dict):  # trained before the code from outside was recorded
        return
    current = outside_code(cfg)
    # "unknown": the module cannot be found here, which check_config reports as such
    edited = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k) != "unknown"]
    if edited:
        raise ConfigError(
            f"{run_dir} was trained with other code: the file its {' and '.join(edited)} names has been edited since "
            f"({', '.join(f'{stored.get(k)} -> {current.get(k)}' for k in edited)}); restore it, or train the edited "
            "code in another directory (python -m src.run)")


def bind_fingerprint(cfg: DictConfig, run_dir: Path) -> None:
    """Tie run_dir to this configuration (after check_fingerprint passed), unless a run is already bound there (one
    trained longer records its new train.max_steps: extend_fingerprint).

    Binding also writes the resolved configuration to config.yaml (what `python -m src.evaluate` re-evaluates the
    run with); a run directory from before config.yaml existed gets one."""
    if not (run_dir / "fingerprint.json").exists() or not is_bound(run_dir):
        from src.training.streams import STREAMS

        atomic_write_json(run_dir / "fingerprint.json", {**_fingerprint_json(cfg), "streams": STREAMS,
                                                         TRAINED_PRECISION: resolved_precision(cfg.trainer)})
        write_run_config(cfg, run_dir)
    elif extension(cfg, run_dir):
        extend_fingerprint(cfg, run_dir)
    elif not (run_dir / CONFIG_FILE).exists():
        write_run_config(cfg, run_dir)


def write_run_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved configuration, atomically, to run_dir/config.yaml (it belongs to the run: Hydra's
    .hydra/config.yaml is the launch's)."""
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run (a test calling run_job): kept unresolved
        text = OmegaConf.to_yaml(cfg)
    atomic_write_bytes(run_dir / CONFIG_FILE, text.encode("utf-8"))


def prepare_job(cfg: DictConfig, run_dir: str | Path, multirun: bool = False) -> dict:
    """Everything that may refuse the job, before anything is written into run_dir: the configuration checks,
    the data (built into the cache if embedded) and the run directory's fingerprint. Returns the data's meta."""
    check_config(cfg, multirun)
    check_device_settings(cfg)
    meta = resolve_data(cfg)
    check_decoder(cfg, meta)
    check_run_dir(cfg, Path(run_dir), multirun)
    return meta


def check_run_dir(cfg: DictConfig, run_dir: Path, multirun: bool = False) -> None:
    """The run directory's own refusals (another configuration or precision trained there); reads only. Run again
    once the job holds the directory's lock: another launch may have bound it since (src/run.py)."""
    check_fingerprint(cfg, run_dir, multirun)
    check_trained_precision(cfg, run_dir, resolved_precision(cfg.trainer))  # here, where the device is known


def check_decoder(cfg: DictConfig, meta: dict) -> None:
    """Latent shards: the autoencoder that decodes samples for the evaluation is at hand (else it is found missing
    after the training, when the evaluation starts)."""
    if cfg.eval.enabled:
        from src.evaluation.decoding import autoencoder_source

        autoencoder_source(meta, OmegaConf.select(cfg, "eval.autoencoder_path"))
