"""Train the tiny CLIP on both embedded datasets' training splits and commit-ready save it (docs/data.md#tiny-clip).

python -m src.text.train_tiny_clip [--steps N] [--out assets/tiny_clip/tiny_clip.pt]

Contrastive CLIP training with one change for small label spaces: a batch holds many images of the same class
(ten digits), so every caption of the image's class counts as a positive (soft targets), instead of treating
same-class pairs as negatives. Digit captions are redrawn from the class's names at every step, as the paper
does for ImageNet. Rows of the token embedding for tokens absent from every training caption (padding
included) get no gradient; they are zeroed before saving, so unseen words carry no random signal and the file
compresses well in git. Accuracies are measured on the held-out splits with the saved file, loaded back through
open_clip.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from src.data import digits, shapes
from src.text import tiny_clip


# ----------------------------------------------------------------------------------------------------------------
# Training data: images, a class id per image, candidate captions per class
# ----------------------------------------------------------------------------------------------------------------

def training_pools() -> dict:
    """Both training splits as tensors: RGB images, class ids (digits 0..9, shapes 10 + label), caption table."""
    dig, shp = digits.load_digits_split("train"), shapes.load_shapes_split("train")
    class_captions = digits.class_captions() + [[c] for c in shapes.class_captions()]
    captions = [c for group in class_captions for c in group]
    owner = torch.tensor([k for k, group in enumerate(class_captions) for _ in group])
    return {
        "digits_images": dig.images.expand(-1, 3, -1, -1).contiguous(),
        "digits_classes": dig.labels,
        "shapes_images": shp.images,
        "shapes_classes": shp.labels + len(digits.WORDS),
        "captions": captions,  # every candidate caption of every class
        "caption_class": owner,  # class id of each candidate caption
    }


def sample_batch(pools: dict, tokens: torch.Tensor, batch_size: int, g: torch.Generator):
    """Half digits, half shapes; each image with one caption drawn from its class's candidates."""
    half = batch_size // 2
    di = torch.randint(len(pools["digits_classes"]), (half,), generator=g)
    si = torch.randint(len(pools["shapes_classes"]), (batch_size - half,), generator=g)
    images = torch.cat([pools["digits_images"][di], pools["shapes_images"][si]])
    classes = torch.cat([pools["digits_classes"][di], pools["shapes_classes"][si]])
    # Draw a caption of each image's class: random scores, masked to the class's candidates, argmax.
    match = pools["caption_class"][None, :] == classes[:, None]
    scores = torch.rand(match.shape, generator=g).masked_fill(~match, -1.0)
    return images, tokens[scores.argmax(dim=1)], classes


def contrastive_loss(image_features, text_features, logit_scale, classes) -> torch.Tensor:
    """Symmetric CLIP cross-entropy with soft targets spread over same-class pairs."""
    logits = logit_scale * image_features @ text_features.T
    same = (classes[:, None] == classes[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train(steps: int = 1000, batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.1,
          warmup: int = 100, seed: int = 0, log_every: int = 100) -> tuple[torch.nn.Module, dict]:
    """Train a fresh tiny CLIP; returns the model and a summary of the run."""
    pools = training_pools()
    model = tiny_clip.create_tiny_clip(seed)
    tokenizer = open_clip.get_tokenizer(tiny_clip.MODEL_NAME)
    tokens = tokenizer(pools["captions"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        images, text, classes = sample_batch(pools, tokens, batch_size, g)
        img_f = model.encode_image(images, normalize=True)
        txt_f = model.encode_text(text, normalize=True)
        loss = contrastive_loss(img_f, txt_f, model.logit_scale.exp().clamp(max=100.0), classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    model.eval()
    zeroed = zero_unused_token_rows(model, tokens)
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
               "warmup": warmup, "seed": seed, "train_seconds": round(time.perf_counter() - start, 1),
               "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
               "final_loss": round(loss.item(), 4), "token_rows_zeroed": zeroed,
               "train_images": {"digits": len(pools["digits_classes"]), "shapes": len(pools["shapes_classes"])}}
    return model, summary


@torch.no_grad()
def zero_unused_token_rows(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Zero the token-embedding rows of ids absent from the training captions; returns how many."""
    used = torch.zeros(model.token_embedding.weight.shape[0], dtype=torch.bool)
    used[tokens.unique()] = True
    model.token_embedding.weight[~used] = 0.0
    return int((~used).sum())


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def class_text_features(model, tokenizer, class_captions: list[list[str]]) -> torch.Tensor:
    """One normalised text embedding per class: the mean of its captions' embeddings (prompt ensembling)."""
    feats = [F.normalize(tiny_clip.encode_texts(model, tokenizer, caps).mean(0), dim=-1) for caps in class_captions]
    return torch.stack(feats)


@torch.no_grad()
def evaluate(model, tokenizer) -> dict:
    """Held-out accuracies: digits 10-way zero-shot; shapes over its distinct captions, and per attribute."""
    dig, shp = digits.load_digits_split("eval"), shapes.load_shapes_split("eval")
    pred_d = (tiny_clip.encode_images(model, dig.images) @ class_text_features(
        model, tokenizer, digits.class_captions()).T).argmax(1)
    pred_s = (tiny_clip.encode_images(model, shp.images) @ class_text_features(
        model, tokenizer, [[c] for c in shapes.class_captions()]).T).argmax(1)
    pred_attr = [shapes.label_attributes(int(k)) for k in pred_s]
    true_attr = [shapes.label_attributes(int(k)) for k in shp.labels]
    per_attr = {name: sum(p[i] == t[i] for p, t in zip(pred_attr, true_attr)) / len(true_attr)
                for i, name in enumerate(("color", "shape", "position"))}
    return {
        "digits_zero_shot_10way": round((pred_d == dig.labels).float().mean().item(), 4),
        "digits_eval_images": len(dig),
        f"shapes_zero_shot_{shapes.NUM_CLASSES}way": round((pred_s == shp.labels).float().mean().item(), 4),
        **{f"shapes_{k}": round(v, 4) for k, v in per_attr.items()},
        "shapes_eval_images": len(shp),
        "chance": {"digits": 0.1, "shapes_caption": round(1 / shapes.NUM_CLASSES, 4),
                   "color": round(1 / len(shapes.COLORS), 4), "shape": 1 / len(shapes.SHAPES),
                   "position": 1 / len(shapes.POSITIONS)},
    }


def main(argv: list[str] | None = None) -> dict:
    """Train, save atomically with checksum, reload through open_clip, evaluate, record accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=tiny_clip.WEIGHTS_PATH)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 2:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed; need >= 2")
    torch.manual_seed(args.seed)
    model, summary = train(args.steps, args.batch_size, args.lr, seed=args.seed)
    sha = tiny_clip.save_tiny_clip(model, args.out, {"training": summary})
    loaded, tokenizer = tiny_clip.load_tiny_clip(args.out, sha256=sha)
    accuracies = evaluate(loaded, tokenizer)
    tiny_clip.update_tiny_clip_meta(args.out, {"accuracies": accuracies})
    print(f"wrote {args.out} (sha256 {sha[:16]}...)")
    for k, v in accuracies.items():
        print(f"  {k}: {v}")
    return accuracies


if __name__ == "__main__":
    main()
