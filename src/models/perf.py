"""Throughput options of the backbones: their allowed values, how "auto" resolves, and compilation.

Every option leaves the state-dict layout alone (fused projections concatenate the existing weights at run
time, compiled blocks are compiled in place), so a checkpoint saved under any setting loads under any other.
"auto" resolves by device: the faster path on a GPU, today's eager path on the CPU, so the default CPU run
is numerically the same as before these options existed. Pure torch: no Lightning or Hydra here.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

COMPILE_MODES = ("auto", "none", "blocks", "full")  # auto: blocks on a GPU, none on the CPU
COMPILE_BACKENDS = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")  # torch.compile mode
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")  # auto: torch's own choice per call
AUTO_BOOL = ("auto", True, False)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP wraps this module (its parameters are shards outside its own forward)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed support
        return False
    kinds = (FullyShardedDataParallel,)
    try:
        from torch.distributed.fsdp import FSDPModule  # FSDP2 (fully_shard)

        kinds += (FSDPModule,)
    except ImportError:
        pass
    return isinstance(module, kinds)


def check_choice(name: str, value, allowed: tuple) -> None:
    """A ValueError naming the setting, the bad value and what is allowed."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")


def compile_setting(value) -> str:
    """model.compile as one of COMPILE_MODES; the former booleans keep their meaning (true = whole backbone)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    check_choice("compile", value, COMPILE_MODES)
    return value


def resolve_auto(value, device_type: str) -> bool:
    """True / False as given; "auto" is on for CUDA devices only (the CPU keeps today's numerics)."""
    return device_type == "cuda" if value == "auto" else bool(value)


def resolve_compile(mode: str, device_type: str) -> str:
    return ("blocks" if device_type == "cuda" else "none") if mode == "auto" else mode


def sdpa_backends(name: str) -> list | None:
    """torch's SDPBackend list for an attention_backend setting; None for torch's own choice."""
    if name == "auto":
        return None
    from torch.nn.attention import SDPBackend

    return [{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]]


#: SDPA kernels torch has for CUDA devices only (flash and math run on the CPU too).
CUDA_ONLY_ATTENTION = ("cudnn", "efficient")


def attention_context(name: str, device_type: str = "cuda"):
    """The context under which the blocks' scaled_dot_product_attention calls use the chosen kernel. A CUDA-only
    kernel on another device is torch's own choice: a run trained with one on a GPU evaluates on the CPU (the
    training job refuses one on the CPU: src.training.prepare.check_device_settings)."""
    backends = sdpa_backends(name)
    if backends is None or (name in CUDA_ONLY_ATTENTION and device_type != "cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


def compile_backbone(
    backbone: nn.Module, mode, device_type: str, backend: str = "default", dynamo_backend: str = "inductor"
) -> nn.Module:
    """The handle the training forward calls, after compiling as model.compile asks.

    "blocks" (regional compilation) compiles each transformer block in place (nn.Module.compile): one graph,
    compiled once and reused by every block of the same shape, so compile time stays small, and the state-dict
    keys stay as they are. "full" returns torch.compile(backbone): the caller keeps the uncompiled handle for
    saving and averaging (its keys would carry `_orig_mod.`). A wrapped backbone (FSDP) has no blocks of its
    own (FSDP's shard hooks run per block), so "blocks" compiles the wrapper whole and "auto" leaves it eager. dynamo_backend="aot_eager" (tests, the
    benchmark's CPU dry run) traces and differentiates the same graphs without inductor's code generation.
    """
    requested = compile_setting(mode)
    mode = resolve_compile(requested, device_type)
    check_choice("compile_backend", backend, COMPILE_BACKENDS)
    wrapped = not hasattr(type(backbone), "transformer_blocks")  # e.g. FSDP, whose __getattr__ reaches inside
    if wrapped and requested == "auto":
        return backbone
    if dynamo_backend != "inductor":  # torch.compile takes a backend or a mode, not both
        options = {"backend": dynamo_backend}
    else:
        options = {} if backend == "default" else {"mode": backend}
    if mode == "none":
        return backbone
    if mode == "blocks" and not wrapped:
        for block in backbone.transformer_blocks():
            block.compile(**options)
        return backbone
    return torch.compile(backbone, **options)


# ---- measured throughput (bench/bench_gpu.py writes it, src/plan.py reads it) -----------------------------------
RESULTS_JSON_TAG = "results-json"  # the JSON copy inside bench/results/gpu.md: <!-- results-json {...} -->


def read_bench_results(path) -> dict | None:
    """The JSON copy inside a results file written by bench/bench_gpu.py; None when the file or the copy is absent."""
    from pathlib import Path
    import json

    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text()
    start = text.find(f"<!-- {RESULTS_JSON_TAG}")
    if start < 0:
        return None
    return json.loads(text[start + len(RESULTS_JSON_TAG) + 5 : text.find("-->", start)])


#: bench_gpu.Config's defaults of the settings added to it after results were recorded.
BENCH_DEFAULTS = {"loss_check_every": "auto"}


def launch_settings(model: dict, optim: dict, train: dict | None = None) -> dict:
    """The benchmark's configuration fields of a training launch on a GPU ("auto" settings resolved for CUDA)."""
    return dict(
        loss_check_every=(train or {}).get("loss_check_every", "auto"),
        model="ours", weights="fp32-autocast",  # training: fp32 weights under bf16 autocast (bf16-mixed)
        compile=resolve_compile(compile_setting(model.get("compile", False)), "cuda"),
        compile_backend=model.get("compile_backend", "default"),
        fused_adamw=resolve_auto(optim.get("fused", "auto"), "cuda"),
        fused_qkv=bool(model.get("fused_qkv", True)),
        fused_modulation=resolve_auto(model.get("fused_modulation", False), "cuda"),
        attention_backend=model.get("attention_backend", "auto"),
        activation_checkpointing=bool(model.get("activation_checkpointing", False)),
        qk_norm=model.get("qk_norm"),
    )


def gpu_words(name: str) -> list[str]:
    """A GPU's name as lower-case words without the vendor: "NVIDIA H100 80GB HBM3" -> ["h100", "80gb", "hbm3"]."""
    return [w for w in re.findall(r"[a-z0-9]+", name.lower()) if w != "nvidia"]


def same_gpu(gpu: str, device: str) -> bool:
    """Whether the GPU named (H100, h200, "NVIDIA H200") is the measured device: its words, vendor and case aside,
    are whole words of the device's name, in order ("H200" is an "NVIDIA H200"; "H1", "A" or "H100 PCIe" is no
    "NVIDIA H100 80GB HBM3")."""
    words, have = gpu_words(gpu), gpu_words(device)
    return bool(words) and any(have[i:i + len(words)] == words for i in range(len(have)))


def measured_mfu(results: dict | None, gpu: str, depth: int, batch: int, settings: dict) -> tuple[float, str] | None:
    """(MFU, where it comes from) of the measured configuration matching a launch, or None.

    Matches the device (same_gpu), the depth (paper sizing, hidden 64 d), and every setting; among those, the
    measured per-GPU batch closest to the launch's. The training job's own step (the benchmark's `model: job` rows:
    the backbone inside the training module and Lightning's loop) is preferred to the bare backbone step.
    """
    if not results or not same_gpu(gpu, str(results["header"].get("device", ""))) or results["header"].get(
            "dry_run"):
        return None

    def matching(wanted: dict) -> list[dict]:
        # Rows written before a setting was benchmarked hold its default (bench_gpu.Config's).
        return [r for r in results["results"] if r["status"].startswith("ok") and r["config"]["depth"] == depth
                and all(r["config"].get(k, BENCH_DEFAULTS.get(k)) == v for k, v in wanted.items())]

    found = (matching({**settings, "model": "job"}) if settings.get("model") == "ours" else []) or matching(settings)
    if not found:
        return None
    best = min(found, key=lambda r: (abs(r["batch"] - batch), -r["batch"]))
    return float(best["mfu"]), (f"measured {best['mfu']:.1%} for {best['config']['name']} (batch {best['batch']}) "
                                f"on {results['header']['device']}")
