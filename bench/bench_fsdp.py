"""Per-rank training state and step time, trainer=ddp vs trainer=fsdp; writes bench/results/fsdp.md.

python bench/bench_fsdp.py [--quick]

Two ranks on the CPU (gloo), one process each, as the trainer runs them: the backbone and its EMA copy, AdamW on the
backbone, one optimisation step on an MM-DiT. DDP: the torch DistributedDataParallel replica. FSDP: FULL_SHARD with
the project's wrap policy (src.launch.strategies.backbone_wrap_policy: each backbone and each of its blocks a unit,
use_orig_params), device_id=cpu as src.launch.strategies.FSDPStrategy passes it. Counted per rank after the step:
the bytes of the parameters (trained + EMA), gradients and AdamW moments the rank holds. Activations are not
counted (the same under both). The measured per-rank fraction is then applied to the paper's 8B backbone
(model=mmdit_d38, counted on the meta device) to say what one GPU must hold. Step times on the CPU over gloo say
little about GPUs over NCCL; they are reported as a ratio only.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from src.utils.io import atomic_write_bytes  # noqa: E402

BATCH = 8  # global; 4 per rank


def build(depth: int, hidden: int):
    from src.models import MMDiT
    from src.training.ema import make_ema_copy

    torch.manual_seed(0)
    backbone = MMDiT(input_size=16, in_channels=4, depth=depth, hidden_size=hidden, num_heads=hidden // 64,
                     patch_size=2, context_dim=256, pooled_dim=256)
    pair = torch.nn.Module()
    pair.backbone, pair.ema_backbone = backbone, make_ema_copy(backbone)
    return pair


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def worker(rank: int, port: int, strategy: str, depth: int, hidden: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from src.formulations import get_recipe
    from src.training.ema import ema_update

    pair = build(depth, hidden)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        backbone, ema = DDP(pair.backbone), pair.ema_backbone
        trained = pair.backbone
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        from src.launch.strategies import backbone_wrap_policy

        wrapped = FSDP(pair, auto_wrap_policy=backbone_wrap_policy(), use_orig_params=True,
                       device_id=torch.device("cpu"))
        backbone, ema, trained = wrapped.backbone, wrapped.ema_backbone, wrapped.backbone
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    f = get_recipe("rf/lognorm(0.00, 1.00)")
    g = torch.Generator().manual_seed(rank)
    n = BATCH // 2
    x0, ctx, pooled = torch.randn(n, 4, 16, 16, generator=g), torch.randn(n, 32, 256, generator=g), torch.randn(n, 256)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        t = f.sample_t(n, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        z = f.add_noise(x0, eps, t)
        loss = f.loss(backbone(z, f.c_noise(t), ctx, pooled), x0, eps, t).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        ema_update(ema, trained, 0.99)
        times.append(time.perf_counter() - start)
    held = {
        "parameters": tensor_bytes([*trained.parameters(), *ema.parameters()]),
        "gradients": tensor_bytes([p.grad for p in trained.parameters()]),
        "adamw": tensor_bytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]),
    }
    result = torch.tensor([held["parameters"], held["gradients"], held["adamw"], statistics.median(times[1:])],
                          dtype=torch.float64)
    gathered = [torch.zeros_like(result) for _ in range(2)]
    dist.all_gather(gathered, result)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(strategy: str, depth: int, hidden: int, steps: int) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.pt")
        mp.start_processes(worker, args=(free_port(), strategy, depth, hidden, steps, out), nprocs=2,
                           start_method="spawn")
        return torch.load(out, weights_only=True)


def d38_parameters() -> int:
    """model=mmdit_d38 composed as a job composes it (its defaults list: base/backbone.yaml), built on the meta
    device at the paper's data shapes, as src.plan builds it."""
    from src import plan
    from src.data.expectations import PAPER_DATA
    from src.models import count_parameters

    with plan._hydra_context():
        cfg = plan._compose(["model=mmdit_d38", "data=shards"])
        return count_parameters(plan.build_on_meta(cfg, dict(PAPER_DATA)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smaller backbone and fewer steps")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fsdp.md",
                    help="results file (default: bench/results/fsdp.md)")
    args = ap.parse_args(argv)
    depth, hidden, steps = (2, 128, 3) if args.quick else (6, 384, 6)
    rows = {s: measure(s, depth, hidden, steps) for s in ("ddp", "fsdp")}
    gib = 2**30
    n_params = sum(p.numel() for p in build(depth, hidden).backbone.parameters())
    lines = [
        "# Per-rank training state: trainer=ddp vs trainer=fsdp",
        "",
        f"`python bench/bench_fsdp.py{' --quick' if args.quick else ''}` on {platform.machine()}, torch "
        f"{torch.__version__}, 2 ranks on the CPU (gloo), MM-DiT depth {depth}, hidden {hidden} "
        f"({n_params / 1e6:.2f}M parameters), global batch {BATCH}, 16x16x4 latents, 32 context tokens.",
        "",
        "| strategy | rank | parameters (trained + EMA) MiB | gradients MiB | AdamW moments MiB | total MiB | step ms |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = {}
    for s, r in rows.items():
        for rank in range(2):
            p, g, a, t = r[rank].tolist()
            lines.append(f"| {s} | {rank} | {p / 2**20:.2f} | {g / 2**20:.2f} | {a / 2**20:.2f} | "
                         f"{(p + g + a) / 2**20:.2f} | {t * 1e3:.1f} |")
        totals[s] = float(r[:, :3].sum(dim=1).max())
    fraction = totals["fsdp"] / totals["ddp"]
    step_ratio = float(rows["fsdp"][:, 3].max() / rows["ddp"][:, 3].max())
    n38 = d38_parameters()
    per_param = totals["ddp"] / n_params  # bytes of state per backbone parameter under DDP (fp32: 4+4+4+8 = 20)
    ddp38, fsdp8 = n38 * per_param / gib, n38 * per_param / 8 / gib
    lines += [
        "",
        f"- The largest rank under FSDP holds {fraction:.3f} of a DDP replica's state (ideal with 2 ranks: 0.5; the "
        "rest is each unit's padding to a multiple of the world size).",
        f"- DDP state is {per_param:.1f} bytes per backbone parameter (fp32 weights, EMA copy, gradients, two AdamW "
        "moments). For the paper's depth-38 MM-DiT "
        f"({n38 / 1e9:.2f}B parameters): {ddp38:.0f} GiB per GPU under DDP, more than an 80 GiB H100 or a 141 GB "
        f"H200 holds before any activation; {fsdp8:.0f} GiB per GPU under FSDP on 8 GPUs.",
        f"- Step time, FSDP / DDP on the CPU over gloo: {step_ratio:.2f}x (gathering and re-sharding each unit's "
        "weights; on GPUs NCCL overlaps this with compute).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    atomic_write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
