"""Shard reading throughput (src.data.shards.make_loader) against one training step's consumption.

Writes a temporary shard folder of random samples shaped like preprocessed real data (latents C x S x S, context
L x D, pooled P, float16), reads it as training does (shuffled, resampled, batched and normalised) with several
worker counts, and times one training step (forward, backward, AdamW; rf/lognorm(0.00, 1.00)) of the default
MM-DiT (conf/model/mmdit.yaml) at the same latent shape and batch. The loader must deliver more samples per
second than the step consumes.

    python bench/bench_shard_read.py                                   # CPU (~1-2 min on 2 cores)
    python bench/bench_shard_read.py --device cuda --workers 0 2 4 8   # GPU machine; bf16 autocast
    python bench/bench_shard_read.py --device cuda --depth 24          # also the paper's 2B model (d = 24)

Results go to bench/results/shard_read.md (the CPU and CUDA sections are rewritten independently).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.data.shards import make_loader, write_shards  # noqa: E402
from src.formulations import get_recipe  # noqa: E402
from src.models import MMDiT, count_parameters  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "shard_read.md"
MODEL_KEYS = ("depth", "hidden_size", "num_heads", "mlp_ratio", "patch_size", "qk_norm", "pos_grid")
RECIPE = "rf/lognorm(0.00, 1.00)"


def default_model_config() -> dict:
    """The default backbone's size settings from conf/model/mmdit.yaml (interpolated keys left out)."""
    cfg = yaml.safe_load((ROOT / "conf" / "model" / "mmdit.yaml").read_text())
    return {k: cfg[k] for k in MODEL_KEYS if k in cfg}


def write_bench_shards(folder: Path, n: int, latent: tuple, context: tuple, pooled: int, per_shard: int) -> float:
    """Random float16 samples as a shard folder; returns the seconds it took."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    write_shards(folder, rng.standard_normal((n, *latent), dtype=np.float32).astype(np.float16),
                 rng.standard_normal((n, *context), dtype=np.float32).astype(np.float16),
                 rng.standard_normal((n, pooled), dtype=np.float32).astype(np.float16),
                 [f"caption {i}" for i in range(n)], [{"index": i} for i in range(n)],
                 encoder_names=["bench"], samples_per_shard=per_shard, autoencoder="bench")
    return time.perf_counter() - start


def loader_throughput(folder: Path, batch: int, workers: int, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, samples per second after each worker's first batch), read as training reads.

    Each worker fills make_loader's shuffle buffer before its first batch, so the first max(1, workers) batches
    are start-up and are not timed.
    """
    warmup = max(1, workers)
    loader = make_loader(folder, batch_size=batch, shuffle=True, seed=0, resampled=True,
                         epoch_batches=batches + warmup, num_workers=workers)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(it)
    start = time.perf_counter()
    n = sum(b["x0"].shape[0] for b in it)
    return first, n / (time.perf_counter() - start)


def train_step_time(model_cfg: dict, latent: tuple, context: tuple, pooled: int, batch: int, device: str,
                    steps: int) -> tuple[float, int]:
    """Median seconds of one training step of the backbone on device, and its parameter count."""
    c, s, _ = latent
    torch.manual_seed(0)
    model = MMDiT(input_size=s, in_channels=c, context_dim=context[1], pooled_dim=pooled, **model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    f = get_recipe(RECIPE)
    x0 = torch.randn(batch, *latent, device=device)
    ctx = torch.randn(batch, *context, device=device)
    vec = torch.randn(batch, pooled, device=device)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    times = []
    for i in range(steps + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        t = f.sample_t(batch).to(device)
        eps = torch.randn_like(x0)
        with amp:
            z_t = f.add_noise(x0, eps, t)
            out = model(f.c_in(t).view(-1, 1, 1, 1) * z_t, f.c_noise(t), ctx, vec)
            loss = f.loss(out.float(), x0, eps, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - start)
    return statistics.median(times), count_parameters(model)


def machine(device: str) -> str:
    """One line describing where the numbers come from."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU fp32"
    return (f"{where}, {os.cpu_count()} CPU cores (load average {load:.1f} at the start), torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def write_section(key: str, text: str, out: Path = RESULTS) -> None:
    """Replace (or add) the <!-- key --> section of the results file out (temp file + rename)."""
    header = ("# Shard reading vs training-step consumption\n\nWritten by bench/bench_shard_read.py. Each worker's "
              "shuffle buffer (src.data.shards.SHUFFLE_BUFFER samples of raw tar bytes) fills before its first batch: "
              "at 154 x 4096 float16 contexts that is about 1.3 MB x 2000 = 2.6 GB of memory and several seconds "
              "per worker.\n")
    doc = out.read_text() if out.is_file() else header
    block = f"<!-- {key} -->\n{text.rstrip()}\n<!-- /{key} -->\n"
    pattern = re.compile(rf"<!-- {key} -->.*?<!-- /{key} -->\n", re.S)
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc.rstrip() + "\n\n" + block
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(doc)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=512, help="samples written (read repeatedly, resampled)")
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--batch", type=int, default=None, help="batch (default 16 on CPU, 256 on CUDA)")
    p.add_argument("--latent", type=int, nargs=3, default=(4, 32, 32), metavar=("C", "H", "W"))
    p.add_argument("--context", type=int, nargs=2, default=(154, 4096), metavar=("L", "D"))
    p.add_argument("--pooled", type=int, default=2048)
    p.add_argument("--workers", type=int, nargs="+", default=(0, 2))
    p.add_argument("--batches", type=int, default=None, help="batches timed per loader (default 8 CPU, 24 CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 3 CPU, 10 CUDA)")
    p.add_argument("--depth", type=int, nargs="*", default=(), help="also time these paper-size depths (hidden 64 d)")
    p.add_argument("--depth-batch", type=int, default=None, help="batch for the --depth models (default: --batch)")
    p.add_argument("--tmp", default=None, help="folder for the temporary shards (default: the system's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results file (default: bench/results/shard_read.md)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    batch = args.batch or (256 if cuda else 16)
    batches = args.batches or (24 if cuda else 8)
    steps = args.steps or (10 if cuda else 3)
    latent, context = tuple(args.latent), tuple(args.context)
    header = machine(args.device)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "shards"
        write_s = write_bench_shards(folder, args.samples, latent, context, args.pooled, args.per_shard)
        size = sum(f.stat().st_size for f in folder.glob("*.tar")) / args.samples
        print(f"wrote {args.samples} samples ({size / 1e6:.2f} MB each) in {write_s:.1f} s")
        reads, firsts = {}, {}
        for w in args.workers:
            firsts[w], reads[w] = loader_throughput(folder, batch, w, batches)
            print(f"loader, {w} workers: first batch after {firsts[w]:.1f} s, then {reads[w]:.0f} samples/s")

    models = [("default (conf/model/mmdit.yaml)", default_model_config(), batch)]
    models += [(f"paper size d={d}", dict(depth=d, hidden_size=None, num_heads=None, qk_norm="rms_norm"),
                args.depth_batch or batch) for d in args.depth]
    rows, best = [], max(reads.values())
    for name, cfg, model_batch in models:
        try:
            seconds, params = train_step_time(cfg, latent, context, args.pooled, model_batch, args.device, steps)
        except torch.OutOfMemoryError:
            print(f"{name}: out of memory at batch {model_batch}")
            rows.append(f"| {name} | | {model_batch} | out of memory | | | |")
            continue
        finally:
            if cuda:
                torch.cuda.empty_cache()
        consume = model_batch / seconds
        print(f"{name}: {params:,} parameters, step {seconds * 1e3:.1f} ms at batch {model_batch} = "
              f"{consume:.0f} samples/s")
        verdict = "loader keeps up" if best >= consume else "loader is the bottleneck"
        rows.append(f"| {name} | {params:,} | {model_batch} | {seconds * 1e3:.1f} | {consume:.0f} | {best:.0f} | "
                    f"{best / consume:.2f} ({verdict}) |")

    lines = [
        f"## {'CUDA' if cuda else 'CPU'}",
        "",
        f"{header}. Loader batch {batch}; latents {'x'.join(map(str, latent))}, context {context[0]} x {context[1]}, "
        f"pooled {args.pooled} (float16 on disk, {size / 1e6:.2f} MB per sample); {args.samples} samples in shards "
        f"of {args.per_shard}, read with make_loader(shuffle=True, resampled=True) for {batches} batches after each "
        f"worker's first batch (start-up: the shuffle buffer fills). Training step = forward + backward + AdamW "
        f"of MM-DiT with {RECIPE}"
        f"{', bf16 autocast' if cuda else ''}, median of {steps} after 2 warm-up steps.",
        "",
        "| loader workers | first batch (s) | samples/s after start-up |",
        "|---|---|---|",
        *[f"| {w} | {firsts[w]:.1f} | {r:.0f} |" for w, r in reads.items()],
        "",
        "| model | params | batch | step (ms) | consumes (samples/s) | best loader (samples/s) | loader / step |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    write_section("cuda" if cuda else "cpu", "\n".join(lines), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
