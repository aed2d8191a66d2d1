"""The committed tiny CLIP: checksum, held-out zero-shot accuracy well above chance; the training script's pieces."""

import json
import math

import pytest
import torch

from src.data import digits, shapes
from src.text import tiny_clip, train_tiny_clip
from src.text.checkpoints import sha256_file

META = json.loads(tiny_clip.WEIGHTS_PATH.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def committed():
    return tiny_clip.load_tiny_clip()


def test_committed_weights_match_their_checksum():
    assert sha256_file(tiny_clip.WEIGHTS_PATH) == META["sha256"]
    assert META["model_name"] == tiny_clip.MODEL_NAME and META["config"] == tiny_clip.model_config()
    assert tiny_clip.WEIGHTS_PATH.stat().st_size < 10e6


def test_held_out_digits_zero_shot_accuracy(committed):
    model, tokenizer = committed
    data = digits.load_digits_split("eval")
    with torch.no_grad():
        text = train_tiny_clip.class_text_features(model, tokenizer, digits.class_captions())
        predicted = (tiny_clip.encode_images(model, data.images) @ text.T).argmax(1)
    accuracy = (predicted == data.labels).float().mean().item()
    assert accuracy > 0.85  # chance is 0.10
    assert accuracy == pytest.approx(META["accuracies"]["digits_zero_shot_10way"], abs=1e-3)


def test_held_out_shapes_zero_shot_accuracy(committed):
    model, tokenizer = committed
    data = shapes.load_shapes_split("eval")
    with torch.no_grad():
        text = tiny_clip.encode_texts(model, tokenizer, shapes.class_captions())
        predicted = (tiny_clip.encode_images(model, data.images) @ text.T).argmax(1)
    assert (predicted == data.labels).float().mean().item() > 0.8  # chance is 1/120


def test_contrastive_loss_soft_targets():
    classes = torch.tensor([0, 0, 1, 2])
    feats = torch.eye(4)[[0, 0, 1, 2]]
    # matching features at a high temperature reach the floor, the targets' entropy: log 2 in two of four rows
    loss = train_tiny_clip.contrastive_loss(feats, feats, 100.0, classes)
    assert loss.item() == pytest.approx(math.log(2) / 2, abs=1e-4)
    shuffled = train_tiny_clip.contrastive_loss(feats, feats[[2, 3, 0, 1]], 100.0, classes)
    assert shuffled > loss + 10


def test_zero_unused_token_rows():
    model = tiny_clip.create_tiny_clip(seed=0)
    tokens = torch.tensor([[49406, 320, 49407, 0], [49406, 321, 49407, 0]])
    n = train_tiny_clip.zero_unused_token_rows(model, tokens)
    weight = model.token_embedding.weight
    assert n == weight.shape[0] - 5
    assert weight[[320, 321, 49406, 49407]].abs().sum() > 0 and weight[[1, 322, 1000]].abs().sum() == 0


def test_batches_mix_both_datasets_with_class_captions():
    pools = train_tiny_clip.training_pools()
    tokens = torch.arange(len(pools["captions"]))[:, None]  # token row k stands for caption k
    g = torch.Generator().manual_seed(0)
    images, text, classes = train_tiny_clip.sample_batch(pools, tokens, 64, g)
    assert images.shape == (64, 3, 16, 16)
    assert (classes[:32] < 10).all() and (classes[32:] >= 10).all()
    assert (pools["caption_class"][text[:, 0]] == classes).all()


@pytest.mark.slow
def test_training_script_writes_checksummed_weights(tmp_path):
    out = tmp_path / "tiny_clip.pt"
    accuracies = train_tiny_clip.main(["--steps", "3", "--batch-size", "16", "--out", str(out)])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == sha256_file(out) and meta["accuracies"] == accuracies
    model, _ = tiny_clip.load_tiny_clip(out)
    assert model.token_embedding.weight.shape == (49408, 64)
