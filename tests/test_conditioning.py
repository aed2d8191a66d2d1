import pytest
import torch

from src.training.conditioning import draw_drops, drop_conditioning


def test_one_encoder_drops_whole_samples_at_the_rate():
    g = torch.Generator().manual_seed(0)
    ctx, pooled = torch.ones(20000, 4, 3), torch.ones(20000, 5)
    c, p = drop_conditioning(ctx, pooled, draw_drops(20000, 1, 0.1, g))
    dropped_c = (c.flatten(1) == 0).all(1)
    dropped_p = (p == 0).all(1)
    assert torch.equal(dropped_c, dropped_p)  # one encoder: context and pooled go together
    assert (c.flatten(1).sum(1)[~dropped_c] == 12).all()
    assert abs(dropped_c.float().mean().item() - 0.1) < 0.01
    assert torch.equal(ctx, torch.ones(20000, 4, 3))  # inputs untouched


def test_encoders_drop_independently_sd3_layout():
    # Two CLIPs share tokens 0-2 and split channels; T5 owns tokens 2-4 (docs/backbone.md#text-encoders).
    groups = [
        {"context_tokens": [0, 2], "context_channels": [0, 2], "pooled_channels": [0, 1]},
        {"context_tokens": [0, 2], "context_channels": [2, 3], "pooled_channels": [1, 2]},
        {"context_tokens": [2, 4], "pooled_channels": [2, 2]},
    ]
    g = torch.Generator().manual_seed(1)
    n = 50000
    c, p = drop_conditioning(torch.ones(n, 4, 4), torch.ones(n, 2), draw_drops(n, 3, 0.464, g), groups)
    clip_l = (c[:, 0:2, 0:2] == 0).flatten(1).all(1)
    big_g = (c[:, 0:2, 2:3] == 0).flatten(1).all(1)
    t5 = (c[:, 2:4] == 0).flatten(1).all(1)
    assert torch.equal(clip_l, p[:, 0] == 0) and torch.equal(big_g, p[:, 1] == 0)
    for dropped in (clip_l, big_g, t5):
        assert abs(dropped.float().mean().item() - 0.464) < 0.01
    all_dropped = (clip_l & big_g & t5).float().mean().item()
    assert abs(all_dropped - 0.464**3) < 0.01  # about 10% fully unconditional
    assert (c[:, 0:2, 3] == 1).all()  # zero padding channels of the CLIP tokens belong to nobody


def test_cond_groups_set_in_the_configuration_reach_the_training_module():
    """train.cond_groups (a list of groups, as the shards' text_groups): the job turned the list into a dict of its
    first group's two keys, and the first training step failed; a group of three keys failed at once."""
    from hydra import compose, initialize_config_module

    from src.config import register_resolvers
    from src.formulations import get_recipe
    from src.training.job import build_module
    from src.training.prepare import check_cond_groups

    groups = [{"name": "clip", "context_tokens": [0, 8], "context_channels": [0, 64], "pooled_channels": [0, 64]},
              {"context_tokens": [8, 16], "pooled_channels": [64, 64]}]
    register_resolvers()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"train.cond_groups={groups}".replace("'", "")])
    check_cond_groups(cfg, {"context_length": 16, "context_dim": 64, "pooled_dim": 64})  # in range, name allowed
    module = build_module(cfg, get_recipe("rf/lognorm(0.00, 1.00)"), torch.nn.Linear(1, 1))
    assert module.cond_groups == groups
    drop = torch.tensor([[True, False], [False, True]])
    c, p = drop_conditioning(torch.ones(2, 16, 64), torch.ones(2, 64), drop, module.cond_groups)
    assert (c[0, :8] == 0).all() and (c[0, 8:] == 1).all() and (p[0] == 0).all()
    assert (c[1, :8] == 1).all() and (c[1, 8:] == 0).all() and (p[1] == 1).all()


def test_auto_cond_dropout_leaves_a_tenth_of_the_samples_unconditional_whatever_the_encoders():
    """train.cond_dropout=auto (the default): 0.1 with one text encoder, the paper's 0.464 with three. A fixed 0.1 with
    three encoders' shards left 0.1% of the samples fully unconditional, for the guidance to sample from. Resolved
    before the run is fingerprinted: the fingerprint holds the number (0.1 for one encoder, as before auto)."""
    from hydra import compose, initialize_config_module

    from src.config import ConfigError, fingerprint, register_resolvers
    from src.formulations import get_recipe
    from src.training.conditioning import per_encoder_dropout
    from src.training.job import build_module
    from src.training.prepare import check_values, fill_cond_dropout

    assert per_encoder_dropout(1) == 0.1 and round(per_encoder_dropout(3), 3) == 0.464
    assert abs(per_encoder_dropout(3) ** 3 - 0.1) < 1e-12
    three = {"text_groups": [{"context_tokens": [0, 1], "pooled_channels": [0, 1]}] * 3}
    register_resolvers()
    for overrides, meta, expected in (([], {}, 0.1), ([], three, per_encoder_dropout(3)),
                                      (["train.cond_dropout=0.2"], three, 0.2)):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        check_values(cfg)  # auto passes the checks made before the data is at hand
        assert build_module(cfg, get_recipe("rf"), torch.nn.Linear(1, 1), meta).cond_dropout == expected
        fill_cond_dropout(cfg, meta)
        assert fingerprint(cfg)["train"]["cond_dropout"] == expected
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["train.cond_dropout=often"])
    with pytest.raises(ConfigError, match=r"train.cond_dropout=often: must be a number in \[0, 1\) \(or auto: 10% of "):
        check_values(cfg)


def test_a_drop_of_another_shape_than_samples_by_groups_is_refused():
    """One column per encoder group: a drop with another number of columns (or rows) is an error, not a silent
    partial dropout."""
    groups = [{"context_tokens": [0, 2], "pooled_channels": [0, 1]},
              {"context_tokens": [2, 4], "pooled_channels": [1, 2]}]
    ctx, pooled = torch.ones(3, 4, 2), torch.ones(3, 2)
    for shape in ((3, 3), (3, 1), (2, 2)):
        with pytest.raises(ValueError, match=rf"drop has shape \({shape[0]}, {shape[1]}\); expected \(3, 2\)"):
            drop_conditioning(ctx, pooled, torch.ones(shape, dtype=torch.bool), groups)
