"""The embedded datasets: determinism, value ranges, splits, caption vocabulary."""

import open_clip
import pytest
import torch

from src.data import digits, shapes
from src.data.captioned import CaptionedImages, check_split


@pytest.fixture(scope="module")
def digit_splits():
    return {s: digits.load_digits_split(s) for s in ("train", "eval")}


@pytest.fixture(scope="module")
def shape_splits():
    return {"train": shapes.load_shapes_split("train", n=600), "eval": shapes.load_shapes_split("eval")}


def test_digits_shapes_and_range(digit_splits):
    train, held_out = digit_splits["train"], digit_splits["eval"]
    assert train.images.shape == (1500, 1, 16, 16) and held_out.images.shape == (297, 1, 16, 16)
    assert train.images.dtype == torch.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0


def test_digits_split_is_disjoint_stratified_and_fixed(digit_splits):
    train_idx = {e["source_index"] for e in digit_splits["train"].extras}
    eval_idx = {e["source_index"] for e in digit_splits["eval"].extras}
    assert not train_idx & eval_idx and len(train_idx | eval_idx) == 1797
    counts = torch.bincount(digit_splits["eval"].labels, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 30
    assert (digits.split_indices("eval") == sorted(eval_idx)).all()


def test_digits_captions_use_the_class_names(digit_splits):
    data = digit_splits["train"]
    names_seen = set()
    for caption, label, extra in zip(data.captions, data.labels, data.extras):
        assert caption == digits.digit_caption(extra["name"])
        assert extra["name"] in digits.DIGIT_NAMES[int(label)]
        names_seen.add(extra["name"])
    # every synonym of every class occurs somewhere in the training split
    assert names_seen == {n for names in digits.DIGIT_NAMES.values() for n in names}
    assert digit_splits["train"].captions[:3] == ["a photo of a number zero", "a photo of a 1", "a photo of a two"]


def test_digit_pixels_map_zero_to_sixteen_onto_minus_one_to_one_smoothly():
    """The 8x8 originals' 0..16 ink levels span [-1, 1] exactly (8 is mid-grey), and upsampling is bilinear:
    an isolated dot gives intermediate values, not a blocky 2x2 copy."""
    levels = torch.tensor([0.0, 8.0, 16.0])[:, None].expand(-1, 64).numpy()
    flat = digits.upsample_digits(levels)
    assert flat.shape == (3, 1, 16, 16)
    assert flat[0].eq(-1).all() and flat[1].eq(0).all() and flat[2].eq(1).all()
    dot = torch.zeros(1, 64)
    dot[0, 27] = 16.0
    values = digits.upsample_digits(dot.numpy()).unique()
    assert ((values > -0.99) & (values < 0.99)).sum() >= 2


def test_zero_has_the_extra_name_nought():
    """Class 0 is also "nought", so its captions are one more than the other digits'."""
    captions = digits.class_captions()
    assert "a photo of a nought" in captions[0] and len(captions[0]) == len(captions[1]) + 1


def test_digits_deterministic_and_seed_changes_captions(digit_splits):
    again = digits.load_digits_split("eval")
    assert again.captions == digit_splits["eval"].captions
    assert torch.equal(again.images, digit_splits["eval"].images)
    other = digits.load_digits_split("eval", seed=1)
    assert other.captions != again.captions and torch.equal(other.images, again.images)


def test_shapes_range_balance_and_determinism(shape_splits):
    held_out = shape_splits["eval"]
    assert held_out.images.shape == (500, 3, 16, 16)
    assert held_out.images.min() >= -1.0 and held_out.images.max() <= 1.0
    counts = torch.bincount(held_out.labels, minlength=shapes.NUM_CLASSES)
    assert counts.min() >= 4 and counts.max() <= 5  # 500 over 120 classes, balanced
    again = shapes.load_shapes_split("eval")
    assert torch.equal(again.images, held_out.images) and again.captions == held_out.captions
    assert not torch.equal(shapes.load_shapes_split("eval", seed=1, n=20).images, held_out.images[:20])


def test_shapes_train_and_eval_differ(shape_splits):
    assert not torch.equal(shape_splits["train"].images[:50], shape_splits["eval"].images[:50])


def test_shapes_captions_are_compositional(shape_splits):
    for caption, label, extra in zip(shape_splits["eval"].captions, shape_splits["eval"].labels, shape_splits["eval"].extras):
        color, shape, position = shapes.label_attributes(int(label))
        assert caption == f"a {color} {shape} in the {position}" == shapes.class_captions()[int(label)]
        assert (extra["color"], extra["shape"], extra["position"]) == (color, shape, position)
    assert shapes.shape_caption("red", "circle", "top left") == "a red circle in the top left"


def test_shapes_pixels_follow_the_caption(shape_splits):
    """The shape's pixels are nearest to the named colour and their mass sits in the named region."""
    data = shape_splits["eval"]
    for k in range(40):
        img = (data.images[k] + 1) / 2
        color, _, position = shapes.label_attributes(int(data.labels[k]))
        fg = (img - img[:, 0, 0, None, None]).abs().sum(0)  # difference from the background corner
        ys, xs = torch.nonzero(fg > 0.5, as_tuple=True)
        cy, cx = ys.float().mean() + 0.5, xs.float().mean() + 0.5
        ex, ey = shapes.POSITIONS[position]
        assert abs(cx - ex) < 2.0 and abs(cy - ey) < 2.5, (k, position, cx, cy)
        rgb = img[:, ys, xs].mean(1)
        palette = torch.tensor(list(shapes.COLORS.values()))
        nearest = list(shapes.COLORS)[int((palette - rgb).norm(dim=1).argmin())]
        assert nearest == color, (k, color, rgb)


def test_shape_masks_are_distinct():
    import numpy as np
    coords = np.linspace(-4, 4, 81)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    masks = {s: shapes.shape_mask(s, xx, yy, 3.0) for s in shapes.SHAPES}
    for a in shapes.SHAPES:
        for b in shapes.SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.05
    with pytest.raises(ValueError, match="shape='hexagon'"):
        shapes.shape_mask("hexagon", xx, yy, 3.0)


def test_render_draws_a_shape_of_its_radius_centred_where_asked():
    """A circle of radius 3 covers about 9 pi pixels, centred on the requested point to a small fraction of a pixel:
    the scene described by the caption is the scene drawn, at every image size."""
    import math

    image = shapes.render((1.0, 1.0, 1.0), "circle", (8.0, 8.0), 3.0, background=0.0)
    coverage = torch.from_numpy(image[0])
    assert coverage.sum().item() == pytest.approx(9 * math.pi, rel=0.03)
    grid = torch.arange(16.0) + 0.5
    assert (coverage.sum(0) * grid).sum() / coverage.sum() == pytest.approx(8.0, abs=0.01)
    assert (coverage.sum(1) * grid).sum() / coverage.sum() == pytest.approx(8.0, abs=0.01)
    square = shapes.render((1.0, 1.0, 1.0), "square", (8.0, 8.0), 3.0, background=0.0)
    assert square[0].sum() == pytest.approx((2 * 0.85 * 3.0) ** 2, rel=0.05)  # sampled at quarter pixels


def test_all_captions_fit_the_tiny_clip_context():
    from src.text.tiny_clip import MODEL_NAME, model_config  # registers the config
    length = model_config()["text_cfg"]["context_length"]
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    captions = [c for group in digits.class_captions() for c in group] + shapes.class_captions()
    tokens = tokenizer(captions)
    assert tokens.shape[1] == length
    eot = tokenizer.eot_token_id
    # the end-of-text token is present and is the last non-padding token: nothing was truncated
    n_tokens = (tokens != 0).sum(1)
    assert (tokens[torch.arange(len(captions)), n_tokens - 1] == eot).all()
    assert n_tokens.max() < length


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="split='test'"):
        check_split("test")
    with pytest.raises(ValueError, match="n=0"):
        shapes.load_shapes_split("train", n=0)
    with pytest.raises(ValueError, match="label=120"):
        shapes.label_attributes(120)
    for captions, labels, extras in ((["a"], [0, 1], [{}, {}]), (["a", "b"], [0], [{}, {}]),
                                     (["a", "b"], [0, 1], [{}])):
        with pytest.raises(ValueError, match=r"CaptionedImages: images \(2\), captions"):
            CaptionedImages(torch.zeros(2, 1, 8, 8), captions, torch.tensor(labels), extras)
