"""MM-DiT (Esser et al. 2024, section 4, Fig. 2) and its 3-stream variant (section 5.2, Fig. 4).

Each stream (image tokens, text tokens) has its own weights; the streams meet in one joint attention over
the concatenation of all their tokens. Follows Stability-AI/sd3.5 mmditx.py (block_mixing, JointBlock).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone
from .layers import StreamBlock, attention
from .perf import is_sharded, resolve_auto


class JointBlock(nn.Module):
    """One MM-DiT block: per-stream adaLN-Zero blocks around a joint attention over all streams' tokens.

    With context_pre_only (the last block) the text streams keep only what feeds the attention: their
    outputs would be discarded, as in diffusers' `context_pre_only` and mmditx's `pre_only`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: str | None = None,
        context_pre_only: bool = False,
        num_context_streams: int = 1,
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm)
        self.context_blocks = nn.ModuleList(
            StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)
            for _ in range(num_context_streams)
        )

    def forward(
        self, x: Tensor, contexts: list[Tensor], c: Tensor, modulations: list[Tensor] | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """modulations: each stream's adaLN_modulation(c), when computed for all blocks at once."""
        blocks = (self.x_block, *self.context_blocks)
        streams = (x, *contexts)
        modulations = modulations or [None] * len(blocks)
        pre = [block.pre_attention(s, c, m) for block, s, m in zip(blocks, streams, modulations)]
        q, k, v = (torch.cat([qkv[i] for qkv, _ in pre], dim=2) for i in range(3))  # along the tokens
        outs = attention(q, k, v).split([s.shape[1] for s in streams], dim=1)
        x = self.x_block.post_attention(outs[0], *pre[0][1])
        if self.context_pre_only:
            return x, []
        contexts = [block.post_attention(o, *rest) for block, o, (_, rest) in zip(blocks[1:], outs[1:], pre[1:])]
        return x, contexts


class MMDiT(Backbone):
    """MM-DiT: separate weights for image and text tokens, joint attention (the paper's backbone)."""

    num_context_streams = 1
    block_lists = ("joint_blocks",)
    supports_fused_modulation = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                self.hidden_size,
                self.num_heads,
                self.mlp_ratio,
                self.qk_norm,
                context_pre_only=i == self.depth - 1,
                num_context_streams=self.num_context_streams,
            )
            for i in range(self.depth)
        )
        self.initialize_weights()

    def forward_blocks(self, x: Tensor, contexts: list[Tensor], c: Tensor) -> Tensor:
        fused = resolve_auto(self.fused_modulation, x.device.type)
        if fused and is_sharded(self.joint_blocks[0]):  # FSDP: a block's weights exist only inside its forward
            if self.fused_modulation is True:
                raise ValueError("fused_modulation=True is not allowed with FSDP-wrapped blocks; allowed: auto, False")
            fused = False
        modulations = self.block_modulations(c) if fused else [None] * self.depth
        for block, mods in zip(self.joint_blocks, modulations):
            x, contexts = self.run_block(block, x, contexts, c, mods)
        return x

    def block_modulations(self, c: Tensor) -> list[list[Tensor]]:
        """Every block's per-stream adaLN_modulation(c) from one matmul over the concatenated weights.

        y is the same vector for every block, so the depth x streams small (B, D) x (D, 6 D) products become one
        wide one; the weights stay where they are (concatenated per call, so gradients reach each of them).
        """
        linears = [s.adaLN_modulation[1] for b in self.joint_blocks for s in (b.x_block, *b.context_blocks)]
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears])
        out = F.linear(F.silu(c), weight, bias).split([lin.out_features for lin in linears], dim=1)
        per_block = 1 + self.num_context_streams
        return [list(out[i : i + per_block]) for i in range(0, len(out), per_block)]


class MMDiT3(MMDiT):
    """3-stream MM-DiT: separate weights for the first context_split text tokens (CLIP) and the rest (T5)."""

    num_context_streams = 2

    def __init__(self, *, context_split: int | None = 77, **kwargs):
        super().__init__(**kwargs)
        if context_split is not None and (isinstance(context_split, bool) or not isinstance(context_split, int)
                                          or context_split < 1):
            raise ValueError(f"context_split={context_split!r} is not allowed; allowed: a positive integer, or null "
                             f"(half the context's tokens)")
        # None: half the tokens of the context it is given (a run sets it from its data's text groups instead).
        self.context_split = context_split
        self.context_embedder_2 = nn.Linear(self.context_dim, self.hidden_size)
        # The rest was initialised by MMDiT.__init__; the new embedder gets the same init as context_embedder.
        nn.init.xavier_uniform_(self.context_embedder_2.weight)
        nn.init.zeros_(self.context_embedder_2.bias)

    def _split(self, context: Tensor) -> int:
        return self.context_split if self.context_split is not None else max(context.shape[1] // 2, 1)

    def check_inputs(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> None:
        super().check_inputs(x, t, context, pooled)
        if context.shape[1] <= self._split(context):
            raise ValueError(
                f"context has {context.shape[1]} tokens; allowed: more than context_split={self._split(context)} "
                "(the first context_split tokens form one text stream, the rest the other)"
            )

    def embed_context(self, context: Tensor) -> list[Tensor]:
        split = self._split(context)
        first, second = context[:, :split], context[:, split:]
        return [self.context_embedder(first), self.context_embedder_2(second)]
