"""Parity of our MMDiT with diffusers' SD3Transformer2DModel (a test-only reference) through the converter."""

from __future__ import annotations

import pytest
import torch

from src.models import MMDiT, count_parameters
from src.models.convert_diffusers import diffusers_config, from_diffusers, mmdit_kwargs, to_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

CONFIG = dict(
    input_size=16, patch_size=2, in_channels=4, depth=3, hidden_size=64, num_heads=2,
    context_dim=32, pooled_dim=24, pos_embed_max_size=12,
)  # fmt: skip
TOL = 1e-5




def random_mmdit(qk_norm):
    torch.manual_seed(0)
    model = MMDiT(**CONFIG, qk_norm=qk_norm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random everywhere, adaLN and the output head included
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def inputs(h=16, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(3, 4, h, w, generator=g),
        torch.rand(3, generator=g),
        torch.randn(3, 7, 32, generator=g),
        torch.randn(3, 24, generator=g),
    )


def run_diffusers(model, x, t, ctx, pooled):
    return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=1000 * t).sample


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
@pytest.mark.parametrize("hw", [(16, 12), (24, 16)])
def test_converted_weights_give_diffusers_output(qk_norm, hw):
    ours = random_mmdit(qk_norm)
    theirs = SD3Transformer2DModel(**diffusers_config(ours)).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict()), strict=True)
    assert count_parameters(ours) == count_parameters(theirs)
    x, t, ctx, pooled = inputs(*hw)
    with torch.no_grad():
        a, b = ours(x, t, ctx, pooled), run_diffusers(theirs, x, t, ctx, pooled)
    diff = (a - b).abs().max().item()
    print(f"max abs diff ours vs diffusers (qk_norm={qk_norm}, {hw}): {diff:.2e}, output std {a.std():.2f}")
    assert a.std() > 0.5  # a real signal, not a zero output
    assert diff < TOL


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_reverse_conversion_round_trips_and_matches(qk_norm):
    torch.manual_seed(2)
    theirs = SD3Transformer2DModel(**diffusers_config(random_mmdit(qk_norm))).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    converted = from_diffusers(theirs.state_dict())
    back = to_diffusers(converted)
    assert set(back) == set(theirs.state_dict())
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
    ours = MMDiT(**mmdit_kwargs(theirs.config)).eval()
    ours.load_state_dict(converted, strict=True)
    x, t, ctx, pooled = inputs()
    with torch.no_grad():
        diff = (ours(x, t, ctx, pooled) - run_diffusers(theirs, x, t, ctx, pooled)).abs().max().item()
    assert diff < TOL


def test_ours_round_trips_exactly():
    sd = random_mmdit("rms_norm").state_dict()
    back = from_diffusers(to_diffusers(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_fresh_models_share_the_positional_grid_with_pos_grid_diffusers():
    theirs = SD3Transformer2DModel(**diffusers_config(random_mmdit(None)))
    ours = MMDiT(**mmdit_kwargs(theirs.config))
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.pos_embed, rtol=0, atol=1e-6)
    ref = get_2d_sincos_pos_embed(64, 12, base_size=8, output_type="pt").float()
    torch.testing.assert_close(ours.pos_embed[0], ref, rtol=0, atol=1e-6)


def test_converter_rejects_foreign_layouts():
    sd = random_mmdit(None).state_dict()
    with pytest.raises(ValueError, match="unexpected"):
        to_diffusers({**sd, "joint_blocks.0.x_block.attn2.qkv.weight": torch.zeros(1)})
    del sd["final_layer.linear.bias"]
    with pytest.raises(ValueError, match="missing"):
        to_diffusers(sd)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        mmdit_kwargs({**diffusers_config(random_mmdit(None)), "dual_attention_layers": (0,)})


def test_diffusers_model_builds_the_counterpart_with_our_weights():
    """The benchmarks' one constructor of diffusers' model (src.models.convert_diffusers.diffusers_model)."""
    from src.models.convert_diffusers import diffusers_model

    ours = random_mmdit("rms_norm")
    theirs = diffusers_model(ours).eval()
    x, t, ctx, pooled = inputs(16, 12)
    with torch.no_grad():
        assert torch.allclose(ours(x, t, ctx, pooled), run_diffusers(theirs, x, t, ctx, pooled), atol=1e-5)
