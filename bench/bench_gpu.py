"""Paper-scale training throughput of the MM-DiT step on one GPU, each throughput lever on and off; the rank
report's bootstrap on the GPU. One prepared run: `make bench-gpu` (under 6 minutes on one H100 / H200).

    python bench/bench_gpu.py                 # on a GPU: every configuration, then the bootstrap; bench/results/gpu.md
    python bench/bench_gpu.py --dry-run       # every configuration at tiny size on the CPU (tests/test_bench_gpu.py)
    python bench/bench_gpu.py --only d15-default d24-default --no-bootstrap

Setup: 256px (32x32x16 latents, 256 image tokens), 154 text tokens x 4096, pooled 2048, at d = 15 and d = 24 with
QK-norm (RMSNorm, as experiment=paper trains), per-GPU batch 128 (1024 over 8 GPUs) and the largest batch that fits. One step = forward + backward + AdamW, a fixed batch,
random weights everywhere. MFU = model FLOPs as the planner counts them (src/plan.py: 3 x the forward FLOPs counted
on the meta device) / step time / the device's dense bf16 peak. Diffusers' SD3Transformer2DModel (same weights
through src/models/convert_diffusers.py) runs the plain eager step at the same settings in the same run. The `-job`
rows time the training job's own step at the GPU defaults (the training module, rf/lognorm, the EMA, Lightning's
fit loop): what a launch gets, and the figure the planner prefers.

Robust by construction: each configuration runs in try/except (an OOM or a compile failure is recorded, not fatal),
a global time budget skips what no longer fits (recorded as skipped), and the results file is rewritten after each
configuration (a JSON copy inside it feeds the planner: src/plan.py without --mfu).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.models import MMDiT  # noqa: E402
from src.models.convert_diffusers import diffusers_model  # noqa: E402
from src.models.perf import RESULTS_JSON_TAG, compile_backbone, read_bench_results  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu.md"
JSON_TAG = RESULTS_JSON_TAG
# Paper setup at 256px (docs/backbone.md#backbone-mm-dit): SD3 latents, CLIP + T5 context, pooled CLIP L + bigG.
GPU_SETUP = dict(input_size=32, patch_size=2, in_channels=16, context_dim=4096, pooled_dim=2048, context_len=154)
TINY_SETUP = dict(input_size=8, patch_size=2, in_channels=4, context_dim=32, pooled_dim=16, context_len=6)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "H20": 148.0,
                    "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
BUDGET_S = 330.0  # the whole run, compilation included: leaves margin inside 6 minutes
BOOTSTRAP_RESERVE_S = 75.0  # kept for the bootstrap measurement at the end (six ways, the CPU path last)
PAPER_REFERENCE = 40504  # COCO-2014 val, which the paper's evaluation takes whole as FID's reference


@dataclass
class Config:
    """One measured configuration: a model depth and batch, and each throughput lever's setting."""

    name: str
    depth: int
    batch: int
    compile: str = "none"  # none | blocks | full (src/models/perf.py)
    compile_backend: str = "default"  # torch.compile mode (reduce-overhead = CUDA graphs)
    fused_adamw: bool = False
    fused_qkv: bool = True
    fused_modulation: bool = False
    attention_backend: str = "auto"
    weights: str = "fp32-autocast"  # or bf16-master: bf16 weights, fp32 master copy in the optimizer
    activation_checkpointing: bool = False
    model: str = "ours"  # or diffusers, or job: ours inside the training job's module and Lightning's loop
    largest_batch: bool = False  # the largest batch that fits, sized from the same depth's default (run_config)
    loss_check_every: int | str = "auto"  # job rows: train.loss_check_every (auto: every 50 steps on a GPU)
    qk_norm: str | None = "rms_norm"  # as the paper setup trains (experiment=paper)

    def model_options(self) -> dict:
        return dict(qk_norm=self.qk_norm, fused_qkv=self.fused_qkv, fused_modulation=self.fused_modulation,
                    attention_backend=self.attention_backend, activation_checkpointing=self.activation_checkpointing)


@dataclass
class Result:
    config: dict
    status: str = "ok"  # ok | failed: ... | skipped: ...
    batch: int = 0
    params: int = 0
    step_ms: float = float("nan")
    images_per_s: float = float("nan")
    tflops: float = float("nan")
    mfu: float = float("nan")
    peak_gib: float = float("nan")
    static_gib: float = float("nan")  # allocated between steps: weights, optimizer states, the batch
    warmup_s: float = float("nan")
    notes: list[str] = field(default_factory=list)
    breakdown: dict = field(default_factory=dict)  # --profile: milliseconds per step by kind of kernel
    top_kernels: list = field(default_factory=list)  # --profile: [name, kind, ms per step] of the costliest kernels


# ---- where the step's time goes (--profile) -----------------------------------------------------------------
# Kernel names by kind, tried in order: attention first (its CUTLASS kernels would otherwise count as matmuls).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "_scaled_dot_product")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("compiled (inductor)", ("triton_",)),
    ("copy / cast", ("copy", "memcpy", "memset", "fill", "cat")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


TOP_KERNELS = 15  # the costliest kernels listed per profiled configuration: what kernel work would target


def time_breakdown(events, steps: int, step_ms: float, device: str) -> tuple[dict, list]:
    """Milliseconds per step by kind: device kernels on a GPU (self CPU time of operators in the dry run), and the
    time the device sat idle (the step's time not covered by kernels: launches, synchronisation, Python); and the
    TOP_KERNELS costliest kernels by name (inductor's names say which operations each one fused)."""
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in events:
        on_device = e.device_type == DeviceType.CUDA
        if device == "cuda" and not on_device or device != "cuda" and on_device:
            continue
        ms = (e.time_range.elapsed_us() if on_device else e.self_cpu_time_total) / 1e3 / steps
        totals[kernel_kind(e.name)] = totals.get(kernel_kind(e.name), 0.0) + ms
        by_name[e.name] = by_name.get(e.name, 0.0) + ms
    if device == "cuda":
        totals["device idle"] = max(0.0, step_ms - sum(totals.values()))
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP_KERNELS]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])), [[n, kernel_kind(n), ms] for n, ms in top]


def profile_steps(step, device: str, steps: int = 2):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    return prof.events()


# ---- the configurations ---------------------------------------------------------------------------------------
def configurations(depths=(15, 24), batch=128) -> list[Config]:
    """In priority order: what matters most runs first, so a budget cut drops the least important.

    Compiling costs tens of seconds per new graph on a cold machine, so the order is: today's eager step and the
    default GPU step at each depth, the reference implementation, then the levers most likely to move MFU (bf16
    weights, the largest batch, the attention kernel), then each remaining lever against the default.
    """
    best = dict(compile="blocks", fused_adamw=True, fused_modulation=True)  # the GPU defaults ("auto" settings)
    out = []
    for d in depths:  # the headline: today's eager step and the default GPU step
        out += [Config(f"d{d}-eager", d, batch), Config(f"d{d}-default", d, batch, **best)]
    for d in depths:  # the reference implementation at the same settings
        out.append(Config(f"d{d}-diffusers", d, batch, model="diffusers"))
    for d in depths:  # the training job's own step at the defaults: what a launch gets (the planner's figure)
        out.append(Config(f"d{d}-job", d, batch, **best, model="job"))
    # The job's step reading its loss back every step (a device sync mid-step), as it did before loss_check_every.
    out.append(Config(f"d{depths[0]}-job-loss-every-step", depths[0], batch, **best, model="job", loss_check_every=1))
    for d in reversed(depths):  # the levers with the most room: bf16 weights, the largest batch that fits
        out.append(Config(f"d{d}-default-bf16-master", d, batch, **best, weights="bf16-master"))
    for d in depths:  # sized from the default's measured memory; checkpointed only when the default did not fit
        out.append(Config(f"d{d}-default-largest", d, batch, **best, largest_batch=True))
    for d in depths:
        out.append(Config(f"d{d}-default-cudnn", d, batch, **best, attention_backend="cudnn"))
    # The whole backbone compiled (model.compile=full): one backward graph (docs/backbone.md#throughput-on-a-gpu).
    out.append(Config(f"d{depths[0]}-full-compile", depths[0], batch, compile="full", fused_adamw=True,
                      fused_modulation=True))
    for d in depths:  # each remaining lever against the default
        out += [
            Config(f"d{d}-default-no-fused-adamw", d, batch, **{**best, "fused_adamw": False}),
            Config(f"d{d}-default-no-fused-modulation", d, batch, **{**best, "fused_modulation": False}),
            Config(f"d{d}-default-unfused-qkv", d, batch, **best, fused_qkv=False),
            Config(f"d{d}-default-flash", d, batch, **best, attention_backend="flash"),
            Config(f"d{d}-default-efficient", d, batch, **best, attention_backend="efficient"),
            Config(f"d{d}-default-checkpointing", d, batch, **best, activation_checkpointing=True),
            Config(f"d{d}-eager-fused", d, batch, fused_adamw=True, fused_modulation=True),
            Config(f"d{d}-diffusers-checkpointing", d, batch, model="diffusers", activation_checkpointing=True),
        ]
    d = depths[0]
    out += [
        Config(f"d{d}-default-b16", d, 16, **best),
        Config(f"d{d}-cuda-graphs-b16", d, 16, compile="full", compile_backend="reduce-overhead", fused_adamw=True,
               fused_modulation=True),
    ]
    for d in depths:  # inductor's autotuned matmul and attention templates: minutes of compilation per new graph
        out.append(Config(f"d{d}-default-max-autotune", d, batch, **best, compile_backend="max-autotune-no-cudagraphs"))
    return out


# ---- one training step ----------------------------------------------------------------------------------------
class MasterAdamW:
    """AdamW on fp32 master copies of bf16 weights: the step reads bf16 gradients, updates the fp32 copies and writes
    them back rounded to bf16 (the model computes in bf16 without autocast)."""

    def __init__(self, params, fused: bool, **kwargs):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, fused=fused or None, **kwargs)

    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = p.grad.float() if p.grad is not None else None
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def build_ours(cfg: Config, setup: dict, device: str, hidden: int | None = None, heads: int | None = None) -> MMDiT:
    torch.manual_seed(0)
    kwargs = {k: v for k, v in setup.items() if k != "context_len"}
    with torch.device(device):
        model = MMDiT(**kwargs, depth=cfg.depth, hidden_size=hidden, num_heads=heads, **cfg.model_options())
    with torch.no_grad():  # random weights everywhere (no zero-initialised shortcut)
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def make_batch(setup: dict, batch: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(1)
    s, c, length = setup["input_size"], setup["in_channels"], setup["context_len"]
    shapes = [(batch, c, s, s), (batch,), (batch, length, setup["context_dim"]), (batch, setup["pooled_dim"]),
              (batch, c, s, s)]
    return tuple(torch.rand(sh, generator=g, device=device) if len(sh) == 1 else
                 torch.randn(sh, generator=g, device=device) for sh in shapes)


def make_step(model, cfg: Config, batch: tuple, device: str, dry_run: bool):
    """A closure running one AdamW training step on a fixed batch, with the configuration's settings."""
    x, t, ctx, pooled, target = batch
    bf16 = cfg.weights == "bf16-master"
    if bf16:
        model.to(torch.bfloat16)
        x, t, ctx, pooled = (a.to(torch.bfloat16) for a in (x, t, ctx, pooled))
        opt = MasterAdamW(model.parameters(), cfg.fused_adamw, lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cfg.fused_adamw or None)
    forward = model
    if cfg.model == "ours":
        forward = compile_backbone(model, cfg.compile, "cuda", cfg.compile_backend,
                                   dynamo_backend="eager" if dry_run else "inductor")
    autocast = not bf16

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            if cfg.model == "ours":
                out = forward(x, t, ctx, pooled)
            else:
                out = forward(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                              timestep=1000 * t).sample
            loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def step_times(step, device: str, warmup: int, reps: int) -> tuple[float, list[float]]:
    """(warm-up seconds, the seconds of each timed step) of a step closure, synchronised after each step."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return warmup_s, times


def job_times(model: MMDiT, cfg: Config, batch: tuple, device: str, warmup: int, reps: int, dry_run: bool
              ) -> tuple[float, list[float]]:
    """(warm-up seconds, the seconds of each timed step) of the training job's own step: the training module of
    `python -m src.run` (rf/lognorm around the backbone, the EMA every 100 steps and conditioning dropout as
    experiment=paper, the loss check, logging) in Lightning's fit loop at the job's precision, on a fixed batch
    already on the device (the data loader is bench_loader's and bench_shard_read's business). A step's time runs
    from one batch's start to the next's, synchronised there: the loop's own work between steps counts."""
    import lightning as L

    from src.formulations.registry import get_recipe
    from src.training.module import FormulationModule

    module = FormulationModule(
        get_recipe("rf/lognorm(0.00, 1.00)"), model, lr=1e-4, eps=1e-15, warmup_steps=1000, ema_every=100,
        cond_dropout=0.464, compile="none" if dry_run else cfg.compile, compile_backend=cfg.compile_backend,
        fused=cfg.fused_adamw, loss_check_every=cfg.loss_check_every)
    x0, _, context, pooled, _ = batch
    marks: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync(device)
            marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            sync(device)
            marks.append(time.perf_counter())

    class Fixed(torch.utils.data.Dataset):  # the one batch, warmup + reps times (batch_size=None: no collation)
        def __len__(self) -> int:
            return warmup + reps

        def __getitem__(self, i: int) -> dict:
            return {"x0": x0, "context": context, "pooled": pooled}

    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    with warnings.catch_warnings():  # Lightning's hints and tips, as the job keeps them off the console
        warnings.simplefilter("ignore")
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            trainer = L.Trainer(
                accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=warmup + reps,
                precision="bf16-mixed" if device == "cuda" else "32-true", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                callbacks=[Clock()])
            start = time.perf_counter()
            trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Fixed(), batch_size=None))
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    return marks[warmup] - start, steps[warmup:]


def model_flops(model: MMDiT, setup: dict) -> float:
    """Training FLOPs per sample as the planner counts them (3 x the forward counted on the meta device)."""
    from src.plan import forward_flops

    meta = dict(latent_channels=setup["in_channels"], latent_size=setup["input_size"],
                context_length=setup["context_len"], context_dim=setup["context_dim"], pooled_dim=setup["pooled_dim"])
    with torch.device("meta"):
        shadow = MMDiT(**{k: v for k, v in setup.items() if k != "context_len"}, depth=model.depth,
                       hidden_size=model.hidden_size, num_heads=model.num_heads, qk_norm=model.qk_norm)
    return 3.0 * forward_flops(shadow, meta)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cfg: Config, batch: int, args, setup: dict, device: str) -> Result:
    """Build, warm up (compiling), time; the result of one configuration at one batch size."""
    res = Result(config=asdict(cfg), batch=batch)
    if args.dry_run:  # tiny: one block of hidden 64 whatever the depth named (one graph per compiled variant)
        cfg = Config(**{**asdict(cfg), "depth": 1})
    hidden, heads = (64, 2) if args.dry_run else (None, None)
    model = build_ours(cfg, setup, device, hidden, heads)
    res.params = sum(p.numel() for p in model.parameters())
    flops = model_flops(model, setup) * batch
    if cfg.model == "diffusers":
        model = diffusers_model(model)
        if cfg.activation_checkpointing:
            model.enable_gradient_checkpointing()
    data = make_batch(setup, batch, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if cfg.model == "job":
        step = None
        res.warmup_s, times = job_times(model, cfg, data, device, args.warmup, args.reps, args.dry_run)
    else:
        step = make_step(model, cfg, data, device, args.dry_run)
        res.warmup_s, times = step_times(step, device, args.warmup, args.reps)
    res.step_ms = statistics.median(times) * 1e3
    res.images_per_s = batch / (res.step_ms / 1e3)
    res.tflops = flops / (res.step_ms / 1e3) / 1e12
    peak = args.peak_tflops
    res.mfu = res.tflops / peak if peak else float("nan")
    if device == "cuda":
        res.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        res.static_gib = torch.cuda.memory_allocated() / 2**30
    if args.profile and step is not None:
        res.breakdown, res.top_kernels = time_breakdown(profile_steps(step, device), 2, res.step_ms, device)
    del model, step, data
    return res


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_batch_plan(cfg: Config, done: list[Result], device: str, dry_run: bool) -> tuple[int, bool]:
    """(batch, activation checkpointing) to try first for a largest-batch configuration.

    Compiling a new batch size costs as much as the first compile, so instead of doubling until it fails, the batch
    is sized from the same depth's default step: its activation memory per sample (peak minus what stays allocated
    between steps) and the device's free memory, rounded down to a multiple of 32 (90% of the device, for
    fragmentation). Where the default did not fit, checkpointing is on and the batch is the default's.
    """
    base = next((r for r in done if r.config["name"] == f"d{cfg.depth}-default"), None)
    if dry_run or device != "cuda":
        return 2 * cfg.batch, cfg.activation_checkpointing
    if base is None or base.status != "ok" or not base.peak_gib > base.static_gib:
        return cfg.batch, True
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    per_sample = (base.peak_gib - base.static_gib) / base.batch
    fits = int((0.9 * total - base.static_gib) / per_sample) // 32 * 32
    return max(fits, cfg.batch), cfg.activation_checkpointing


def run_config(cfg: Config, args, setup: dict, device: str, done: list[Result] = ()) -> Result:
    """measure() in try/except. For largest_batch: the planned batch, then smaller by 20% while it runs out of memory
    (at most three tries); the first that fits is reported, with the tries in its notes."""
    batch, tried = cfg.batch, []
    if cfg.largest_batch:
        batch, checkpointing = largest_batch_plan(cfg, list(done), device, args.dry_run)
        if batch == cfg.batch and not checkpointing:  # the default's batch is already the largest: measured there
            return Result(config=asdict(cfg), batch=batch, status=f"skipped: no batch above {batch} fits (from "
                                                                  f"d{cfg.depth}-default's memory)")
        cfg = Config(**{**asdict(cfg), "activation_checkpointing": checkpointing})
    while True:
        if not args.dry_run:  # each configuration compiles afresh (inductor's on-disk caches keep repeats short)
            torch._dynamo.reset()
        try:
            res = measure(cfg, batch, args, setup, device)
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal
            reason = "out of memory" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if not is_oom(exc) and args.verbose:
                traceback.print_exc()
            res = Result(config=asdict(cfg), batch=batch, status=f"failed: {reason}")
        finally:
            if device == "cuda":  # the next configuration needs this one's memory (a full collection: ~0.3 s)
                gc.collect()
                torch.cuda.empty_cache()
        res.notes = [f"batch {b}: out of memory" for b in tried] + res.notes
        tried.append(batch)
        retry = cfg.largest_batch and res.status == "failed: out of memory" and len(tried) < 3
        if not retry or time.perf_counter() > args.deadline - 60:
            return res
        batch = max(1, int(batch * 0.8) // 32 * 32)


# ---- results --------------------------------------------------------------------------------------------------
def options_text(c: dict) -> str:
    if c["model"] == "diffusers":
        return (f"diffusers SD3Transformer2DModel, eager, fp32 weights + bf16 autocast, AdamW (foreach), QK-norm "
                f"{c['qk_norm'] or 'off'}"
                + (", gradient checkpointing" if c["activation_checkpointing"] else ""))
    job = "the training job's step (Lightning's loop, rf/lognorm, EMA every 100 steps), " if c["model"] == "job" else ""
    backend = f" ({c['compile_backend']})" if c["compile_backend"] != "default" else ""
    parts = [f"{job}compile={c['compile']}{backend}",
             "fused AdamW" if c["fused_adamw"] else "AdamW (foreach)",
             "fused modulation" if c["fused_modulation"] else "per-block modulation",
             "fused QKV" if c["fused_qkv"] else "3 QKV matmuls",
             f"SDPA {c['attention_backend']}", c["weights"], f"QK-norm {c['qk_norm'] or 'off'}"]
    if c["activation_checkpointing"]:
        parts.append("activation checkpointing")
    if c["model"] == "job":  # results read earlier lack the key
        every = c.get("loss_check_every", "auto")
        from src.training.module import LOSS_CHECK_EVERY

        parts.append("loss read back every step" if every == 1 else f"loss read back every {every} steps (auto: "
                     f"{LOSS_CHECK_EVERY} on a GPU)" if every == "auto" else f"loss read back every {every} steps")
    return ", ".join(parts)


def render(results: list[Result], header: dict, bootstrap: dict | None) -> str:
    lines = [
        "# GPU benchmark: the MM-DiT training step, each throughput lever; the rank report's bootstrap",
        "",
        "Written by `make bench-gpu` (bench/bench_gpu.py); rewritten after every configuration.",
        "",
        f"Device: {header['device']}; torch {header['torch']}; peak {header['peak_tflops']} TFLOP/s dense bf16. "
        f"Setup: {header['setup']}. Step = forward + backward + AdamW on a fixed batch; median of {header['reps']} "
        f"steps after {header['warmup']} warm-up steps (warm-up includes compilation). MFU = model FLOPs as the "
        "planner counts them (3 x forward, counted on the meta device) / step time / peak.",
        "",
        "| configuration | depth | batch | options | step (ms) | images/s | TFLOP/s | MFU | peak memory (GiB) | "
        "warm-up (s) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.config
        status = r.status + ("; " + "; ".join(r.notes) if r.notes else "")
        lines.append(f"| {c['name']} | {c['depth']} | {r.batch} | {options_text(c)} | {r.step_ms:.1f} | "
                     f"{r.images_per_s:.1f} | {r.tflops:.0f} | {r.mfu:.1%} | {r.peak_gib:.1f} | {r.warmup_s:.0f} | "
                     f"{status} |")
    profiled = [r for r in results if r.breakdown]
    if profiled:
        lines += ["", "## Where the step's time goes (--profile)", "",
                  "Milliseconds per step by kind of device kernel (torch.profiler, 2 steps after the timed ones); "
                  "'device idle' is the step's time not covered by kernels.", "",
                  "| configuration | batch | step (ms) | " + " | ".join(k for k, _ in KERNEL_KINDS) +
                  " | other | device idle |", "|---|---|---|" + "---|" * (len(KERNEL_KINDS) + 2)]
        for r in profiled:
            kinds = [k for k, _ in KERNEL_KINDS] + ["other", "device idle"]
            cells = [f"{r.breakdown.get(k, 0.0):.1f} ({r.breakdown.get(k, 0.0) / r.step_ms:.0%})" for k in kinds]
            lines.append(f"| {r.config['name']} | {r.batch} | {r.step_ms:.1f} | " + " | ".join(cells) + " |")
        for r in profiled:
            lines += ["", f"Costliest kernels of {r.config['name']} (batch {r.batch}), ms per step:", "",
                      "| kernel | kind | ms | share |", "|---|---|---|---|"]
            lines += [f"| `{name[:100]}` | {kind} | {ms:.2f} | {ms / r.step_ms:.1%} |"
                      for name, kind, ms in r.top_kernels]
    if bootstrap:
        lines += ["", "## Rank report bootstrap on the GPU", "", bootstrap["text"]]
    payload = {"header": header, "results": [asdict(r) for r in results], "bootstrap": bootstrap}
    lines += ["", f"<!-- {JSON_TAG}", json.dumps(payload, default=str), "-->", ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_results(path: Path) -> dict | None:
    """The JSON copy inside a results file written by this script (None when absent)."""
    return read_bench_results(path)


# ---- the bootstrap on the GPU ---------------------------------------------------------------------------------
def bench_bootstrap(args, device: str, deadline: float = float("inf")) -> dict:
    """The paper grid's bootstrap (1464 records x 200 draws, 1000 samples x 768 features), timed on a few records,
    each way the report can take it: the row form (the default when a draw has fewer distinct rows than features, as
    here: eigenvalues of the ~632 x 632 cross-Gram matrix, or its certified Newton-Schulz nuclear norm), and the
    square-root form with tr (S1 S2)^(1/2) by batched eigh or by Newton-Schulz (matrix products only; short of 1e-6
    on power-law spectra: src/ranking/bootstrap_torch.py), all against a reference of as many images as samples;
    then the report's path at the paper's reference (bench_bootstrap_paper_reference: 40,504 images, which meet the
    samples' rows as their covariance); then the report's path without a GPU, numpy on the machine's cores
    (bench_bootstrap_cpu), for the comparison.

    Each record costs the same (the same shapes), so the grid's time is the median time per record x 1464. The
    first record's draws are checked against the numpy path (a few draws, the numpy path is slow). Records stop at
    the deadline, so a slow method reports what it measured.
    """
    from src.ranking.bootstrap import frechet_distance, resampled_moments, sqrtm_psd
    from src.ranking.bootstrap_torch import TRACE_SQRT_METHODS, TorchFrechet

    n, dim, draws, grid = (40, 16, 8, 1464) if args.dry_run else (1000, 768, 200, 1464)
    records = 2 if args.dry_run else args.bootstrap_records
    rng = np.random.default_rng(0)
    # Covariance eigenvalues ~ i^-1.5, a stand-in for real embeddings' power-law spectra: the certified Newton-Schulz
    # form's iterations grow with the steepness (about 5 more per unit of the exponent), the others' do not.
    spectrum, basis = np.arange(1, dim + 1) ** -0.75, np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    ref = (rng.normal(size=(n, dim)) * spectrum) @ basis
    feats = [(rng.normal(size=(n, dim)) * spectrum * 1.1) @ basis + 0.01 * i for i in range(records)]
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(float)
    check = min(4, draws)
    mu_r, cov_r = resampled_moments(ref, counts[:check])
    expected = frechet_distance(*resampled_moments(feats[0], counts[:check]), mu_r, cov_r, sqrtm_psd(cov_r))
    methods, texts = {}, []
    forms = ("rows", "rows-newton-schulz", *TRACE_SQRT_METHODS)
    for i, method in enumerate(forms):
        rows = method.startswith("rows")
        ops = TorchFrechet("cuda" if device == "cuda" else "torch-cpu",
                           trace_sqrt=method.removeprefix("rows-") if method != "rows" else "eigh")
        resample, distance = ((ops.resampled_rows, ops.frechet_distance_rows) if rows else
                              (ops.resampled_moments, ops.frechet_distance))
        chunk = max(1, min(draws, ops.chunk_bytes // (8 * 4 * dim * dim)))
        chunks = [slice(s, min(s + chunk, draws)) for s in range(0, draws, chunk)]
        sync(device)
        start = time.perf_counter()
        refs = []  # the reference's rows, or moments and square root, per chunk of draws, shared by every record
        for sl in chunks:
            mu, second = resample(ref, counts[sl])
            refs.append((mu, second) if rows else (mu, second, ops.sqrtm_psd(second)))
        sync(device)
        ref_s = time.perf_counter() - start
        fids, times = [], []
        # An equal share of the time left to each method still to run; record by record, so a slow one stops.
        stop = time.perf_counter() + (deadline - time.perf_counter()) / (len(forms) - i)
        for f in feats:
            t0 = time.perf_counter()
            fids.append(np.concatenate([distance(*resample(f, counts[sl]), *r) for sl, r in zip(chunks, refs)]))
            sync(device)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() > stop:
                break
        per_record = statistics.median(times)
        rel = float(np.max(np.abs(fids[0][:check] - expected) / np.abs(expected)))
        grid_min = per_record * grid / 60
        methods[method] = dict(seconds_per_record=per_record, grid_minutes=grid_min, max_rel_diff=rel,
                               records=len(times), reference_s=ref_s, eigh_fallbacks=ops.fallbacks)
        name = {"rows": "rows, eigh", "rows-newton-schulz": "rows, newton-schulz (certified)"}.get(
            method, f"square roots, {method}")
        fallbacks = f", {ops.fallbacks} draws left to eigh" if method == "rows-newton-schulz" else ""
        texts.append(f"- {name}: {len(times)} records x {draws} draws{fallbacks}: {per_record:.2f} s per record "
                     f"(median; chunks of {chunk} draws; the reference's own work {ref_s:.1f} s, once per report), so "
                     f"the paper grid's {grid} records take about {grid_min:.1f} min; largest relative difference "
                     f"from the numpy path over {check} draws of the first record: {rel:.1e}.")
    if time.perf_counter() < deadline:
        big = bench_bootstrap_paper_reference(device, feats, counts, spectrum, basis, 200 if args.dry_run else
                                              PAPER_REFERENCE, grid, deadline)
        methods["rows-cov"] = big
        texts.append(f"- rows against the covariance of a reference of {big['reference']} images (the report's path "
                     f"at the paper's reference, COCO-2014 val): {big['records']} records x {draws} draws: "
                     f"{big['seconds_per_record']:.2f} s per record (median; the reference's own work "
                     f"{big['reference_s']:.1f} s, once per report), so the paper grid's {grid} records take about "
                     f"{big['grid_minutes']:.1f} min; largest relative difference from the numpy path over "
                     f"{big['checked']} draws of the first record: {big['max_rel_diff']:.1e}.")
    if time.perf_counter() < deadline:
        cpu = bench_bootstrap_cpu(n, dim, 4 if args.dry_run else CPU_BOOTSTRAP_DRAWS, grid, draws)
        methods["cpu workers"] = cpu
        texts.append(f"- rows, numpy on the CPU's {cpu['workers']} worker threads (the report's path without a GPU): "
                     f"{cpu['records']} records x {cpu['draws']} draws: {cpu['ms_per_record_draw']:.1f} ms per record "
                     f"and draw (wall), so the paper grid's {grid} records x {draws} draws take about "
                     f"{cpu['grid_minutes']:.1f} min.")
    text = "\n".join([f"{draws} draws at {n} samples x {dim} features on {header_device(device)}, "
                      f"the Frechet distances taken {len(texts)} ways:", ""] + texts)
    return dict(text=text, methods=methods, draws=draws, samples=n, features=dim,  # headline: the report's, rows
                **{k: methods["rows"][k] for k in ("seconds_per_record", "grid_minutes", "max_rel_diff")})


def bench_bootstrap_paper_reference(device: str, feats: list, counts: np.ndarray, spectrum: np.ndarray,
                                    basis: np.ndarray, n_ref: int, grid: int, deadline: float) -> dict:
    """The report's GPU path against a reference of the paper's size: its resampled covariances once (shared by every
    record of its dataset), then each record's rows against them (frechet_distance_rows_cov, B1 S2 B1^T), checked
    against the numpy square-root form on a few draws. Records stop at the deadline."""
    from src.ranking.bootstrap import frechet_distance, resampled_moments, sqrtm_psd
    from src.ranking.bootstrap_torch import TorchFrechet

    rng = np.random.default_rng(1)
    dim, draws = basis.shape[0], counts.shape[0]
    ref = (rng.normal(size=(n_ref, dim)) * spectrum) @ basis
    ref_counts = rng.multinomial(n_ref, np.full(n_ref, 1.0 / n_ref), size=draws).astype(float)
    ops = TorchFrechet("cuda" if device == "cuda" else "torch-cpu")
    chunk = max(1, min(draws, ops.chunk_bytes // (8 * 4 * dim * dim)))
    chunks = [slice(s, min(s + chunk, draws)) for s in range(0, draws, chunk)]
    sync(device)
    start = time.perf_counter()
    refs = [ops.resampled_moments(ref, ref_counts[sl]) for sl in chunks]
    sync(device)
    ref_s = time.perf_counter() - start
    fids, times = [], []
    for f in feats:
        t0 = time.perf_counter()
        fids.append(np.concatenate([ops.frechet_distance_rows_cov(*ops.resampled_rows(f, counts[sl]), *r)
                                    for sl, r in zip(chunks, refs)]))
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    check = min(4, draws)
    mu_r, cov_r = resampled_moments(ref, ref_counts[:check])
    expected = frechet_distance(*resampled_moments(feats[0], counts[:check]), mu_r, cov_r, sqrtm_psd(cov_r))
    per_record = statistics.median(times)
    return dict(seconds_per_record=per_record, grid_minutes=per_record * grid / 60, reference_s=ref_s,
                records=len(times), reference=n_ref, checked=check,
                max_rel_diff=float(np.max(np.abs(fids[0][:check] - expected) / np.abs(expected))))


CPU_BOOTSTRAP_DRAWS = 24  # the CPU path's timing: 2 records per core x 24 draws, a few seconds on 16 cores


def bench_bootstrap_cpu(n: int, dim: int, draws: int, grid: int, grid_draws: int) -> dict:
    """The report's own CPU path (bootstrap_metrics, numpy, every usable core's worker thread) on a synthetic sweep
    of two records per core: wall time per record and draw, and the paper grid's time from it."""
    from src.ranking.aggregate import load_sweep
    from src.ranking.bootstrap import bootstrap_metrics, resolve_workers
    from src.ranking.synthetic import write_synthetic_sweep

    workers = resolve_workers(0)
    with tempfile.TemporaryDirectory() as tmp:
        recipes = ("rf", "edm", "eps/linear", "v/cos")[: max(1, -(-2 * workers // 12))]  # 12 records per recipe
        sweep = write_synthetic_sweep(Path(tmp) / "s", recipes=recipes, datasets=("digits",), n_samples=n,
                                      n_reference=n, dim=dim)
        records = load_sweep([sweep]).records.iloc[: max(2, 2 * workers)]
        bootstrap_metrics(records, 1, workers=0)  # warm-up
        start = time.perf_counter()
        bootstrap_metrics(records, draws, workers=0)
        per = (time.perf_counter() - start) / (len(records) * draws)
    return dict(workers=workers, records=len(records), draws=draws, ms_per_record_draw=per * 1e3,
                grid_minutes=per * grid * grid_draws / 60)


def header_device(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"


def peak_for(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


# ---- main -----------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every configuration at tiny size on the CPU")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default bench/results/gpu.md; a --dry-run: gpu-dry-run.md in the temp folder, "
                        "so the measured figures are never replaced by a CPU check)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="time budget of the whole run, compilation incl.")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations")
    p.add_argument("--depths", type=int, nargs="+", default=[15, 24])
    p.add_argument("--batch", type=int, default=128, help="per-GPU batch (1024 over 8 GPUs)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: from the device name)")
    p.add_argument("--bootstrap", dest="bootstrap", action="store_true", default=None,
                   help="time the rank report's bootstrap (default: on when a GPU is present, and in --dry-run)")
    p.add_argument("--no-bootstrap", dest="bootstrap", action="store_false")
    p.add_argument("--bootstrap-records", type=int, default=4, help="records timed (the grid's time scales from them)")
    p.add_argument("--profile", action="store_true", help="also profile each configuration: time by kind of kernel")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed configurations")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "gpu-dry-run.md" if args.dry_run else RESULTS
    start = time.perf_counter()
    args.deadline = start + args.budget_s
    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        print("bench_gpu: no CUDA device; run --dry-run on the CPU (the GPU figures are measured on a GPU only)",
              file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    setup = TINY_SETUP if args.dry_run else GPU_SETUP
    name = header_device(device)
    if args.peak_tflops is None:
        args.peak_tflops = 1.0 if args.dry_run else peak_for(name)  # dry run: MFU is meaningless, only exercised
    if args.dry_run:
        args.warmup, args.reps, args.batch = 1, 1, 2
        torch.set_num_threads(1)
        torch._dynamo.config.cache_size_limit = 64  # graphs are reused across configurations, not reset
    if cuda and not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configs = configurations(tuple(args.depths), args.batch)
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in configs})
        if unknown:
            print(f"bench_gpu: --only {unknown}: unknown; allowed: {[c.name for c in configs]}", file=sys.stderr)
            return 2
        configs = [c for c in configs if c.name in args.only]
    if args.dry_run:
        for c in configs:
            if c.attention_backend in ("cudnn", "efficient"):  # CUDA-only kernels: exercise the option with math
                c.attention_backend = "math"
    do_bootstrap = (cuda or args.dry_run) if args.bootstrap is None else args.bootstrap
    reserve = BOOTSTRAP_RESERVE_S if do_bootstrap and not args.dry_run else 0.0
    header = dict(device=name, torch=torch.__version__, peak_tflops=args.peak_tflops, reps=args.reps,
                  warmup=args.warmup, dry_run=args.dry_run,
                  setup=(f"{setup['input_size']}x{setup['input_size']}x{setup['in_channels']} latents, "
                         f"{setup['context_len']} text tokens x {setup['context_dim']}, pooled {setup['pooled_dim']}"
                         + (" (tiny dry run: depth 1, hidden 64, 2 heads; compiled paths captured by dynamo, run eagerly)" if args.dry_run else "")))
    out = args.out
    results: list[Result] = []
    boot = None
    print(f"bench_gpu: {len(configs)} configurations on {name}, budget {args.budget_s:.0f} s -> {out}", flush=True)
    for cfg in configs:
        left = args.deadline - reserve - time.perf_counter()
        # A start that cannot finish is a skip: the whole backbone compiles for minutes, one block for about one.
        needs = 5 if args.dry_run else ({"none": 25, "blocks": 60, "full": 150}[cfg.compile]
                                         + (240 if "autotune" in cfg.compile_backend else 0))
        if left < needs:
            res = Result(config=asdict(cfg), batch=cfg.batch, status="skipped: time budget")
        else:
            res = run_config(cfg, args, setup, device, results)
        results.append(res)
        print(f"  {cfg.name:34s} batch {res.batch:4d}  {res.step_ms:8.1f} ms  {res.images_per_s:8.1f} img/s  "
              f"{res.tflops:6.0f} TFLOP/s  MFU {res.mfu:6.1%}  {res.peak_gib:5.1f} GiB  warm-up {res.warmup_s:5.0f} s"
              f"  {res.status}", flush=True)
        write_atomic(out, render(results, header, boot))
    if do_bootstrap:
        try:
            boot = bench_bootstrap(args, device, args.deadline)
            print(f"  bootstrap: {boot['text']}", flush=True)
        except Exception as exc:  # noqa: BLE001 - recorded, never fatal
            boot = dict(text=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            print(f"  bootstrap {boot['text']}", flush=True)
        write_atomic(out, render(results, header, boot))
    print(f"bench_gpu: done in {time.perf_counter() - start:.0f} s; results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
