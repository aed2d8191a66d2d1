"""An example of a backbone defined outside flowsweep: a small residual conv net, conditioned by FiLM on the time and
on the text (the pooled vector and the mean of the token sequence). It has the one call signature every backbone
has, backbone(x, t, context, pooled) -> a tensor shaped like x (docs/backbone.md#a-backbone-of-your-own).

conf/model/convnet.yaml here names it (`_target_: convnet.ConvNet`); the keys every backbone configuration has
(conf/model/base/backbone.yaml) are its keyword arguments, of which it reads the data's shapes, depth and
hidden_size. Run it with

    PYTHONPATH=docs/examples python -m src.run --config-dir docs/examples/conf model=convnet
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, *, in_channels: int, context_dim: int, pooled_dim: int, depth: int = 2,
                 hidden_size: int | None = None, **shared_keys):  # the other keys: the shared backbone settings
        super().__init__()
        width = hidden_size or 64 * depth
        if width % 8:  # else the first forward fails in GroupNorm, after the run directory exists
            raise ValueError(f"hidden_size={width} is not allowed; allowed: a multiple of 8 (GroupNorm of 8 groups)")
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.text = nn.Linear(pooled_dim + context_dim, width)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.films = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.head = nn.Conv2d(width, in_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # starts as the zero predictor, like the MM-DiT's adaLN-Zero head
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # t is the formulation's c_noise(t), O(1): embedded as 1000 t, the convention every backbone here follows.
        freqs = torch.exp(-math.log(10000.0) * torch.arange(32, device=x.device) / 32)
        angles = 1000.0 * t.float()[:, None] * freqs
        y = self.time(torch.cat([angles.cos(), angles.sin()], -1)) + self.text(torch.cat([pooled, context.mean(1)], -1))
        h = self.stem(x)
        for conv, film in zip(self.convs, self.films):
            scale, shift = film(F.silu(y))[..., None, None].chunk(2, dim=1)
            h = h + conv(F.silu(F.group_norm(h, 8) * (1 + scale) + shift))
        return self.head(F.silu(h))
