"""Plain evaluation of a trained backbone at the paper's sampler settings (docs/evaluation.md#evaluation-protocol), no Lightning.

For each setting: sample n prompts of the evaluation set with common random numbers (the noise of prompt k
depends only on (seed, k)), decode to pixels, embed with CLIP (and optionally Inception), and write the
per-sample arrays, a PNG grid of the first 64 samples and one record into results.json. Settings whose
record is already complete are skipped, and each finished setting is merged into results.json at once, so an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from src.evaluation.grids import quantize, save_labelled_grid
from src.formulations.base import Formulation
from src.metrics.clip import clip_score
from src.metrics.frechet import feature_statistics, frechet_distance
from src.metrics.reference import ReferenceFeatures
from src.results import (
    DEFAULT_SAMPLER, FID_FEATURES, Record, _num, merge_results, missing_records, of_step, read_results,
    record_identity, run_fields, setting_label,
)
from src.sampling import initial_noise, sample
from src.sampling.noise import _index_seed
from src.utils.io import save_npz

log = logging.getLogger(__name__)

GRID_SAMPLES = 64
EVAL_SUBDIR = "eval"
SAMPLER_STREAM = 1  # _index_seed stream of a stochastic sampler's draws (the initial noise is stream None)


@dataclass(frozen=True)
class SamplerSetting:
    """Euler steps, CFG scale and timestep shift of one sampler setting (docs/evaluation.md#sampler-settings)."""

    steps: int
    cfg: float
    shift: float = 1.0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler setting steps={self.steps!r}: must be an integer >= 1")
        for name, value, low in (("cfg", self.cfg, 0.0), ("shift", self.shift, 0.0)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < low or (name == "shift" and value == 0):
                raise ValueError(f"sampler setting {name}={value!r}: must be a finite number "
                                 f"{'> 0' if name == 'shift' else '>= 0'}")

    @property
    def label(self) -> str:
        """e.g. "50 steps, cfg 5.0" (", shift 3.0" appended when shifted)."""
        return setting_label(self.steps, self.cfg, self.shift)


#: The paper's six settings: 50 steps at CFG 1.0, 2.5, 5.0; 5, 10, 25 steps at CFG 5.0 (section 5.1).
PAPER_SETTINGS = (
    SamplerSetting(50, 1.0),
    SamplerSetting(50, 2.5),
    SamplerSetting(50, 5.0),
    SamplerSetting(5, 5.0),
    SamplerSetting(10, 5.0),
    SamplerSetting(25, 5.0),
)


@dataclass(frozen=True)
class EvalPrompts:
    """The evaluation prompts: captions, text conditioning (context (N, L, D), pooled (N, D)), latent shape."""

    captions: list[str]
    context: Tensor
    pooled: Tensor
    latent_shape: tuple[int, ...]

    @classmethod
    def from_any(cls, eval_set: Any) -> "EvalPrompts":
        """From a mapping or an object with captions, context, pooled and latent_shape (or x0 to take it from)."""
        get = eval_set.get if isinstance(eval_set, Mapping) else lambda k: getattr(eval_set, k, None)
        missing = [k for k in ("captions", "context", "pooled") if get(k) is None]
        if missing:
            raise ValueError(f"eval_set lacks {missing}; needs captions, context, pooled and latent_shape (or x0)")
        shape = get("latent_shape") or (tuple(get("x0").shape[1:]) if get("x0") is not None else None)
        if not shape:
            raise ValueError("eval_set needs latent_shape (C, H, W) or x0 to take the latent shape from")
        captions, context, pooled = list(get("captions")), get("context"), get("pooled")
        if not (len(captions) == context.shape[0] == pooled.shape[0]) or not captions:
            raise ValueError(f"eval_set: captions ({len(captions)}), context ({context.shape[0]}) and pooled "
                             f"({pooled.shape[0]}) must have the same non-zero length")
        return cls(captions, context, pooled, tuple(int(s) for s in shape))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def _stem(record: Mapping[str, Any]) -> str:
    """File name stem of a record's arrays and grid: readable settings, then a digest of its whole identity, so
    records kept apart by other settings (n_samples, eval seed, extractor, ...) never share a file."""
    digest = hashlib.sha1(repr(record_identity(record)).encode()).hexdigest()[:8]
    return (f"{_slug(record['recipe'])}__{_slug(record['dataset'])}__{'ema' if record['ema'] else 'raw'}__"
            f"{record['steps']}steps_cfg{_num(record['cfg'])}_shift{_num(record['shift'])}__{digest}")


def _stem_beside(record: Mapping[str, Any], stored: Sequence[Mapping[str, Any]], out_dir: Path) -> str:
    """_stem, with the checkpoint step added where a stored record of another step (kept: a run trained longer)
    names that file: the new samples must not overwrite its arrays."""
    stem, step = _stem(record), record.get("checkpoint_step")
    taken = {r.get("arrays") for r in stored if r.get("checkpoint_step") != step}
    return f"{stem}__step{step}" if _rel(out_dir / EVAL_SUBDIR / f"{stem}.npz", out_dir) in taken else stem


def _rel(path: Path, root: Path) -> str:
    """path relative to root when inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _device_of(backbone: Any, fallback: torch.device) -> torch.device:
    if isinstance(backbone, torch.nn.Module):
        for p in backbone.parameters():
            return p.device
    return fallback


@contextmanager
def _eval_mode(backbone: Any) -> Iterator[None]:
    training = isinstance(backbone, torch.nn.Module) and backbone.training
    if training:
        backbone.eval()
    try:
        yield
    finally:
        if training:
            backbone.train()


def _base_fields(formulation: Formulation, base_record: Mapping[str, Any], extractor: Any,
                 inception: Any = None) -> dict[str, Any]:
    """The fields every record of this call shares; settings not given take the defaults of a plain evaluation."""
    if "dataset" not in base_record:
        raise ValueError(f"base_record needs 'dataset' (the evaluation set's name); got keys {sorted(base_record)}")
    return {
        "recipe": base_record.get("recipe", formulation.name),
        "family": base_record.get("family", formulation.family),
        "params": dict(base_record.get("params", formulation.params())),
        "dataset": str(base_record["dataset"]),
        "tags": dict(base_record.get("tags", {})),
        "train_seed": base_record.get("train_seed"),
        "backbone": base_record.get("backbone", run_fields({})["backbone"]),
        "sampler": str(base_record.get("sampler", DEFAULT_SAMPLER)),
        "feature_extractor": base_record.get("feature_extractor", getattr(extractor, "id", type(extractor).__name__)),
        "fid_features": FID_FEATURES,
        "checkpoint": str(base_record.get("checkpoint", "best")),
        "checkpoint_step": base_record.get("checkpoint_step"),
        "inception_extractor": None if inception is None else (
            base_record.get("inception_extractor") or getattr(inception[0], "id", type(inception[0]).__name__)),
        "sampler_code": base_record.get("sampler_code"),
        "decoder": base_record.get("decoder"),
        "config": dict(base_record.get("config", {})),
    }


def _text_features(extractor: Any, prompts: EvalPrompts, n: int, batch: int = 256) -> Tensor:
    """CLIP text embeddings of the prompts used (index k % N for sample k), shape (min(n, N), d)."""
    captions = prompts.captions[: min(n, len(prompts.captions))]
    return torch.cat([extractor.text_features(captions[i : i + batch]) for i in range(0, len(captions), batch)])


def sampler_kwargs(sampler: str) -> dict[str, str]:
    """{"sampler": name} when src.sampling.sample takes a sampler argument; {} for the default sampler otherwise."""
    if "sampler" in inspect.signature(sample).parameters:
        return {"sampler": sampler}
    if sampler != DEFAULT_SAMPLER:
        raise ValueError(f"sampler={sampler}: this version of src.sampling.sample has only {DEFAULT_SAMPLER!r}")
    return {}


@contextmanager
def _sampler_draws(device: torch.device, seed: int, start: int) -> Iterator[None]:
    """A stochastic sampler (one from outside may draw fresh noise at each step) draws from torch's global generators:
    seeded per batch from (seed, start), on a stream of their own, its records do not depend on what the process drew
    before (the training, another setting, a resumed evaluation), though they do on eval.batch_size (the batches'
    starts); the caller's generators are left as they were."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Its own stream: seeded as the initial noise of prompt `start` is, the first draw would be that noise again.
        torch.manual_seed(_index_seed(seed, start, stream=SAMPLER_STREAM))
        yield


def _generate(backbone, formulation, prompts: EvalPrompts, setting: SamplerSetting, extractor, inception,
              n: int, seed: int, batch_size: int, decode, device,
              sampler: str = DEFAULT_SAMPLER) -> tuple[Tensor, Tensor | None, Tensor]:
    """Sample n images in batches; returns CLIP features (n, d), Inception features or None, the grid images."""
    feats, inc_feats, grid = [], [], []
    n_prompts = len(prompts.captions)
    extra = sampler_kwargs(sampler)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        idx = torch.arange(start, stop) % n_prompts
        noise = initial_noise(stop - start, prompts.latent_shape, seed, start=start).to(device)
        context = prompts.context[idx].to(device=device, dtype=torch.float32)
        pooled = prompts.pooled[idx].to(device=device, dtype=torch.float32)
        with _sampler_draws(noise.device, seed, start):
            x0 = sample(backbone, formulation, noise, context, pooled, setting.steps, setting.cfg, setting.shift,
                        **extra)
        with torch.no_grad():
            images = decode(x0).float().clamp(-1.0, 1.0)
        feats.append(extractor.image_features(images).float().cpu())
        if inception is not None:
            inc_feats.append(inception[0].image_features(images).float().cpu())
        have = sum(len(g) for g in grid)
        if have < GRID_SAMPLES:
            grid.append(images[: GRID_SAMPLES - have].cpu())
    return torch.cat(feats), (torch.cat(inc_feats) if inception is not None else None), torch.cat(grid)


def sample_prompts(prompts: EvalPrompts, n: int) -> list[str]:
    """The caption of each of n samples (sample k is prompted with caption k % N)."""
    return [prompts.captions[k % len(prompts.captions)] for k in range(n)]


def _save_grid(images: Tensor, path: Path, prompts: Sequence[str] | None = None) -> None:
    """PNG grid, 8 per row, of images in [-1, 1], each cell enlarged and labelled with its prompt; atomic."""
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"_save_grid: {len(images)} images but {len(prompts)} prompts")
    save_labelled_grid(images, prompts, path)


def _fid(features: Tensor, reference: ReferenceFeatures) -> float:
    """NaN where a sample's features are not finite (diverged samples): the record's FID is null, its last front."""
    if not bool(torch.isfinite(features).all()):
        return math.nan
    return frechet_distance(*feature_statistics(features), reference.mu, reference.sigma)


def evaluate_backbone(
    backbone: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    formulation: Formulation,
    eval_set: Any,
    settings: Sequence[SamplerSetting | Mapping[str, float]],
    extractor: Any,
    n_samples: int,
    seed: int,
    batch_size: int,
    decode: Callable[[Tensor], Tensor],
    out_dir: str | os.PathLike,
    ema: bool,
    base_record: Mapping[str, Any],
    reference: ReferenceFeatures,
    inception: tuple[Any, ReferenceFeatures] | None = None,
    progress: Callable[[SamplerSetting, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate one backbone at each sampler setting; returns one record per setting (docs/evaluation.md#results-records).

    eval_set: captions, context, pooled (and latent_shape or x0), as a mapping (src.data's load_eval_set) or an
    object. extractor: a ClipFeatureExtractor (image_features, text_features); reference: the evaluation
    images' features from that extractor. inception: (InceptionFeatureExtractor, its ReferenceFeatures) or None.
    decode: normalised latents -> pixels in [-1, 1]. out_dir is the run directory holding results.json.
    settings: SamplerSettings or mappings {steps, cfg[, shift]}. For bf16 on a GPU, call it under torch.autocast.
    base_record: dataset, and optionally the run's other record fields (recipe, tags, train_seed, backbone,
    sampler, feature_extractor, checkpoint, checkpoint_step, config). A setting whose record is already in
    results.json with exactly these settings (src.results.missing_records) is not sampled again.
    progress(setting, seconds) is called after each setting sampled.
    """
    for name, value, low in (("n_samples", n_samples, 2), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"evaluate_backbone: {name}={value!r} must be an integer >= {low}")
    settings = [s if isinstance(s, SamplerSetting) else SamplerSetting(**s) for s in settings]
    prompts = EvalPrompts.from_any(eval_set)
    base = _base_fields(formulation, base_record, extractor, inception)
    sampler_kwargs(base["sampler"])  # an unknown sampler fails before any sampling
    out_dir = Path(out_dir)
    device = _device_of(backbone, prompts.context.device)
    # Records of this checkpoint at another step were scored before training went on: not this model's.
    existing = of_step(read_results(out_dir), base["checkpoint"], base.get("checkpoint_step"))
    text_features, results = None, []
    with _eval_mode(backbone):
        for setting in settings:
            wanted = {**base, "setting": setting.label, "steps": setting.steps, "cfg": float(setting.cfg),
                      "shift": float(setting.shift), "ema": bool(ema), "n_samples": n_samples, "eval_seed": seed}
            if not missing_records(existing, [wanted], out_dir, need_inception=inception is not None):
                log.info("skip %s: %s, %s (complete in results.json)", base["recipe"], base["dataset"], setting.label)
                results.append(next(r for r in reversed(existing) if record_identity(r) == record_identity(wanted)))
                continue
            started = time.perf_counter()
            if text_features is None:
                text_features = _text_features(extractor, prompts, n_samples)
            feats, inc_feats, grid = _generate(backbone, formulation, prompts, setting, extractor, inception,
                                               n_samples, seed, batch_size, decode, device, base["sampler"])
            scores = clip_score(feats, text_features[torch.arange(n_samples) % len(text_features)])
            stem = _stem_beside(wanted, read_results(out_dir), out_dir)
            arrays = out_dir / EVAL_SUBDIR / f"{stem}.npz"
            captions = sample_prompts(prompts, n_samples)
            extra = {} if inc_feats is None else {"inception_features": inc_feats.numpy()}
            # The grid's samples themselves ride along for the report's sample sheets (src/ranking/samples.py), as
            # the 8-bit values the sheets show: a quarter of float32's size (64 RGB samples at 256px: 12.6 MB).
            save_npz(arrays, clip_scores=scores.numpy(), features=feats.numpy(), prompts=captions,
                     grid=quantize(grid), **extra)
            _save_grid(grid, out_dir / EVAL_SUBDIR / f"{stem}.png", captions[: len(grid)])
            record = Record(
                **{k: v for k, v in wanted.items() if k not in ("checkpoint_step", "config")},
                clip_score=float(scores.double().mean()), fid_clip=_fid(feats, reference),
                fid_inception=None if inc_feats is None else _fid(inc_feats, inception[1]),
                n_reference=reference.n, checkpoint_step=base["checkpoint_step"],
                arrays=_rel(arrays, out_dir), reference_arrays=_rel(reference.path, out_dir), config=base["config"],
            ).to_dict()
            if record["clip_score"] is None or record["fid_clip"] is None:
                log.warning("%s: %s, %s, %s: samples are not finite (diverged); CLIP score and FID recorded as null",
                            base["recipe"], base["dataset"], setting.label, "EMA" if ema else "raw")
            merge_results(out_dir, [record])
            results.append(record)
            seconds = time.perf_counter() - started
            log.info("%s: %s, %s: clip_score %s, fid_clip %s (%.1f s)", base["recipe"], base["dataset"],
                     setting.label, record["clip_score"], record["fid_clip"], seconds)
            if progress is not None:
                progress(setting, seconds)
    return results
