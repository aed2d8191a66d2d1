"""Evaluate a trained run directory: `evaluate_run(cfg, run_dir)` samples and scores every record its configuration
wants and results.json lacks (src.results.missing_records), from the chosen checkpoint.

Called by the training job after training (rank 0, on the trainer's device) and by `python -m src.evaluate RUN_DIR`
to re-evaluate a finished run with other evaluation settings. Nothing here needs the trainer: the backbone is built
from `cfg.model` and the weights come from the checkpoint file, so a run trained under FSDP evaluates the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.utils.io import first_line, weights_file_error, weights_sha256
from src.results import (
    CHECKPOINTS, DEFAULT_SAMPLER, describe_missing, missing_records, of_step, read_results, select_current,
    wanted_records,
)

log = logging.getLogger(__name__)

#: on_setting(i, n, label, n_samples, seconds): called after each (sampler setting, EMA) evaluated, i = 1..n.
OnSetting = Callable[[int, int, str, int, float], None]


# ---- checkpoint and weights ---------------------------------------------------------------------------------
class MissingBestCheckpoint(FileNotFoundError):
    """best.ckpt is gone though a validation chose it: evaluating last.ckpt in its place would score another model
    under the name "best". step: the step validation chose (None where last.ckpt does not say, older runs)."""

    def __init__(self, message: str, step: int | None):
        super().__init__(message)
        self.step = step


def chosen_best(last: str | Path) -> dict[str, Any] | None:
    """What last.ckpt says validation chose as best.ckpt: {"step": int | None, "score": float | None}; None when no
    validation has produced one (or last.ckpt cannot be read: the evaluation names it when it loads it).

    Read from the ModelCheckpoint state Lightning saves in every checkpoint (src/training/callbacks.py
    BestCheckpoint): a best_model_path ending in best.ckpt means one was written, wherever the run lay then."""
    try:
        states = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks") or {}
    except Exception:  # noqa: BLE001 -- a truncated or foreign file
        return None
    for state in states.values() if isinstance(states, dict) else ():
        if isinstance(state, dict) and Path(str(state.get("best_model_path") or "")).name == "best.ckpt":
            score, step = state.get("best_model_score"), state.get("best_model_step")
            return {"step": None if step is None else int(step), "score": None if score is None else float(score)}
    return None


def select_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """The checkpoint file to evaluate: "best" = best.ckpt (lowest EMA validation loss), else last.ckpt where
    no validation has produced one; "last" = last.ckpt. Raises FileNotFoundError naming the folder when absent,
    MissingBestCheckpoint when best.ckpt is gone though a validation chose it (last.ckpt's callback state says so)."""
    if which not in CHECKPOINTS:
        raise ConfigError(f"eval.checkpoint={which}: allowed values are {', '.join(CHECKPOINTS)}")
    ckpt_dir = Path(run_dir) / "checkpoints"
    best, last = ckpt_dir / "best.ckpt", ckpt_dir / "last.ckpt"
    path = best if which == "best" and best.is_file() else last
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint (last.ckpt) to evaluate; train the run first")
    chosen = chosen_best(last) if which == "best" and path == last else None
    if chosen is not None:  # deleted or lost: last.ckpt is another model, its records would be served as best's
        said = [f"step {chosen['step']}"] if chosen["step"] is not None else []
        said += [f"val_ema/loss_mean {chosen['score']:.6g}"] if chosen["score"] is not None else []
        which_one = f" ({', '.join(said)})" if said else ""
        raise MissingBestCheckpoint(f"{best}: missing, though validation chose it{which_one}; restore it, or evaluate "
                                    "last.ckpt with eval.checkpoint=last", chosen["step"])
    return path


def backbone_weights(state_dict: dict[str, torch.Tensor], ema: bool) -> dict[str, torch.Tensor]:
    """The backbone's own state dict from a FormulationModule checkpoint: the EMA copy or the raw weights."""
    prefix = "ema_backbone." if ema else "backbone."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def unsharded_backbone(cfg_model: DictConfig, device: torch.device) -> torch.nn.Module:
    """A plain backbone of the run's architecture on `device`, for the checkpoint's weights to be loaded into.

    Built from the configuration, not copied from the trained module, which under FSDP is a sharded wrapper.
    Built on the meta device and then allocated, so a large backbone is not randomly initialised only to be
    overwritten; every tensor must then come from the checkpoint, so a backbone with buffers that are not saved
    is built the ordinary way.
    """
    import hydra

    with torch.device("meta"):
        backbone = hydra.utils.instantiate(cfg_model)
    saved = set(backbone.state_dict())
    if any(name not in saved for name, _ in backbone.named_buffers()):
        return hydra.utils.instantiate(cfg_model).to(device)
    return backbone.to_empty(device=device)


# ---- feature extractor -------------------------------------------------------------------------------------
def check_eval_files(cfg_eval: DictConfig) -> None:
    """Missing or unreadable weight files are configuration errors, found before training starts."""
    for key in ("clip.weights_path", "inception.weights_path"):
        path = OmegaConf.select(cfg_eval, key)
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"eval.{key}={path}: file not found (weights are loaded from local files only)")
        error = weights_file_error(path)
        if error is not None:
            raise ConfigError(f"eval.{key}={path}: not a weights file torch.load(weights_only=True) reads ({error})")
    if cfg_eval.clip.model_name is not None and cfg_eval.clip.weights_path is None:
        raise ConfigError(f"eval.clip.weights_path=None: required with eval.clip.model_name={cfg_eval.clip.model_name}")
    quick_gelu = cfg_eval.clip.get("force_quick_gelu", False)
    if not isinstance(quick_gelu, bool):  # else read as a truth value: "no" would switch it on
        raise ConfigError(f"eval.clip.force_quick_gelu={quick_gelu}: not allowed; allowed: true, false")
    if cfg_eval.clip.model_name is None and quick_gelu:
        # The tiny CLIP loads without it: its records would be named ",quickgelu" for features computed with GELU.
        raise ConfigError("eval.clip.force_quick_gelu=true: only with eval.clip.model_name (OpenAI weights); the tiny "
                          "CLIP (eval.clip.model_name=null) was trained with GELU")
    if cfg_eval.clip.model_name is None and any(cfg_eval.clip.get(k) is not None for k in NORMALISATION):
        raise ConfigError(f"eval.clip.{next(k for k in NORMALISATION if cfg_eval.clip.get(k) is not None)}: only with "
                          "eval.clip.model_name; the tiny CLIP (eval.clip.model_name=null) has its own")
    for key in NORMALISATION:
        value = cfg_eval.clip.get(key)
        if value is not None and not (OmegaConf.is_list(value) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
                and (key == "image_mean" or all(v > 0 for v in value))):
            raise ConfigError(f"eval.clip.{key}={value}: must be three finite numbers{' > 0' * (key == 'image_std')} "
                              "(per RGB channel), or null: the weights' sidecar JSON's, else the model config's")
    if cfg_eval.clip.model_name is not None:  # else a typo is found after the training, when the evaluation starts
        clip_normalisation(cfg_eval.clip)  # (a damaged sidecar too)
        from src.metrics.clip import model_name_error

        error = model_name_error(cfg_eval.clip.model_name)
        if error is not None:
            raise ConfigError(error)
    which = OmegaConf.select(cfg_eval, "checkpoint", default="best")
    if which not in CHECKPOINTS:
        raise ConfigError(f"eval.checkpoint={which}: allowed values are {', '.join(CHECKPOINTS)}")


#: eval.clip's image normalisation keys (null: the weights' sidecar JSON's, else the model config's).
NORMALISATION = ("image_mean", "image_std")


def clip_normalisation(clip: DictConfig) -> dict[str, list[float]]:
    """The image mean and std a configured CLIP model is given, by key: eval.clip.image_mean / image_std, else the
    weights' sidecar JSON (`<weights>.json`, as src.text.train_tiny_clip writes it), else none (the model config's:
    OpenAI's for ViT-L-14). A local file bypasses open_clip's per-weight settings, so weights trained with another
    normalisation got features silently wrong."""
    from src.text.checkpoints import sidecar_path

    out = {k: [float(v) for v in clip[k]] for k in NORMALISATION if clip.get(k) is not None}
    sidecar = sidecar_path(str(clip.weights_path))
    if len(out) < len(NORMALISATION) and sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text())
            for key in NORMALISATION:
                if key not in out and recorded.get(key) is not None:
                    out[key] = [float(v) for v in recorded[key]]
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"eval.clip.weights_path={clip.weights_path}: its sidecar {sidecar} is not a JSON "
                              f"object with image_mean/image_std lists ({e}); repair it, or give eval.clip.image_mean "
                              "and eval.clip.image_std") from e
    return out


def feature_extractor_name(cfg_eval: DictConfig, cache_dir: str | Path | None = None) -> str:
    """Names the CLIP feature extractor by model and the content of its weights: "tiny_clip:<sha256[:12]>" for the
    committed tiny CLIP, "<model>:<sha256[:12]>" for a configured file (",quickgelu" appended when QuickGELU is
    forced). A file replaced at the same path is another extractor, so its records are computed again. The sha256
    is computed once per file version and remembered under cache_dir (src.utils.io.weights_sha256)."""
    clip = cfg_eval.clip
    if clip.model_name is None:
        from src.text.tiny_clip_paths import WEIGHTS_PATH  # (not tiny_clip: the report names it without open_clip)

        model, path = "tiny_clip", Path(WEIGHTS_PATH)
    else:
        model, path = str(clip.model_name), Path(str(clip.weights_path))
    name = f"{model}:{weights_sha256(path, cache_dir)[:12]}"
    if clip.model_name is not None:  # another normalisation is another extractor (the tiny CLIP's is fixed)
        name += "".join(f",{k.removeprefix('image_')}={'/'.join(f'{v:g}' for v in values)}"
                        for k, values in clip_normalisation(clip).items())
    return name + (",quickgelu" if clip.get("force_quick_gelu", False) else "")


def inception_extractor_name(cfg_eval: DictConfig, cache_dir: str | Path | None = None) -> str | None:
    """Names the Inception weights by content, "inception-v3-2048:<sha256[:12]>"; None when Inception is off."""
    path = cfg_eval.inception.weights_path
    return None if path is None else f"inception-v3-2048:{weights_sha256(str(path), cache_dir)[:12]}"


def load_clip_extractor(cfg_eval: DictConfig, device: torch.device):
    """The CLIP feature extractor of the evaluation: the configured open_clip model, or the tiny CLIP."""
    from src.metrics.clip import ClipFeatureExtractor

    clip = cfg_eval.clip
    if clip.model_name is None:
        from src.text import tiny_clip
        from src.text.checkpoints import read_sidecar, verify_checksum

        verify_checksum(tiny_clip.WEIGHTS_PATH, read_sidecar(tiny_clip.WEIGHTS_PATH)["sha256"])
        return ClipFeatureExtractor(
            tiny_clip.MODEL_NAME, tiny_clip.WEIGHTS_PATH, device=device,
            image_mean=tiny_clip.IMAGE_MEAN, image_std=tiny_clip.IMAGE_STD, config_key="eval.clip.weights_path",
        )
    return ClipFeatureExtractor(clip.model_name, clip.weights_path, device=device, config_key="eval.clip.weights_path",
                                force_quick_gelu=bool(clip.get("force_quick_gelu", False)),
                                **clip_normalisation(clip))


# ---- what is wanted, what is missing ------------------------------------------------------------------------
def decoder_for(cfg: DictConfig, meta: dict | None = None) -> str | None:
    """The decoder's name (src.evaluation.decoding.decoder_name) for the run's shards (meta: their meta.json, read
    from cfg.data.train_dir when not given); "unknown" when the shards or the autoencoder are not at hand (a sweep
    read off the cluster: any stored record counts; a job or src.evaluate refuses to start without them)."""
    from src.data.shards import read_meta
    from src.evaluation.decoding import decoder_name

    try:
        meta = meta if meta is not None else read_meta(cfg.data.train_dir)
        return decoder_name(meta, OmegaConf.select(cfg, "eval.autoencoder_path"),
                            OmegaConf.select(cfg, "paths.cache_dir"))
    except Exception:  # noqa: BLE001 -- no shards, no meta.json, no autoencoder, an unresolvable path: not at hand
        return "unknown"


def wanted_for(cfg: DictConfig, formulation=None, meta: dict | None = None) -> list[dict[str, Any]]:
    """Every record the configuration asks for (src.results.wanted_records), for the run's formulation (meta: the
    training shards' meta.json, read when not given)."""
    if formulation is None:
        from src.formulations import from_config

        formulation = from_config(OmegaConf.to_container(cfg.loss, resolve=True))
    recipe = {"recipe": formulation.name, "family": formulation.family, "params": formulation.params()}
    cache_dir = OmegaConf.select(cfg, "paths.cache_dir")
    from src.sampling.registry import sampler_code

    return wanted_records(cfg, recipe, feature_extractor_name(cfg.eval, cache_dir),
                          inception_extractor_name(cfg.eval, cache_dir),
                          sampler_code(str(OmegaConf.select(cfg, "sampler.name", default=DEFAULT_SAMPLER))),
                          decoder_for(cfg, meta))


def missing_for(cfg: DictConfig, run_dir: str | Path, formulation=None, meta: dict | None = None
                ) -> list[dict[str, Any]]:
    """The wanted records results.json lacks ([] when the evaluation is disabled). A record of another checkpoint
    step than the checkpoint the evaluation would use now counts as missing: it was scored before training went on
    (an unfinished run evaluated, then resumed), or from last.ckpt in place of a lost best.ckpt, so its numbers are
    not this model's. Raises MissingBestCheckpoint as checkpoint_step does."""
    if not cfg.eval.enabled:
        return []
    which = str(OmegaConf.select(cfg.eval, "checkpoint", default="best"))
    records = of_step(read_results(run_dir), which, checkpoint_step(run_dir, which))
    return missing_records(records, wanted_for(cfg, formulation, meta), run_dir,
                           need_inception=cfg.eval.inception.weights_path is not None,
                           cache_dir=OmegaConf.select(cfg, "paths.cache_dir"))


def checkpoint_step(run_dir: str | Path, which: str) -> int | None:
    """The training step of the checkpoint an evaluation would use now; None when there is none or it is unreadable
    (the evaluation then says so). For a best.ckpt lost after validation chose it, the step chosen: records of it
    are still its results (scored before it was lost); raises MissingBestCheckpoint where last.ckpt does not say the
    step (runs before BestCheckpoint), as no stored record can then be told to be of that model."""
    try:
        path = select_checkpoint(run_dir, which)
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except MissingBestCheckpoint as e:
        if e.step is None:
            raise
        return e.step
    except Exception:  # noqa: BLE001
        return None


def describe(cfg: DictConfig, run_dir: str | Path, missing: list[dict[str, Any]]) -> str:
    """e.g. "eval.n_samples=200": what the missing records differ in from the stored ones; "checkpoint step 300
    (the stored records are of step 120)" for records scored before training went on."""
    records = read_results(run_dir)
    which = str(OmegaConf.select(cfg.eval, "checkpoint", default="best"))
    step = checkpoint_step(run_dir, which)
    current = of_step(records, which, step)
    stale = sorted({r["checkpoint_step"] for r in records if r not in current})
    if stale and not current:
        return f"checkpoint step {step} (the stored records are of step {', '.join(map(str, stale))})"
    return describe_missing(missing, current)


def reference_dataset_id(cfg_data: DictConfig, eval_set: dict, decoder: str | None) -> str:
    """The evaluation set's key in the reference-statistics cache: its name and count, a digest of its meta.json (a
    folder written again, e.g. at another resolution, is another set: its statistics are not served from the former
    one's), and for latent shards the decoder of its reconstructions. Not its path: meta.json already tells sets
    apart (the source files' sha256, the settings, the time written), and a folder moved or copied to node-local disk
    is the same set, whose statistics (an Inception pass over every image) need not be computed again."""
    own = eval_set["meta"]
    digest = hashlib.sha256(json.dumps(own, sort_keys=True, default=str).encode()).hexdigest()[:12]
    dataset_id = f"{cfg_data.name}:{own['count']}:{digest}"
    if decoder is not None:  # latent shards: the references are this autoencoder's reconstructions
        dataset_id += f":{decoder}"
    return dataset_id


# ---- the evaluation -----------------------------------------------------------------------------------------
def evaluate_run(cfg: DictConfig, run_dir: str | Path, device: torch.device | str | None = None,
                 on_setting: OnSetting | None = None, loggers: Iterable = (), meta: dict | None = None
                 ) -> list[dict[str, Any]]:
    """Sample and score every wanted record results.json lacks; returns the wanted records (old and new).

    cfg: the run's resolved configuration (data.train_dir / eval_dir filled in). device: default the first GPU
    when there is one, else the CPU. loggers: Lightning loggers the metrics are logged to. meta: the training
    shards' meta.json (read from cfg.data.train_dir when not given).
    """
    from src.data.shards import load_eval_set, read_meta
    from src.evaluation.decoding import decoder_name, make_decoder, reference_images
    from src.evaluation.evaluate import SamplerSetting, evaluate_backbone
    from src.formulations import from_config
    from src.metrics.reference import reference_features

    run_dir, ev = Path(run_dir), cfg.eval
    check_eval_files(ev)
    formulation = from_config(OmegaConf.to_container(cfg.loss, resolve=True))
    meta = meta if meta is not None else read_meta(cfg.data.train_dir)
    wanted = wanted_for(cfg, formulation, meta)
    missing = missing_for(cfg, run_dir, formulation, meta)
    if not missing:
        return select_current(read_results(run_dir), wanted)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    which = str(OmegaConf.select(ev, "checkpoint", default="best"))
    path = select_checkpoint(run_dir, which)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step, state = int(ckpt["global_step"]), ckpt["state_dict"]
    except Exception as e:  # truncated or foreign: name the file and the way out
        other = "eval.checkpoint=last" if which == "best" else "eval.checkpoint=best"
        raise ValueError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first_line(e)}); restore it, "
                         f"or evaluate the other one with {other}") from e
    log.info("evaluating %s (step %d): %d record(s)", path.name, step, len(missing))

    extractor = load_clip_extractor(ev, device)
    if feature_extractor_name(ev, cfg.paths.cache_dir) != wanted[0]["feature_extractor"]:
        # Replaced since the wanted records were named: their name would not be these weights'.
        raise RuntimeError("eval.clip: the weights file changed while the evaluation started; run it again")
    # Every image (the references), the prompts sampled; normalised as the training split, as `decode` expects.
    eval_set = load_eval_set(cfg.data.eval_dir, prompts=int(ev.n_samples), stats=meta)
    decode = make_decoder(meta, ev.get("autoencoder_path"), device)
    if decoder_name(meta, ev.get("autoencoder_path"), cfg.paths.cache_dir) != wanted[0]["decoder"]:
        raise RuntimeError("eval.autoencoder_path: the autoencoder's files changed while the evaluation started; run "
                           "it again")
    dataset_id = reference_dataset_id(cfg.data, eval_set, wanted[0]["decoder"])
    cache = Path(cfg.paths.cache_dir) / "reference"
    images = lambda: reference_images(eval_set, decode)  # noqa: E731 -- only computed on a cache miss
    reference = reference_features(extractor.id, dataset_id, images, extractor, cache)
    inception = None
    if ev.inception.weights_path is not None:
        from src.metrics.inception import InceptionFeatureExtractor

        inc = InceptionFeatureExtractor(ev.inception.weights_path, device=device,
                                         config_key="eval.inception.weights_path")
        if inception_extractor_name(ev, cfg.paths.cache_dir) != wanted[0]["inception_extractor"]:
            raise RuntimeError("eval.inception: the weights file changed while the evaluation started; run it again")
        inception = (inc, reference_features(inc.id, dataset_id, images, inc, cache))

    first = wanted[0]
    base = {k: first[k] for k in ("recipe", "family", "params", "dataset", "tags", "train_seed", "backbone",
                                  "sampler", "feature_extractor", "checkpoint", "inception_extractor",
                                  "sampler_code", "decoder")}
    base.update(checkpoint_step=step, config=OmegaConf.to_container(cfg, resolve=True))
    total, done = len(missing), 0

    def progress(setting, seconds: float) -> None:
        nonlocal done
        done += 1
        if on_setting is not None:
            on_setting(done, total, setting.label, int(ev.n_samples), seconds)

    backbone = unsharded_backbone(cfg.model, device)
    for use_ema in ev.ema:
        settings = [SamplerSetting(m["steps"], m["cfg"], m["shift"]) for m in missing if m["ema"] == bool(use_ema)]
        if not settings:
            continue
        backbone.load_state_dict(backbone_weights(state, bool(use_ema)))
        backbone.eval()
        evaluate_backbone(
            backbone, formulation, eval_set, settings, extractor, n_samples=int(ev.n_samples), seed=int(ev.seed),
            batch_size=int(ev.batch_size), decode=decode, out_dir=run_dir, ema=bool(use_ema), base_record=base,
            reference=reference, inception=inception, progress=progress,
        )
    records = select_current(read_results(run_dir), wanted)
    log_metrics(records, loggers, step, run_dir)
    return records


def log_metrics(records: list[dict], loggers: Iterable, step: int, run_dir: Path) -> None:
    """The records' metrics (and, for W&B, the sample grids) to the run's loggers."""
    loggers = list(loggers)
    if not loggers or not records:
        return
    metrics = {}
    for r in records:
        tag = f"eval/{'ema' if r['ema'] else 'raw'}/{r['steps']}steps_cfg{r['cfg']:g}"
        metrics[f"{tag}/clip_score"] = r["clip_score"]
        metrics[f"{tag}/fid_clip"] = r["fid_clip"]
        if r.get("fid_inception") is not None:
            metrics[f"{tag}/fid_inception"] = r["fid_inception"]
    for lg in loggers:
        lg.log_metrics(metrics, step=step)
        if type(lg).__name__ == "WandbLogger":
            grids = [(run_dir / r["arrays"].replace(".npz", ".png"), r) for r in records]
            grids = [(g, r) for g, r in grids if g.exists()]
            if grids:
                lg.log_image("eval/samples", [str(g) for g, _ in grids],
                             caption=[f"{r['setting']}, {'ema' if r['ema'] else 'raw'}" for _, r in grids], step=step)
