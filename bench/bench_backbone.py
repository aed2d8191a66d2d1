"""One training step (forward, backward, AdamW) of our MMDiT vs diffusers' SD3Transformer2DModel.

Both models get identical weights (through src/models/convert_diffusers.py) and inputs, run in the same
process with interleaved repetitions, and report median step times, their ratio and peak memory.

    python bench/bench_backbone.py                       # CPU fp32, two small sizes (~1-2 min on 2 cores)
    python bench/bench_backbone.py --compile             # also torch.compile(ours)
    python bench/bench_backbone.py --device cuda --dtype bf16 --batch 32   # d = 24 at 256px: throughput, MFU

Results go to bench/results/backbone.md (one section per device and CUDA batch size, each rewritten alone).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.models import MMDiT, count_parameters  # noqa: E402
from src.models.convert_diffusers import diffusers_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "backbone.md"
CPU_SIZES = [dict(depth=2, hidden_size=128, num_heads=2), dict(depth=4, hidden_size=256, num_heads=4)]
CPU_SETUP = dict(input_size=32, patch_size=2, in_channels=4, context_dim=256, pooled_dim=256, context_len=32)
# Paper setup at 256px (docs/backbone.md#backbone-mm-dit): 32 x 32 latents of 16 channels, 154 CLIP+T5 tokens of 4096, pooled 2048.
CUDA_SETUP = dict(input_size=32, patch_size=2, in_channels=16, context_dim=4096, pooled_dim=2048, context_len=154)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


# ---- models and one training step -------------------------------------------------------------------
def build_ours(size: dict, setup: dict, device: str, qk_norm: str | None = None) -> MMDiT:
    """Our MMDiT, built on the device with random weights everywhere (no zero-initialised shortcuts)."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in setup.items() if k != "context_len"}
    with torch.device(device):
        ours = MMDiT(**kwargs, **size, qk_norm=qk_norm)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    return ours


def make_batch(setup: dict, batch: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    s, c, length = setup["input_size"], setup["in_channels"], setup["context_len"]
    tensors = (
        torch.randn(batch, c, s, s, generator=g),
        torch.rand(batch, generator=g),
        torch.randn(batch, length, setup["context_dim"], generator=g),
        torch.randn(batch, setup["pooled_dim"], generator=g),
        torch.randn(batch, c, s, s, generator=g),
    )
    return tuple(x.to(device) for x in tensors)


def make_step(model, kind: str, batch: tuple, amp_dtype: torch.dtype | None):
    """A closure running one AdamW training step on a fixed batch."""
    x, t, ctx, pooled, target = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    device_type = x.device.type

    def forward():
        if kind == "ours":
            return model(x, t, ctx, pooled)
        return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=1000 * t).sample

    def step():
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = (forward().float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_step_memory(step) -> float:
    """Peak bytes held by torch tensors allocated during one step, above the level at its start.

    From the profiler's per-operator allocations and frees (profile_memory=True), summed in start order;
    tracemalloc does not see torch's allocator and RSS hides memory that malloc keeps for reuse.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    level = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def train_flops(model: MMDiT, batch_size: int, n_img: int, n_txt: int, attention: bool = True) -> float:
    """Model FLOPs of one MMDiT training step (forward + backward = 3 x forward; a multiply-add is 2 FLOPs)."""
    d, r = model.hidden_size, model.mlp_ratio
    per_sample = 2 * (256 * d + d * d) + 2 * (model.pooled_dim * d + d * d)  # time and pooled MLPs
    per_sample += 2 * n_img * model.in_channels * model.patch_size**2 * d  # patch embedding
    per_sample += 2 * n_txt * model.context_dim * d  # context embedder
    for i in range(model.depth):
        pre_only = i == model.depth - 1
        for n, is_text in ((n_img, False), (n_txt, True)):
            post = not (is_text and pre_only)
            per_sample += 2 * d * (6 if post else 2) * d  # adaLN modulation
            per_sample += 2 * n * 3 * d * d  # QKV
            per_sample += 2 * n * (d * d + 2 * int(r * d) * d) if post else 0  # output projection and MLP
        per_sample += 4 * (n_img + n_txt) ** 2 * d if attention else 0  # Q K^T and A V
    per_sample += 2 * d * 2 * d + 2 * n_img * d * model.patch_size**2 * model.in_channels  # output head
    return 3.0 * per_sample * batch_size


# ---- CPU: ours vs diffusers ---------------------------------------------------------------------------
def bench_cpu(args) -> str:
    torch.set_num_threads(args.threads)
    setup = CPU_SETUP
    lines = [
        f"CPU fp32, {torch.get_num_threads()} thread(s), torch {torch.__version__}; batch {args.batch}, "
        f"{setup['input_size']}x{setup['input_size']}x{setup['in_channels']} latents (patch 2: "
        f"{(setup['input_size'] // 2) ** 2} image tokens), {setup['context_len']} text tokens x "
        f"{setup['context_dim']}, pooled {setup['pooled_dim']}; medians of {args.reps} interleaved repetitions "
        f"after {args.warmup} warm-up steps. Step = forward + backward + AdamW. Peak memory: torch allocations "
        "during one step above the level before it (profiler). One thread by default: on a shared 2-core "
        "machine timings with 2 threads swing by 10x; --threads 2 to use both."
        + (" torch.compile(ours): default mode, interleaved with the others; compile time apart." if args.compile else ""),
        "",
        "| depth | hidden | params | ours (ms) | diffusers (ms) | diffusers / ours | peak memory ours (MiB) | "
        "peak memory diffusers (MiB) |" + (" ours compiled (ms) | ours / compiled | compile (s) |" if args.compile else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.compile else ""),
    ]
    for size in CPU_SIZES:
        ours = build_ours(size, setup, "cpu")
        theirs = diffusers_model(ours)
        batch = make_batch(setup, args.batch, "cpu")
        steps = {"ours": make_step(ours, "ours", batch, None), "diffusers": make_step(theirs, "diffusers", batch, None)}
        if args.compile:
            steps["compiled"] = make_step(torch.compile(ours), "ours", batch, None)
            compile_s = timed(steps["compiled"], "cpu")
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times = {k: [] for k in steps}
        for r in range(args.reps):
            for k in list(steps)[:: 1 if r % 2 == 0 else -1]:  # alternate the order
                times[k].append(timed(steps[k], "cpu"))
        mem = {k: peak_step_memory(steps[k]) / 2**20 for k in ("ours", "diffusers")}
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        lines.append(
            f"| {size['depth']} | {size['hidden_size']} | {count_parameters(ours):,} | {med['ours']:.1f} | "
            f"{med['diffusers']:.1f} | {med['diffusers'] / med['ours']:.2f} | {mem['ours']:.0f} | "
            f"{mem['diffusers']:.0f} |"
            + (f" {med['compiled']:.1f} | {med['ours'] / med['compiled']:.2f} | {compile_s:.0f} |" if args.compile else "")
        )
        print(lines[-1], flush=True)
        del ours, theirs, steps
        gc.collect()
    return "\n".join(lines)


# ---- CUDA: throughput and model FLOPs utilisation at the paper's d = 24 ------------------------------
def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific first
        if key in name:
            return value
    raise ValueError(f"GPU {name!r} has no known bf16 peak; pass --peak-tflops")


def bench_cuda(args) -> str:
    amp = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    size = dict(depth=args.depth)
    peak = peak_tflops(args)
    batch = make_batch(CUDA_SETUP, args.batch, "cuda")
    lines = [
        f"CUDA {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype} autocast (fp32 weights, "
        f"AdamW); d = {args.depth} (hidden {64 * args.depth}), batch {args.batch}, 256px "
        f"(32x32x16 latents, 256 image tokens), 154 text tokens x 4096, pooled 2048; median of {args.reps} steps "
        f"after {args.warmup} warm-up steps. MFU = model FLOPs (matmuls and attention, forward + backward = 3 x "
        f"forward) / step time / {peak:.0f} TFLOP/s bf16 dense peak. The models do not fit in memory together, "
        "so they run one after the other.",
        "",
        "| model | params | step (ms) | images/s | TFLOP/s | MFU | peak memory (GiB) | warm-up incl. compile (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    variants = ["ours"] + ([] if args.no_diffusers else ["diffusers"]) + (["ours compiled"] if args.compile else [])
    n_img, n_txt = (CUDA_SETUP["input_size"] // 2) ** 2, CUDA_SETUP["context_len"]
    for variant in variants:
        model = build_ours(size, CUDA_SETUP, "cuda", qk_norm=args.qk_norm)
        n_params, flops = count_parameters(model), train_flops(model, args.batch, n_img, n_txt)
        if variant == "diffusers":
            model = diffusers_model(model)  # ours is freed here: the two do not fit together with AdamW
        elif variant == "ours compiled":
            model = torch.compile(model)
        step = make_step(model, "diffusers" if variant == "diffusers" else "ours", batch, amp)
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - start
        torch.cuda.reset_peak_memory_stats()
        ms = statistics.median(timed(step, "cuda") for _ in range(args.reps)) * 1e3
        tflops = flops / (ms / 1e3) / 1e12
        lines.append(
            f"| {variant} | {n_params:,} | {ms:.1f} | {args.batch / (ms / 1e3):.1f} | {tflops:.0f} | "
            f"{tflops / peak:.1%} | {torch.cuda.max_memory_allocated() / 2**30:.1f} | {warmup_s:.0f} |"
        )
        print(lines[-1], flush=True)
        del model, step
        gc.collect()
        torch.cuda.empty_cache()
    return "\n".join(lines)


# ---- results file ---------------------------------------------------------------------------------------
def write_section(name: str, body: str, out: Path = RESULTS) -> None:
    """Replace this device's section of out (bench/results/backbone.md), keeping the other (temp file + rename)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"  # one section per device (and CUDA batch size)
    text = out.read_text() if out.exists() else "# Backbone benchmark: our MMDiT vs diffusers' SD3Transformer2DModel\n"
    section = f"{start}\n## {name.upper()}\n\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    parser.add_argument("--reps", type=int, default=None, help="default: 9 on CPU, 20 on CUDA")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--depth", type=int, default=24, help="CUDA only (hidden 64 d, d heads)")
    parser.add_argument("--qk-norm", default=None, choices=[None, "rms_norm"], help="CUDA only")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument("--no-diffusers", action="store_true", help="CUDA only: skip diffusers")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable on a shared machine)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the GPU (default: by name)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file (default: bench/results/backbone.md)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (32 if cuda else 4)
    args.reps = args.reps or (20 if cuda else 9)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if not cuda and args.dtype != "fp32":
        raise SystemExit(f"--dtype {args.dtype} on CPU is not supported; allowed: fp32")
    body = bench_cuda(args) if cuda else bench_cpu(args)
    write_section("cpu" if not cuda else f"cuda batch {args.batch}", body, args.out)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
