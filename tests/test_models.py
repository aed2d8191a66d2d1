"""Backbones (docs/backbone.md#backbone-mm-dit): shapes, input checks, adaLN-Zero, conditioning paths, positional grid, configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.models import BACKBONES, MMDiT, MMDiT3, build_backbone, count_parameters
from src.models.layers import timestep_embedding

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SMALL = dict(input_size=16, patch_size=2, in_channels=3, depth=2, hidden_size=32, num_heads=2, context_dim=24, pooled_dim=20)
EXTRA = {"mmdit3": dict(context_split=4)}




def small(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(name, **{**SMALL, **EXTRA.get(name, {}), **overrides})


def randomize(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere, so that no zero-initialised path hides a bug."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(b=2, h=16, w=12, c=3, length=9, context_dim=24, pooled_dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, h, w, generator=g),
        torch.rand(b, generator=g),
        torch.randn(b, length, context_dim, generator=g),
        torch.randn(b, pooled_dim, generator=g),
    )


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize("hw", [(16, 16), (16, 12), (8, 20), (32, 32)])
def test_output_shape_square_and_non_square(name, hw):
    model = small(name)
    x, t, ctx, pooled = inputs(h=hw[0], w=hw[1])
    with torch.no_grad():
        out = model(x, t, ctx, pooled)
    assert out.shape == x.shape


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_adaln_zero_output_is_exactly_zero_and_trainable(name):
    model = small(name)
    x, t, ctx, pooled = inputs()
    out = model(x, t, ctx, pooled)
    assert torch.count_nonzero(out) == 0
    (out * torch.randn_like(out)).sum().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mmdit", "mmdit3"])
def test_adaln_zero_blocks_start_as_the_identity(name):
    """adaLN-Zero: every MM-DiT block's modulation starts at zero (its gates too), so the image tokens leave the
    joint blocks as they came in, whatever the other weights."""
    model = small(name)
    tokens, c = torch.randn(2, 12, 32), torch.randn(2, 32)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "adaLN_modulation" not in key:
                p.normal_()
        out = model.forward_blocks(tokens, model.embed_context(torch.randn(2, 9, 24)), c)
    torch.testing.assert_close(out, tokens, rtol=0, atol=0)


def test_fused_qkv_reaches_every_attention_and_the_embedder_mlps_start_small():
    """fused_qkv=False runs every stream's attention as three matmuls; the time and pooled-text MLPs start at
    N(0, 0.02) (DiT), not at the xavier init of the other linears."""
    from src.models.layers import SelfAttention

    model = small("mmdit3", fused_qkv=False)
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(attentions) == 6 and not any(a.fused_qkv for a in attentions)
    assert all(a.fused_qkv for a in small("mmdit3").modules() if isinstance(a, SelfAttention))
    for embedder in (model.t_embedder, model.y_embedder):
        assert all(0.01 < lin.weight.std() < 0.03 for lin in (embedder.mlp[0], embedder.mlp[2]))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_input_conditions_the_output(name):
    model = randomize(small(name))
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx, pooled)
        assert ref.abs().mean() > 1e-2
        variants = {
            "x": model(x.flip(-1), t, ctx, pooled),
            "t": model(x, t + 0.1, ctx, pooled),
            "context": model(x, t, ctx + 1.0, pooled),
            "pooled": model(x, t, ctx, pooled + 1.0),
        }
    for what, out in variants.items():
        assert (out - ref).abs().max() > 1e-3, f"{name}: output does not depend on {what}"


def test_samples_are_independent():
    """No mixing across the batch: sample 0's output does not change when sample 1's inputs do."""
    model = randomize(small("mmdit"))
    x, t, ctx, pooled = inputs(b=2)
    x2, t2, ctx2, pooled2 = (a.clone() for a in (x, t, ctx, pooled))
    for a in (x2, t2, ctx2, pooled2):
        a[1] += 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx, pooled)[0], model(x2, t2, ctx2, pooled2)[0])


def test_mmdit3_second_text_stream_is_used_and_has_own_weights():
    model = randomize(small("mmdit3"))
    x, t, ctx, pooled = inputs(length=9)
    later = ctx.clone()
    later[:, 4:] += 1.0  # only the second group (tokens after context_split = 4)
    with torch.no_grad():
        assert (model(x, t, later, pooled) - model(x, t, ctx, pooled)).abs().max() > 1e-3
    assert not torch.equal(model.context_embedder.weight, model.context_embedder_2.weight)
    assert len(model.joint_blocks[0].context_blocks) == 2


def test_mmdit3_streams_partition_the_context_at_context_split():
    """The first context_split tokens go to one stream, every other token to the other: no token in both, none lost;
    context_split=null takes half the tokens, rounded down like the data's own split (text_split) for odd lengths."""
    from src.data.shards import text_split

    model = randomize(small("mmdit3"))  # context_split=4
    ctx = inputs(length=9)[2]
    first, second = model.embed_context(ctx)
    torch.testing.assert_close(first, model.context_embedder(ctx[:, :4]))
    torch.testing.assert_close(second, model.context_embedder_2(ctx[:, 4:]))
    half = small("mmdit3", context_split=None)
    assert [s.shape[1] for s in half.embed_context(ctx)] == [text_split({"context_length": 9}), 5] == [4, 5]
    assert not half.context_embedder_2.bias.any()  # initialised as context_embedder


def test_mmdit_last_block_text_stream_keeps_only_attention_inputs():
    model = small("mmdit", depth=3)
    last, first = model.joint_blocks[-1].context_blocks[0], model.joint_blocks[0].context_blocks[0]
    assert last.mlp is None and last.attn.proj is None
    assert last.adaLN_modulation[-1].out_features == 2 * model.hidden_size
    assert first.adaLN_modulation[-1].out_features == 6 * model.hidden_size


@pytest.mark.parametrize("name", sorted(BACKBONES))
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(h=15), "latent height 15"),
        (dict(w=13), "latent width 13"),
        (dict(h=34), "latent height 34"),  # more patches than the 16-patch grid
        (dict(c=4), "in_channels=3"),
        (dict(context_dim=25), "context_dim=24"),
        (dict(pooled_dim=21), "pooled_dim=20"),
    ],
)
def test_bad_inputs_raise_clear_errors(name, change, match):
    model = small(name)
    with pytest.raises(ValueError, match=match):
        model(*inputs(**change))


def test_bad_time_shape_and_mmdit3_context_length_raise():
    x, t, ctx, pooled = inputs()
    with pytest.raises(ValueError, match=r"t has shape \(2, 1\)"):
        small("mmdit")(x, t[:, None], ctx, pooled)
    with pytest.raises(ValueError, match="context_split=4"):
        small("mmdit3")(x, t, ctx[:, :4], pooled)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_size=30, num_heads=4), "num_heads=4"),
        (dict(hidden_size=96, num_heads=None), "num_heads=None"),
        (dict(input_size=15), "input_size=15"),
        (dict(qk_norm="layer_norm"), r"qk_norm='layer_norm' is not supported; allowed: null, 'rms_norm'$"),
        (dict(pos_grid="rope"), r"pos_grid='rope' is not supported; allowed: 'centered', 'diffusers'$"),
        (dict(pos_embed_max_size=4), "pos_embed_max_size=4"),
        (dict(depth=0), "depth=0"),
    ],
)
def test_bad_settings_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        MMDiT(**{**SMALL, **overrides})
    with pytest.raises(ValueError, match="context_split=0"):
        MMDiT3(**SMALL, context_split=0)


def test_paper_sizing_by_depth():
    with torch.device("meta"):
        model = MMDiT(depth=5, input_size=8, in_channels=4, context_dim=8, pooled_dim=8)
    assert (model.hidden_size, model.num_heads) == (320, 5)


def _mae_grid(dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Independent numpy 2D sin-cos embedding (MAE / DiT): first half the column, second half the row."""

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    r, c = np.meshgrid(rows, cols, indexing="ij")
    return np.concatenate([one(dim // 2, c), one(dim // 2, r)], axis=1)


def test_centered_grid_is_dits_grid_at_the_base_size_and_a_centre_crop_elsewhere():
    model = small("mmdit", pos_embed_max_size=13)  # base 8 patches in a 13-patch grid
    s, m, d = 8, 13, model.hidden_size
    base = model.cropped_pos_embed(s, s)[0].numpy()
    np.testing.assert_allclose(base, _mae_grid(d, np.arange(s), np.arange(s)), atol=1e-6)
    # docs/backbone.md#positional-embedding: positions (p - (h_max - s)/2) * 256/S with p the grid row of a centre crop of h rows.
    h, w = 5, 12
    rows = np.arange((m - h) // 2, (m - h) // 2 + h) - (m - s) // 2
    cols = np.arange((m - w) // 2, (m - w) // 2 + w) - (m - s) // 2
    np.testing.assert_allclose(model.cropped_pos_embed(h, w)[0].numpy(), _mae_grid(d, rows, cols), atol=1e-6)
    scaled = small("mmdit", pos_embed_ref_size=4)  # the reference grid has half the patches: positions halve
    np.testing.assert_allclose(
        scaled.cropped_pos_embed(s, s)[0].numpy(), _mae_grid(d, np.arange(s) / 2, np.arange(s) / 2), atol=1e-6
    )


def test_time_input_is_embedded_as_1000_t():
    model = randomize(small("mmdit"))
    t = torch.tensor([0.25, 0.7])
    expected = model.t_embedder.mlp(timestep_embedding(1000 * t, 256))
    torch.testing.assert_close(model.t_embedder(1000 * t), expected)
    emb = timestep_embedding(torch.tensor([0.0, 250.0]), 8)
    half = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(250 * half), torch.sin(250 * half)]))


@pytest.mark.parametrize("name", ["mmdit", "crossdit"])
def test_qk_norm_and_bf16_autocast(name):
    model = randomize(small(name, qk_norm="rms_norm"), std=0.1)
    x, t, ctx, pooled = inputs()
    ref = model(x, t, ctx, pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx, pooled)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, f"bf16 autocast output differs from fp32 by {rel:.3f} (relative)"
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # a model cast to bf16 as a whole runs too
        pure = model.to(torch.bfloat16)(*(a.to(torch.bfloat16) for a in (x, t, ctx, pooled)))
    assert pure.dtype == torch.bfloat16 and (pure.float() - ref).norm() / ref.norm() < 0.1


def test_state_dict_round_trip_and_weights_only_load(tmp_path):
    model = randomize(small("mmdit", qk_norm="rms_norm"))
    path = tmp_path / "backbone.pt"
    torch.save(model.state_dict(), path)
    fresh = small("mmdit", qk_norm="rms_norm")
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, ctx, pooled), model(x, t, ctx, pooled), rtol=0, atol=0)


def test_build_backbone_rejects_unknown_name():
    with pytest.raises(ValueError, match="backbone='unet'"):
        build_backbone("unet")


DATA = dict(latent_channels=1, latent_size=16, context_dim=64, pooled_dim=64)


def model_config(name: str):
    """conf/model/<name>.yaml composed by Hydra (its defaults: base/backbone.yaml), over the DATA shapes."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        model = compose(config_name=f"model/{name}").model
    return OmegaConf.create({"data": DATA, "model": model})


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_model_config_instantiates(path):
    cfg = model_config(path.stem)
    assert cfg.model.compile == "auto"  # regional compilation on a GPU, eager on the CPU
    with torch.device("meta"):  # the paper sizes would not fit in memory
        model = instantiate(cfg.model)
    assert type(model) is BACKBONES[path.stem.split("_")[0]]
    assert (model.in_channels, model.input_size, model.context_dim, model.pooled_dim) == (1, 16, 64, 64)
    assert model.compile_requested == "auto"
    n = count_parameters(model)
    if "_d" in path.stem:
        d = int(path.stem.split("_d")[1])
        assert (model.depth, model.hidden_size, model.num_heads) == (d, 64 * d, d)
    else:
        # The tiny CPU presets (hidden 64, depth 2) keep the default 3-recipe run within minutes on 2 cores.
        assert (model.depth, model.hidden_size, model.num_heads) == (2, 64, 2)
        assert 0.15e6 <= n <= 0.6e6, f"{path.stem}: {n} parameters for the tiny CPU preset"


def test_tiny_default_trains_on_cpu():
    """The default preset learns: a few AdamW steps of a fixed regression target lower the loss."""
    cfg = model_config("mmdit")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    x, t, ctx, pooled = inputs(b=8, h=16, w=16, c=1, length=16, context_dim=64, pooled_dim=64)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(x, t, ctx, pooled) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_mmdit3_splits_its_text_streams_where_the_datas_second_text_group_begins(tmp_path):
    """model=mmdit3 (context_split: null): on SD3-style data (CLIP's 77 tokens, then T5's) the first stream is the
    77 CLIP tokens; on one encoder's data half the context. Set where the job resolves its data, before the model
    is built and fingerprinted, and in the planner."""
    from src.config import fingerprint
    from src.data.shards import text_split, write_shards
    from src.training.prepare import check_config, resolve_data
    from tests.test_training import make_cfg

    groups = [{"name": "clip:a", "context_tokens": [0, 6], "pooled_channels": [0, 4]},
              {"name": "clip:b", "context_tokens": [0, 6], "pooled_channels": [4, 8]},
              {"name": "t5:c", "context_tokens": [6, 10]}]
    assert text_split({"context_length": 10, "text_groups": groups}) == 6
    assert text_split({"context_length": 16, "text_groups": [{"name": "clip:a", "context_tokens": [0, 16]}]}) == 8
    assert text_split({"context_length": 154}) == 77
    g = torch.Generator().manual_seed(0)
    dirs = {}
    for split, n in (("train", 8), ("eval", 4)):
        dirs[split] = tmp_path / split
        write_shards(dirs[split], torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 10, 16, generator=g),
                     torch.randn(n, 8, generator=g), [f"c{i}" for i in range(n)], encoder_names=["a", "b", "c"],
                     extra_meta={"text_groups": groups})
    cfg = make_cfg(tmp_path, tmp_path / "cache", ["model=mmdit3", "data=shards", "data.name=fake",
                                                  f"data.train_dir={dirs['train']}", f"data.eval_dir={dirs['eval']}",
                                                  "data.batch_size=4", "data.val_samples=4", "eval.enabled=false"])
    assert cfg.model.context_split is None
    check_config(cfg)  # builds the model on the meta device with the split
    resolve_data(cfg)
    assert cfg.model.context_split == 6 and fingerprint(cfg)["model"]["context_split"] == 6
