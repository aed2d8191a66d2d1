"""The evaluation callback: after training, sample and score the checkpoint with the lowest EMA validation loss.

docs/evaluation.md#evaluation-protocol: six sampler settings, each with EMA and raw weights; CLIP score and FID on CLIP features (and
Inception FID where its weights are configured). The feature extractors live here, not in the LightningModule,
so they never end up in checkpoints or in the EMA copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from src.config import ConfigError
from src.data.shards import load_eval_set
from src.evaluation.decoding import make_decoder, reference_images
from src.evaluation.evaluate import SamplerSetting, evaluate_backbone
from src.metrics.reference import reference_features

log = logging.getLogger(__name__)


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
                                force_quick_gelu=bool(clip.get("force_quick_gelu", False)))


def check_eval_files(cfg_eval: DictConfig) -> None:
    """Missing weight files are configuration errors, found before training starts."""
    for key in ("clip.weights_path", "inception.weights_path"):
        path = OmegaConf.select(cfg_eval, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"eval.{key}={path}: file not found (weights are loaded from local files only)")
    if cfg_eval.clip.model_name is not None and cfg_eval.clip.weights_path is None:
        raise ConfigError(f"eval.clip.weights_path=None: required with eval.clip.model_name={cfg_eval.clip.model_name}")


def ranked_name(recipe: str, cfg: DictConfig) -> str:
    """The entry a run is ranked as: the recipe, qualified by a backbone other than the study's MM-DiT (the backbone
    comparison) and by the run's swept values (run_tag, e.g. a learning-rate sweep), each variant its own entry."""
    backbone = str(cfg.model.get("_target_", "MMDiT")).rsplit(".", 1)[-1]
    tag = str(cfg.get("run_tag") or "").strip("/")
    swept_model = any(part.startswith("model=") for part in tag.split(","))  # the tag names the backbone already
    qualifiers = [backbone] if backbone != "MMDiT" and not swept_model else []
    if tag:
        qualifiers.append(tag)
    return f"{recipe} [{', '.join(qualifiers)}]" if qualifiers else recipe


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


class EvaluationCallback(L.Callback):
    """Runs the evaluation protocol once training has finished (or at once, when resuming a finished run)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, meta: dict):
        check_eval_files(cfg.eval)
        self.cfg, self.run_dir, self.meta = cfg, Path(run_dir), meta

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_rank != 0:
            return
        # The trainer's device, not pl_module.device: Lightning's teardown has moved the module to the CPU by now.
        self.evaluate(pl_module, trainer.loggers, device=trainer.strategy.root_device)

    def _selected_checkpoint(self) -> Path:
        ckpt_dir = self.run_dir / "checkpoints"
        best = ckpt_dir / "best.ckpt"
        return best if best.exists() else ckpt_dir / "last.ckpt"

    def evaluate(self, pl_module, loggers=(), device: torch.device | None = None) -> list[dict]:
        """Sample and score the selected checkpoint on `device` (default: the module's); returns the records."""
        cfg, ev = self.cfg, self.cfg.eval
        device = torch.device(device) if device is not None else pl_module.device
        path = self._selected_checkpoint()
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step = int(ckpt["global_step"])
        state = ckpt["state_dict"]
        log.info("evaluating %s (step %d)", path.name, step)

        extractor = load_clip_extractor(ev, device)
        eval_set = load_eval_set(cfg.data.eval_dir)
        decode = make_decoder(self.meta, ev.get("autoencoder_path"), device)
        dataset_id = f"{cfg.data.name}:{Path(cfg.data.eval_dir).resolve()}:{eval_set['meta']['count']}"
        cache = Path(cfg.paths.cache_dir) / "reference"
        images = lambda: reference_images(eval_set, decode)  # noqa: E731 -- only computed on a cache miss
        reference = reference_features(extractor.id, dataset_id, images, extractor, cache)
        inception = None
        if ev.inception.weights_path is not None:
            from src.metrics.inception import InceptionFeatureExtractor

            inc = InceptionFeatureExtractor(ev.inception.weights_path, device=device)
            inception = (inc, reference_features(inc.id, dataset_id, images, inc, cache))

        settings = [SamplerSetting(int(s["steps"]), float(s["cfg"]), float(ev.shift)) for s in ev.settings]
        base = {
            "recipe": ranked_name(pl_module.formulation.name, cfg),
            "dataset": cfg.data.name,
            "checkpoint_step": step,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        records = []
        backbone = unsharded_backbone(cfg.model, device)
        for use_ema in ev.ema:
            prefix = "ema_backbone." if use_ema else "backbone."
            backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            backbone.eval()
            records += evaluate_backbone(
                backbone, pl_module.formulation, eval_set, settings, extractor, n_samples=int(ev.n_samples),
                seed=int(ev.seed), batch_size=int(ev.batch_size), decode=decode,
                out_dir=self.run_dir, ema=bool(use_ema), base_record=base, reference=reference, inception=inception,
            )
        self._log(records, loggers, step)
        return records

    def _log(self, records: list[dict], loggers, step: int) -> None:
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
                grids = [(self.run_dir / r["arrays"].replace(".npz", ".png"), r) for r in records]
                grids = [(g, r) for g, r in grids if g.exists()]
                if grids:
                    lg.log_image("eval/samples", [str(g) for g, _ in grids],
                                 caption=[f"{r['setting']}, {'ema' if r['ema'] else 'raw'}" for _, r in grids], step=step)
