"""Layers shared by the backbones (docs/backbone.md#backbone-mm-dit): embedders, the positional grid, attention, adaLN blocks.

References: Peebles & Xie 2023 (DiT, facebookresearch/DiT models.py), Esser et al. 2024 (MM-DiT, section 4
and Fig. 2; Stability-AI/sd3.5 mmditx.py). Pure torch: no Lightning or Hydra here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QK_NORMS = (None, "rms_norm")
POS_GRIDS = ("centered", "diffusers")


def choices(values) -> str:
    """Allowed values as a configuration writes them: null, 'rms_norm' (not a Python tuple)."""
    return ", ".join("null" if v is None else repr(v) for v in values)


NORM_EPS = 1e-6  # LayerNorm and QK RMSNorm epsilon of the reference MM-DiT


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift with per-sample (B, D) shift and scale over (B, L, D) tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """Gated residual x + gate * y with a per-sample (B, D) gate (adaLN-Zero)."""
    return x + gate.unsqueeze(1) * y


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (the adaLN supplies them)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


#################################################################################
#                     Sine/cosine embeddings of time and position                #
#################################################################################


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos, sin] of (possibly fractional) times t of shape (B,) (DiT; = diffusers')."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """1D sin-cos embedding (M, dim) of positions pos (M,), computed in float64 (MAE / DiT)."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    out = pos.double()[:, None] * (1.0 / 10000**omega)[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def grid_positions(grid_size: int, base_size: int, pos_grid: str, ref_size: int) -> Tensor:
    """Positions of the grid_size rows (or columns) of the positional grid (docs/backbone.md#positional-embedding).

    "centered": (p - (grid_size - base_size) // 2) * ref_size / base_size, the paper's centred grid
    (p - (h_max - s)/2) * 256/S: the base-size centre crop gets positions 0, 1, ... scaled by ref/base.
    "diffusers": p * base_size / grid_size, diffusers' SD3Transformer2DModel grid (for fresh-model parity).
    """
    p = torch.arange(grid_size, dtype=torch.float64)
    if pos_grid == "centered":
        return (p - (grid_size - base_size) // 2) * (ref_size / base_size)
    if pos_grid == "diffusers":
        return p * (base_size / grid_size)
    raise ValueError(f"pos_grid={pos_grid!r} is not supported; allowed: {choices(POS_GRIDS)}")


def sincos_2d_grid(dim: int, grid_size: int, base_size: int, pos_grid: str, ref_size: int) -> Tensor:
    """Fixed 2D sin-cos embedding (grid_size**2, dim), rows major; first half encodes the column, second the row."""
    if dim % 4:
        raise ValueError(f"hidden_size={dim} is not allowed for the 2D sin-cos grid; allowed: multiples of 4")
    pos = grid_positions(grid_size, base_size, pos_grid, ref_size)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


#################################################################################
#                                    Embedders                                  #
#################################################################################


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of a (B, C, H, W) latent, linearly embedded to (B, H W / p^2, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # Contiguous tokens: otherwise the whole residual stream inherits the conv's channels-first strides.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """MLP of the sinusoidal embedding of a scalar time (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)  # float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class VectorEmbedder(nn.Module):
    """MLP of a flat conditioning vector, here the pooled text embedding c_vec (MM-DiT)."""

    def __init__(self, input_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


#################################################################################
#                                    Attention                                  #
#################################################################################


class QKNorm(nn.Module):
    """RMSNorm with a learnable scale over each head's channels (paper section 5.3.2, QK-normalisation)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: Tensor) -> Tensor:
        # In float32 (as diffusers), back to the input dtype: SDPA needs q, k, v of one dtype under autocast.
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), eps=NORM_EPS).to(x.dtype)


class SelfAttention(nn.Module):
    """Fused QKV projection with optional QK-norm, and the output projection (absent when pre_only).

    The weights are always one (3 D, D) qkv matrix; fused_qkv = False runs it as three matmuls on its slices
    (a benchmark lever: the same parameters, the same checkpoint).
    """

    fused_qkv = True

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None = None, pre_only: bool = False):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r} is not supported; allowed: {choices(QK_NORMS)}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.ln_q = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = None if pre_only else nn.Linear(hidden_size, hidden_size)

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of shape (B, heads, L, head_dim), q and k normalised per head."""
        if self.fused_qkv:
            qkv = self.qkv(x)
        else:
            w, b = self.qkv.weight.chunk(3), self.qkv.bias.chunk(3)
            qkv = torch.cat([F.linear(x, w[i], b[i]) for i in range(3)], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.ln_q(q), self.ln_k(k), v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention over (B, heads, L, head_dim) inputs; returns (B, L_q, heads * head_dim)."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (DiT)."""

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden_features = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#                                 Transformer blocks                            #
#################################################################################


class StreamBlock(nn.Module):
    """One stream of a transformer block with adaLN-Zero: modulated attention inputs, gated attention and MLP.

    Split into pre_attention / post_attention so that an MM-DiT block can run one joint attention over the
    tokens of several streams in between (mmditx's DismantledBlock). With pre_only (the last MM-DiT block's
    text stream) only what feeds the attention is kept: the (shift, scale) modulation and the QKV projection.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: str | None = None,
        pre_only: bool = False,
    ):
        super().__init__()
        self.pre_only = pre_only
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm, pre_only=pre_only)
        self.mlp = None if pre_only else Mlp(hidden_size, mlp_ratio)
        n_mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mods * hidden_size))

    def pre_attention(
        self, x: Tensor, c: Tensor, modulation: Tensor | None = None
    ) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """(q, k, v) of the modulated tokens, and what post_attention needs.

        modulation: this block's adaLN_modulation(c) when the caller computed it already (fused modulation).
        """
        modulation = self.adaLN_modulation(c) if modulation is None else modulation
        mods = modulation.chunk(2 if self.pre_only else 6, dim=1)
        shift_msa, scale_msa = mods[:2]
        qkv = self.attn.pre_attention(modulate(layer_norm(x), shift_msa, scale_msa))
        return qkv, (x, *mods[2:])

    def post_attention(
        self, attn: Tensor, x: Tensor, gate_msa: Tensor, shift_mlp: Tensor, scale_mlp: Tensor, gate_mlp: Tensor
    ) -> Tensor:
        """Gated residual of the projected attention output, then of the modulated MLP."""
        x = gated(x, gate_msa, self.attn.proj(attn))
        return gated(x, gate_mlp, self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """A plain DiT block: self-attention over this stream's own tokens."""
        qkv, rest = self.pre_attention(x, c)
        return self.post_attention(attention(*qkv), *rest)


class FinalLayer(nn.Module):
    """Output head: adaLN (shift, scale), linear to p * p * C values per token (DiT)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift, scale))
