"""Does the embedded default learn something a user can see? `python -m src.evaluation.learning_check RUN_DIR`.

Compares the trained run (EMA weights of its selected checkpoint) with the same backbone at initialisation on
digit prompts of the evaluation split: FID on CLIP features against the evaluation images, and the tiny CLIP's
zero-shot accuracy on the generated images (is the sample classified as the digit it was prompted with?).
Writes learning_check.json into the run directory and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

from src.data.digits import class_captions
from src.data.shards import decode_latents, load_eval_set
from src.evaluation.run import backbone_weights, load_clip_extractor, select_checkpoint
from src.results import read_results
from src.formulations import from_config
from src.metrics.frechet import fid_from_features
from src.sampling import initial_noise, sample
from src.utils.io import atomic_write_json


def zero_shot_labels(extractor, images: torch.Tensor) -> torch.Tensor:
    """The digit class whose mean caption embedding is closest to each image (prompt ensembling)."""
    classes = torch.stack([extractor.text_features(c).mean(0) for c in class_captions()])
    classes = classes / classes.norm(dim=-1, keepdim=True)
    return (extractor.image_features(images) @ classes.T).argmax(dim=1)


def generate(backbone, formulation, eval_set, n: int, steps: int, cfg_scale: float, seed: int, meta: dict) -> torch.Tensor:
    """Pixels of n samples for the first n evaluation prompts (common random numbers)."""
    noise = initial_noise(n, tuple(eval_set["x0"].shape[1:]), seed)
    x0 = sample(backbone, formulation, noise, eval_set["context"][:n], eval_set["pooled"][:n], steps, cfg_scale)
    return decode_latents(x0, meta).clamp(-1, 1)


def learning_check(run_dir: str | Path, n: int = 200, steps: int = 25, cfg_scale: float = 5.0) -> dict:
    run_dir = Path(run_dir)
    records = read_results(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir}: no results.json; train and evaluate the run first")
    cfg = OmegaConf.create(records[0]["config"])
    if cfg.data.name != "digits":
        raise ValueError(f"data.name={cfg.data.name}: the learning check classifies digits; run it on a digits run")
    formulation = from_config(OmegaConf.to_container(cfg.loss))
    torch.manual_seed(cfg.seed)  # the same initialisation the run started from
    untrained = hydra.utils.instantiate(cfg.model).eval()
    trained = copy.deepcopy(untrained)
    best = select_checkpoint(run_dir, "best")
    state = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    trained.load_state_dict(backbone_weights(state, ema=True))

    eval_set = load_eval_set(cfg.data.eval_dir)
    n = min(n, len(eval_set["captions"]))
    extractor = load_clip_extractor(cfg.eval, torch.device("cpu"))
    reference = extractor.image_features(eval_set["images"])
    labels = eval_set["labels"][:n]
    out = {"run_dir": str(run_dir), "recipe": formulation.name, "n_samples": n, "steps": steps, "cfg": cfg_scale,
           "chance_accuracy": 0.1,
           "real_images_zero_shot_accuracy": float((zero_shot_labels(extractor, eval_set["images"][:n]) == labels).float().mean())}
    for name, backbone in (("untrained", untrained), ("trained", trained)):
        images = generate(backbone, formulation, eval_set, n, steps, cfg_scale, int(cfg.eval.seed), eval_set["meta"])
        out[f"{name}_fid_clip"] = fid_from_features(extractor.image_features(images), reference)
        out[f"{name}_zero_shot_accuracy"] = float((zero_shot_labels(extractor, images) == labels).float().mean())
    atomic_write_json(run_dir / "learning_check.json", out)
    return out


def _at_least(low: float, kind=int):
    """An argparse type: a number of this kind >= low (else argparse's one-line error naming the option)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or value < low:  # (value != value: nan)
            raise argparse.ArgumentTypeError(f"{text}: must be {'an integer' if kind is int else 'a number'} >= {low}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--n", type=_at_least(2), default=200, help="samples (>= 2: FID needs two)")
    parser.add_argument("--steps", type=_at_least(1), default=25)
    parser.add_argument("--cfg", type=_at_least(0.0, float), default=5.0)
    args = parser.parse_args(argv)
    try:
        result = learning_check(args.run_dir, args.n, args.steps, args.cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
