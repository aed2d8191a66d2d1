"""The frame every backbone shares (docs/backbone.md#backbone-mm-dit): embedders, cropped positional grid, output head, checks.

Call signature of all backbones: backbone(x (B,C,H,W), t (B,), context (B,L,context_dim), pooled
(B,pooled_dim)) -> (B,C,H,W). t is the formulation's c_noise(t), O(1); the backbone embeds 1000 * t as
diffusers' SD3Transformer2DModel does with its timestep. The conditioning vector is
y = MLP(sinusoidal(1000 t)) + MLP(pooled) (paper section 4, Fig. 2a). Subclasses define the blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    POS_GRIDS,
    QK_NORMS,
    FinalLayer,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedder,
    VectorEmbedder,
    choices,
    sincos_2d_grid,
)
from .perf import ATTENTION_BACKENDS, AUTO_BOOL, COMPILE_BACKENDS, attention_context, check_choice, compile_setting

TIME_SCALE = 1000.0  # the network sees 1000 * c_noise(t) (diffusers' timestep convention)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: a positive integer")
    return value


class Backbone(nn.Module):
    """Patch, time and text embedders, the cropped 2D sin-cos grid, the output head; blocks come from subclasses.

    Sized by depth d as in the paper: hidden 64 d, d heads of width 64, MLP ratio 4; hidden_size and
    num_heads override. input_size is the base latent side (the paper's 256px grid); inputs of other sizes
    and aspect ratios take the centre crop of a pos_embed_max_size-square grid of patch positions.
    `compile` is only recorded (compile_requested) for the caller, which compiles the backbone itself
    (src/models/perf.py compile_backbone). The other throughput options (perf.py) change how the same weights
    are used, never the state-dict layout: fused_qkv (one QKV matmul per stream, else three on its slices),
    fused_modulation (MM-DiT: every block's adaLN projection of y in one matmul over the concatenated weights;
    "auto" = on CUDA only), attention_backend (the SDPA kernel), activation_checkpointing (recompute each
    block's activations in the backward pass instead of storing them).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 16,
        depth: int = 2,
        hidden_size: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        pos_embed_max_size: int | None = None,
        pos_grid: str = "centered",
        pos_embed_ref_size: int | None = None,
        qk_norm: str | None = None,
        compile: bool | str = False,
        compile_backend: str = "default",
        fused_qkv: bool = True,
        fused_modulation: bool | str = False,
        attention_backend: str = "auto",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.depth = _positive_int("depth", depth)
        self.hidden_size = _positive_int("hidden_size", 64 * depth if hidden_size is None else hidden_size)
        if num_heads is None:
            if self.hidden_size % 64:
                raise ValueError(
                    f"num_heads=None is not allowed with hidden_size={self.hidden_size}; "
                    "allowed: set num_heads, or a hidden_size that is a multiple of 64 (heads of width 64)"
                )
            num_heads = self.hidden_size // 64
        self.num_heads = _positive_int("num_heads", num_heads)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={num_heads} is not allowed with hidden_size={self.hidden_size}; allowed: divisors of it"
            )
        self.patch_size = _positive_int("patch_size", patch_size)
        self.input_size = _positive_int("input_size", input_size)
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not allowed; allowed: multiples of patch_size={patch_size}")
        self.in_channels = _positive_int("in_channels", in_channels)
        self.context_dim = _positive_int("context_dim", context_dim)
        self.pooled_dim = _positive_int("pooled_dim", pooled_dim)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < math.inf:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} is not allowed; allowed: a positive finite number")
        self.mlp_ratio = float(mlp_ratio)
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r} is not supported; allowed: {choices(QK_NORMS)}")
        self.qk_norm = qk_norm
        if pos_grid not in POS_GRIDS:
            raise ValueError(f"pos_grid={pos_grid!r} is not supported; allowed: {choices(POS_GRIDS)}")
        self.pos_grid = pos_grid
        base = input_size // patch_size
        self.pos_embed_max_size = 2 * base if pos_embed_max_size is None else pos_embed_max_size
        if _positive_int("pos_embed_max_size", self.pos_embed_max_size) < base:
            raise ValueError(
                f"pos_embed_max_size={pos_embed_max_size} is not allowed; allowed: at least "
                f"input_size / patch_size = {base} patches"
            )
        self.pos_embed_ref_size = base if pos_embed_ref_size is None else pos_embed_ref_size
        _positive_int("pos_embed_ref_size", self.pos_embed_ref_size)
        self.compile_requested = compile_setting(compile)
        check_choice("compile_backend", compile_backend, COMPILE_BACKENDS)
        self.compile_backend = compile_backend
        check_choice("fused_qkv", fused_qkv, (True, False))
        self.fused_qkv = bool(fused_qkv)
        check_choice("fused_modulation", fused_modulation, AUTO_BOOL)
        if fused_modulation is True and not self.supports_fused_modulation:
            raise ValueError(
                f"fused_modulation=True is not allowed for {type(self).__name__}; allowed: 'auto', False "
                "(only MM-DiT computes its blocks' modulations in one matmul)"
            )
        self.fused_modulation = fused_modulation
        check_choice("attention_backend", attention_backend, ATTENTION_BACKENDS)
        self.attention_backend = attention_backend
        check_choice("activation_checkpointing", activation_checkpointing, (True, False))
        self.activation_checkpointing = bool(activation_checkpointing)

        self.x_embedder = PatchEmbed(patch_size, in_channels, self.hidden_size)
        self.t_embedder = TimestepEmbedder(self.hidden_size)
        self.y_embedder = VectorEmbedder(pooled_dim, self.hidden_size)
        self.context_embedder = nn.Linear(context_dim, self.hidden_size)
        grid = sincos_2d_grid(self.hidden_size, self.pos_embed_max_size, base, pos_grid, self.pos_embed_ref_size)
        # Persistent, as in diffusers: a converted checkpoint carries its own grid.
        self.register_buffer("pos_embed", grid.unsqueeze(0), persistent=True)
        self.final_layer = FinalLayer(self.hidden_size, patch_size, in_channels)

    # ---- to be defined by each backbone ------------------------------------------------------------
    def forward_blocks(self, x: Tensor, contexts: list[Tensor], c: Tensor) -> Tensor:
        """Image tokens (B, N, D) after the transformer blocks, given text token streams and y."""
        raise NotImplementedError

    def embed_context(self, context: Tensor) -> list[Tensor]:
        """Text token streams in the hidden size (one stream; MMDiT3 splits it in two)."""
        return [self.context_embedder(context)]

    supports_fused_modulation = False  # MM-DiT computes every block's adaLN modulation in one matmul
    block_lists: tuple[str, ...] = ()  # names of the ModuleLists (or modules) holding the transformer blocks

    # ---- shared -------------------------------------------------------------------------------------
    def transformer_blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order of their lists (the units of regional compilation)."""
        out = []
        for name in self.block_lists:
            module = getattr(self, name, None)
            if isinstance(module, nn.ModuleList):
                out.extend(module)
            elif module is not None:
                out.append(module)
        return out

    def run_block(self, block: nn.Module, *args):
        """block(*args), its activations recomputed in the backward pass under activation_checkpointing."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            # The backward's recompute runs outside forward()'s attention context: enter it there too, or the
            # recompute picks torch's own kernel and its saved tensors differ from the forward's (CheckpointError).
            device = args[0].device.type

            def contexts():
                return (attention_context(self.attention_backend, device),
                        attention_context(self.attention_backend, device))

            return checkpoint(block, *args, use_reentrant=False, context_fn=contexts)
        return block(*args)

    def initialize_weights(self) -> None:
        """DiT's initialisation with adaLN-Zero: every modulation and the final projection start at zero.

        Every subclass calls this once its blocks exist, so the layer options are handed to them here too.
        """
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.fused_qkv = self.fused_qkv

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for embedder in (self.t_embedder, self.y_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for module in self.modules():
            if hasattr(module, "adaLN_modulation"):
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """Centre crop (1, h w, D) of the positional grid for h x w patches (docs/backbone.md#positional-embedding)."""
        m = self.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top : top + h, left : left + w, :]
        return grid.reshape(1, h * w, -1)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h w, p p C) tokens -> (B, C, h p, w p)."""
        p, c = self.patch_size, self.in_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def check_inputs(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> None:
        """Raise a ValueError naming the bad input, its value and what is allowed."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x has shape {tuple(x.shape)}; allowed: (B, in_channels={self.in_channels}, H, W)")
        b = x.shape[0]
        p, m = self.patch_size, self.pos_embed_max_size
        for name, side in (("height", x.shape[2]), ("width", x.shape[3])):
            if side % p or not 0 < side <= p * m:
                raise ValueError(
                    f"latent {name} {side} is not allowed; allowed: multiples of patch_size={p} up to "
                    f"patch_size * pos_embed_max_size = {p * m}"
                )
        if t.shape != (b,):
            raise ValueError(f"t has shape {tuple(t.shape)}; allowed: ({b},), one time per sample")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim or context.shape[1] < 1:
            raise ValueError(
                f"context has shape {tuple(context.shape)}; allowed: ({b}, L >= 1, context_dim={self.context_dim})"
            )
        if pooled.shape != (b, self.pooled_dim):
            raise ValueError(f"pooled has shape {tuple(pooled.shape)}; allowed: ({b}, pooled_dim={self.pooled_dim})")

    def forward(self, x: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        """Network output of the same shape as x, for times t = c_noise(t) and text conditioning."""
        self.check_inputs(x, t, context, pooled)
        h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        tokens = self.x_embedder(x) + self.cropped_pos_embed(h, w)
        c = self.t_embedder(TIME_SCALE * t) + self.y_embedder(pooled)
        with attention_context(self.attention_backend, x.device.type):
            tokens = self.forward_blocks(tokens, self.embed_context(context), c)
        return self.unpatchify(self.final_layer(tokens, c), h, w)

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"patch_size={self.patch_size}, qk_norm={self.qk_norm}"
        )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as the positional grid excluded); works on the meta device."""
    return sum(p.numel() for p in model.parameters())

