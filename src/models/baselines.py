"""Baseline backbones of the paper's architecture comparison (section 5.2, Fig. 4): DiT, CrossDiT, UViT.

All share the MM-DiT frame (embedders, positional grid, output head, call signature) and its adaLN-Zero
conditioning on y = MLP(1000 t) + MLP(pooled); they differ in how text tokens enter the blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .backbone import Backbone
from .layers import Mlp, QKNorm, SelfAttention, StreamBlock, attention, layer_norm, modulate


class DiT(Backbone):
    """DiT over the concatenation of text and image tokens: one set of weights for both modalities."""

    block_lists = ("blocks",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = nn.ModuleList(
            StreamBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.qk_norm) for _ in range(self.depth)
        )
        self.initialize_weights()

    def forward_blocks(self, x: Tensor, contexts: list[Tensor], c: Tensor) -> Tensor:
        n = x.shape[1]
        tokens = torch.cat([x, *contexts], dim=1)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, c)
        return tokens[:, :n]


class CrossAttention(nn.Module):
    """Image queries attend to the text tokens (keys and values), optional QK-norm."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: str | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.ln_q = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.ln_k = QKNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(context).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return self.proj(attention(self.ln_q(q), self.ln_k(k), v))


class CrossDiTBlock(nn.Module):
    """DiT block with a cross-attention to the text between self-attention and MLP (PixArt-alpha style)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = None):
        super().__init__()
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, context: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(layer_norm(x), shift_msa, scale_msa))
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attention(*qkv))
        x = x + self.cross_attn(layer_norm(x), context)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class CrossDiT(Backbone):
    """CrossDiT: image tokens self-attend and cross-attend to the embedded text tokens."""

    block_lists = ("blocks",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = nn.ModuleList(
            CrossDiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.qk_norm) for _ in range(self.depth)
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """adaLN-Zero, and each cross-attention output projection at zero (PixArt-alpha)."""
        super().initialize_weights()
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def forward_blocks(self, x: Tensor, contexts: list[Tensor], c: Tensor) -> Tensor:
        (context,) = contexts
        for block in self.blocks:
            x = self.run_block(block, x, context, c)
        return x


class UViT(Backbone):
    """U-ViT (Bao et al. 2023): DiT blocks over text and image tokens with long skip connections.

    depth // 2 blocks going in, one middle block when depth is odd, depth // 2 going out; each outgoing
    block first merges the matching incoming block's output through a linear layer on the concatenation.
    """

    block_lists = ("in_blocks", "mid_block", "out_blocks")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.depth < 2:
            raise ValueError(f"depth={self.depth} is not allowed for UViT; allowed: at least 2 (one skip connection)")
        half = self.depth // 2

        def block() -> StreamBlock:
            return StreamBlock(self.hidden_size, self.num_heads, self.mlp_ratio, self.qk_norm)

        self.in_blocks = nn.ModuleList(block() for _ in range(half))
        self.mid_block = block() if self.depth % 2 else None
        self.out_blocks = nn.ModuleList(block() for _ in range(half))
        self.skip_linears = nn.ModuleList(nn.Linear(2 * self.hidden_size, self.hidden_size) for _ in range(half))
        self.initialize_weights()

    def forward_blocks(self, x: Tensor, contexts: list[Tensor], c: Tensor) -> Tensor:
        n = x.shape[1]
        tokens = torch.cat([x, *contexts], dim=1)
        skips = []
        for block in self.in_blocks:
            tokens = self.run_block(block, tokens, c)
            skips.append(tokens)
        if self.mid_block is not None:
            tokens = self.run_block(self.mid_block, tokens, c)
        for block, skip_linear in zip(self.out_blocks, self.skip_linears):
            tokens = self.run_block(block, skip_linear(torch.cat([tokens, skips.pop()], dim=-1)), c)
        return tokens[:, :n]
