"""Shard loader throughput vs what one training step of the default model consumes; writes bench/results/loader.md.

python bench/bench_loader.py [--quick]

Loader: src.data.shards.make_loader over the embedded digits shards (written with the committed tiny CLIP) and
over synthetic shards shaped like real SD3-style data (4x32x32 latents, 77 x 768 context). Training step: the
default backbone (conf/model/mmdit.yaml, built as `python -m src.run` builds it, on digits, batch 64) with
rf/lognorm(0.00, 1.00) and AdamW.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from src.utils.io import atomic_write_bytes  # noqa: E402
from src.data.embedded import prepare_embedded  # noqa: E402
from src.data.shards import load_eval_set, make_loader, read_meta, write_shards  # noqa: E402

BATCH = 64  # conf/data/digits.yaml


def loader_throughput(shard_dir: Path, batch_size: int, batches: int, num_workers: int, repeats: int) -> float:
    """Median samples/s of a shuffled, resampled loader over `batches` batches (start-up included)."""
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        loader = make_loader(shard_dir, batch_size, shuffle=True, seed=r, resampled=True, epoch_batches=batches,
                             num_workers=num_workers)
        n = sum(len(b["caption"]) for b in loader)
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def training_step_time(meta: dict, steps: int) -> tuple[float, str]:
    """Median seconds of one optimisation step of the default backbone at batch 64, and what was timed."""
    from hydra import compose, initialize_config_dir

    from src.config import register_resolvers
    from src.formulations import get_recipe
    from src.training.job import build_backbone

    register_resolvers()
    g = torch.Generator().manual_seed(0)
    c, s = meta["latent_channels"], meta["latent_size"]
    x0 = torch.randn(BATCH, c, s, s, generator=g)
    ctx = torch.randn(BATCH, meta["context_length"], meta["context_dim"], generator=g)
    pooled = torch.randn(BATCH, meta["pooled_dim"], generator=g)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config")  # the default run's model, as `python -m src.run` builds it
    cfg.model.input_size, cfg.model.in_channels = s, c
    cfg.model.context_dim, cfg.model.pooled_dim = meta["context_dim"], meta["pooled_dim"]
    model = build_backbone(cfg)
    f = get_recipe("rf/lognorm(0.00, 1.00)")
    what = (f"MM-DiT depth {cfg.model.depth}, hidden {cfg.model.hidden_size}, {cfg.model.num_heads} heads "
            f"(conf/model/mmdit.yaml), rf/lognorm(0.00, 1.00), AdamW")

    def loss_fn():
        t = f.sample_t(BATCH, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        z_t = f.add_noise(x0, eps, t)
        out = model(f.c_in(t).view(-1, 1, 1, 1) * z_t, f.c_noise(t), ctx, pooled)
        return f.loss(out, x0, eps, t).mean()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - start)
    return statistics.median(times), what


def synthetic_real_like(folder: Path, n: int) -> Path:
    """Shards shaped like real data: latents 4x32x32 (256 px through an f8 autoencoder), CLIP-L-sized text."""
    g = torch.Generator().manual_seed(0)
    write_shards(folder, torch.randn(n, 4, 32, 32, generator=g), torch.randn(n, 77, 768, generator=g),
                 torch.randn(n, 768, generator=g), [f"a synthetic caption {i}" for i in range(n)],
                 [{"label": i % 10} for i in range(n)], encoder_names=["synthetic"], samples_per_shard=128)
    return folder


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loader.md")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    batches, repeats, steps = (20, 1, 5) if args.quick else (100, 3, 20)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dirs = prepare_embedded("digits", Path(tmp) / "cache")
        prep_s = time.perf_counter() - start
        meta = read_meta(dirs["train"])
        start = time.perf_counter()
        load_eval_set(dirs["eval"])
        eval_s = time.perf_counter() - start
        for workers in (0, 2):
            rate = loader_throughput(dirs["train"], BATCH, batches, workers, repeats)
            rows.append(("digits (1x16x16, context 16x64)", workers, rate))
        real = synthetic_real_like(Path(tmp) / "real", 512)
        for workers in (0, 2):
            rate = loader_throughput(real, BATCH, batches // 2, workers, repeats)
            rows.append(("real-like (4x32x32, context 77x768)", workers, rate))
        step_s, what = training_step_time(meta, steps)
    consumed = BATCH / step_s
    load_after = os.getloadavg()[0]
    lines = [
        "# Shard loader throughput",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after: other jobs share the cores), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; "
        f"batch {BATCH}, shuffle on, resampled, median of {repeats} run(s) of {batches} batches (start-up "
        "included). Written by `python bench/bench_loader.py`.",
        "",
        "| shards | loader workers | samples/s | vs training step |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {w} | {rate:,.0f} | {rate / consumed:.1f}x |" for name, w, rate in rows]
    lines += [
        "",
        f"Training step ({what}, batch {BATCH}, CPU): {step_s * 1e3:.1f} ms median over {steps} steps, i.e. it "
        f"consumes {consumed:,.0f} samples/s.",
        f"Preparing the digits shards (both splits, tiny CLIP text embeddings): {prep_s:.1f} s; "
        f"load_eval_set of the 297 held-out digits: {eval_s * 1e3:.0f} ms.",
        "",
        "A ratio above 1 means the loader outpaces the step on this machine. On a GPU the step is far faster:",
        "use loader workers (each reads its own shards) and more shards than ranks x workers.",
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, text.encode())
    print(text)
    return text


if __name__ == "__main__":
    main()
