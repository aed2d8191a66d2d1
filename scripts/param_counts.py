"""Parameter counts of the paper's backbone configurations, built on the meta device (nothing is allocated).

SD3 setup (paper sections 4 and 5.2): patch 2, 16 latent channels, 256px latents (32 x 32), context 4096
wide (CLIP + T5 tokens), pooled c_vec 2048 wide; depth d gives hidden 64 d and d heads. The paper calls
d = 24 its "2B" and d = 38 its "8B" model.

    python scripts/param_counts.py [--depths 24 38] [--backbones mmdit dit ...] [--diffusers]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.models import BACKBONES, count_parameters  # noqa: E402
from src.models.convert_diffusers import diffusers_config  # noqa: E402

SD3_SETUP = dict(patch_size=2, in_channels=16, input_size=32, context_dim=4096, pooled_dim=2048)
PAPER_SIZES = {24: 2e9, 38: 8e9}  # the paper's "2B" and "8B"
CONTEXT_SPLIT = 77  # CLIP tokens before the T5 tokens (3-stream MM-DiT)


def build_meta(name: str, depth: int, qk_norm: str | None = None) -> torch.nn.Module:
    """The backbone `name` at depth d in the SD3 setup, on the meta device."""
    extra = dict(context_split=CONTEXT_SPLIT) if name == "mmdit3" else {}
    with torch.device("meta"):
        return BACKBONES[name](depth=depth, qk_norm=qk_norm, **SD3_SETUP, **extra)


def diffusers_count(model: torch.nn.Module) -> int:
    """Parameters of diffusers' SD3Transformer2DModel at the same configuration (meta device)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return count_parameters(SD3Transformer2DModel(**diffusers_config(model)))


def rows(depths, backbones, qk_norms, with_diffusers):
    for name in backbones:
        for depth in depths:
            for qk_norm in qk_norms:
                model = build_meta(name, depth, qk_norm)
                n = count_parameters(model)
                paper = PAPER_SIZES.get(depth) if name == "mmdit" else None
                row = dict(
                    backbone=name, depth=depth, hidden=model.hidden_size, heads=model.num_heads,
                    qk_norm=qk_norm or "-", params=n,
                    paper="-" if paper is None else f"{paper / 1e9:.0f}B",
                    deviation="-" if paper is None else f"{(n - paper) / paper:+.1%}",
                )  # fmt: skip
                if with_diffusers:
                    row["diffusers"] = diffusers_count(model) if name == "mmdit" else "-"
                yield row


def markdown(table: list[dict]) -> str:
    head = list(table[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        lines.append("| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=sorted(PAPER_SIZES))
    parser.add_argument("--backbones", nargs="+", default=["mmdit"], choices=sorted(BACKBONES))
    parser.add_argument("--qk-norm", action="store_true", help="also count with QK RMSNorm")
    parser.add_argument("--diffusers", action="store_true", help="cross-check with SD3Transformer2DModel")
    args = parser.parse_args(argv)
    qk_norms = [None, "rms_norm"] if args.qk_norm else [None]
    table = list(rows(args.depths, args.backbones, qk_norms, args.diffusers))
    print(f"SD3 setup: {SD3_SETUP}")
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()
