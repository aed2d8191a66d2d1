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
