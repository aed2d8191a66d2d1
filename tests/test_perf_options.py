"""Throughput options (src/models/perf.py): the optimised paths train the same model as the eager step.

Each path (compiled blocks, fused modulation, three-matmul QKV, activation checkpointing, an explicit SDPA kernel,
fused AdamW) runs a few AdamW steps from the same weights on the same batches through the training module's own
compile handling and optimizer, and must end within float32 tolerance of the eager step; checkpoints keep one
layout, so each loads into the others.
"""

from __future__ import annotations

import re
from pathlib import Path
from functools import partial

import pytest
import torch

from src.formulations import get_recipe
from src.models import MMDiT, MMDiT3
from src.models.perf import compile_backbone, resolve_auto, resolve_compile
from src.training.module import FormulationModule

SIZE = dict(input_size=8, patch_size=2, in_channels=2, depth=2, hidden_size=32, num_heads=2, context_dim=16,
            pooled_dim=8)
STEPS = 3


def batches(n=STEPS, b=3):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(b, 2, 8, 8, generator=g), torch.rand(b, generator=g), torch.randn(b, 2, 8, 8, generator=g),
             torch.randn(b, 6, 16, generator=g), torch.randn(b, 8, generator=g)) for _ in range(n)]


def train(cls=MMDiT, fused_adamw="auto", **options):
    """Losses and final state dict of STEPS AdamW steps, through FormulationModule's compile and optimizer."""
    torch.manual_seed(0)
    backbone = cls(**SIZE, **options, **({"context_split": 2} if cls is MMDiT3 else {}))
    with torch.no_grad():  # random weights everywhere: no zero-initialised path hides a difference
        for p in backbone.parameters():
            p.normal_(0, 0.1)
    # AdamW divides by sqrt(v) + eps: with eps 1e-6 a near-zero gradient's update stays well-conditioned, so float32
    # round-off in the gradient stays round-off in the weights (at 1e-8 its sign alone sets a +-lr step).
    module = FormulationModule(get_recipe("rf/lognorm(0.00, 1.00)"), backbone, lr=1e-3, eps=1e-6, warmup_steps=1,
                               compile=backbone.compile_requested, fused=fused_adamw)
    module.on_fit_start()
    opt = module.configure_optimizers()["optimizer"]
    losses = []
    for x0, t, eps, ctx, pooled in batches():
        loss = module._loss(module._train_forward, x0, eps, t, ctx, pooled).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, module.backbone.state_dict()


@pytest.fixture(scope="module")
def eager():
    return train()


def assert_same_training(result, reference, rtol=1e-4, atol=1e-5):
    (losses, state), (ref_losses, ref_state) = result, reference
    assert losses == pytest.approx(ref_losses, rel=rtol, abs=atol)
    assert state.keys() == ref_state.keys()  # one layout: no `_orig_mod.` prefixes, no split projections
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("options", [
    dict(fused_modulation=True), dict(fused_qkv=False), dict(activation_checkpointing=True),
    dict(attention_backend="math"), dict(fused_adamw=True),
    dict(activation_checkpointing=True, attention_backend="math"),  # the recompute must use the chosen kernel too
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_optimised_paths_train_like_the_eager_step(eager, options):
    assert_same_training(train(**options), eager)


def compiled_training(monkeypatch, dynamo_backend: str, **options):
    """train() with the training module's compile_backbone on the given dynamo backend; graphs compiled counted."""
    import src.training.module as module_code
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(module_code, "compile_backbone", partial(compile_backbone, dynamo_backend=dynamo_backend))
    counters.clear()
    result = train(**options)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward went through torch.compile
    return result


@pytest.mark.parametrize("options", [dict(attention_backend="cudnn"), dict(attention_backend="efficient"),
                                     dict(attention_backend="cudnn", activation_checkpointing=True)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_cuda_only_attention_kernels_are_torchs_own_choice_off_the_gpu(eager, options):
    """A run trained with a CUDA-only SDPA kernel evaluates on the CPU (they failed at the first forward there)."""
    assert_same_training(train(**options), eager)


def test_a_cuda_only_attention_kernel_is_refused_for_a_job_on_the_cpu(tmp_path):
    """Checked in the job, where its device is known (a login node without a GPU submits GPU jobs), and for a single
    run, which trains where it is started, before its directory exists."""
    import os
    import sys

    from tests import warm

    out = warm.run([sys.executable, "-m", "src.run", "model.attention_backend=cudnn", "train.max_steps=1",
                    f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"],
                   capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"},
                   cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 1
    assert ("ConfigError: model.attention_backend=cudnn: a kernel for CUDA GPUs, and this job trains on the CPU; "
            "allowed here: auto, flash, math") in out.stderr, out.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "cache").exists()  # refused before the data
    assert not (tmp_path / "outputs").exists()  # a single run trains here: refused before its directory exists


def test_compiled_blocks_train_like_the_eager_step(eager, monkeypatch):
    """Regional compilation with fused modulation and fused AdamW (the GPU defaults, forced on the CPU): dynamo's
    graphs and their AOT-autograd backward (aot_eager: inductor's CPU code generation is in the slow test)."""
    assert_same_training(compiled_training(monkeypatch, "aot_eager", compile="blocks", fused_modulation=True,
                                           fused_adamw=True), eager)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_inductor_compiled_training_matches_the_eager_step(eager, monkeypatch, mode):
    """The same through inductor (minutes on a 2-core CPU). Compiling the whole backbone reorders the float32
    reductions of the whole step, and AdamW's division by sqrt(v) turns gradient round-off into a fraction of an
    update: weights are held to 1% of the largest total update (lr per step), losses to float32 round-off."""
    lr = 1e-3
    assert_same_training(compiled_training(monkeypatch, "inductor", compile=mode, fused_modulation=True,
                                           fused_adamw=True), eager, atol=0.01 * lr * STEPS)


def test_three_stream_fused_modulation_matches():
    assert_same_training(train(MMDiT3, fused_modulation=True), train(MMDiT3))


def test_cpu_defaults_are_the_eager_path():
    """"auto" leaves the CPU on today's exact path (bitwise the same steps); a GPU gets the fast one."""
    assert resolve_compile("auto", "cpu") == "none" and resolve_compile("auto", "cuda") == "blocks"
    assert resolve_auto("auto", "cpu") is False and resolve_auto("auto", "cuda") is True
    defaults = train(compile="auto", fused_modulation="auto", fused_adamw="auto")
    plain = train(compile="none", fused_modulation=False, fused_adamw=False)
    assert defaults[0] == plain[0]
    for k in plain[1]:
        assert torch.equal(defaults[1][k], plain[1][k]), k


def test_the_former_compile_booleans_keep_their_meaning():
    """model.compile=true compiled the whole backbone before the modes existed: it stays "full" (not regional), and
    false / null stay eager, on any device."""
    from src.models.perf import compile_setting

    assert compile_setting(True) == "full" and MMDiT(**SIZE, compile=True).compile_requested == "full"
    assert compile_setting(False) == compile_setting(None) == "none"
    assert resolve_compile(compile_setting(True), "cpu") == "full"
    assert resolve_compile(compile_setting(False), "cuda") == "none"


def test_compile_backend_is_torch_compiles_mode(monkeypatch):
    """model.compile_backend is handed to torch.compile as its mode (whole backbone or each block); "default" passes
    none, and a dynamo backend other than inductor replaces the mode (torch.compile takes one or the other)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: calls.append(options) or model)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: calls.append(options))
    model = MMDiT(**SIZE)
    compile_backbone(model, "full", "cpu", backend="max-autotune")
    compile_backbone(model, "full", "cpu")
    compile_backbone(model, "blocks", "cpu", backend="reduce-overhead")
    compile_backbone(model, "full", "cpu", backend="max-autotune", dynamo_backend="aot_eager")
    assert calls == [{"mode": "max-autotune"}, {}, *[{"mode": "reduce-overhead"}] * 2, {"backend": "aot_eager"}]


def test_activation_checkpointing_keeps_the_blocks_activations_out_of_the_graph():
    """activation_checkpointing: the autograd graph keeps each block's inputs only (recomputed in the backward pass);
    the same numbers are checked by test_optimised_paths_train_like_the_eager_step, the memory saved here."""
    def saved(**options):
        torch.manual_seed(0)
        model = MMDiT(**SIZE, **options)
        x, t, _, ctx, pooled = batches(1)[0]
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda a: count.append(1) or a, lambda a: a):
            model(x, t, ctx, pooled)
        return len(count)

    assert saved(activation_checkpointing=True) < saved() / 2


def test_checkpoints_load_across_options():
    """A state dict saved under any option loads strictly under any other and gives the same output."""
    torch.manual_seed(0)
    a = MMDiT(**SIZE, fused_qkv=False, fused_modulation=True, activation_checkpointing=True)
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(0, 0.1)
    compiled = compile_backbone(a, "blocks", "cpu")
    assert compiled is a and all(k == k.replace("_orig_mod.", "") for k in a.state_dict())
    b = MMDiT(**SIZE)
    b.load_state_dict(a.state_dict(), strict=True)
    a2 = MMDiT(**SIZE, fused_qkv=False, fused_modulation=True)
    a2.load_state_dict(b.state_dict(), strict=True)
    x, t, _, ctx, pooled = batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(a2(x, t, ctx, pooled), b(x, t, ctx, pooled), rtol=1e-5, atol=1e-6)


def test_the_configured_adamw_kernel_replaces_the_checkpoints_on_resume():
    """optim.fused is not in the fingerprint: a run checkpointed with the fused kernel and resumed with
    optim.fused=false (or under "auto" on another device) updates with the configured one. torch's
    Optimizer.load_state_dict takes each parameter group's `fused` from the checkpoint (tests/test_training.py has
    the resumed job)."""
    from types import SimpleNamespace

    backbone = MMDiT(**SIZE)
    fused = torch.optim.AdamW(backbone.parameters(), fused=True)
    for p in backbone.parameters():
        p.grad = torch.ones_like(p)
    fused.step()
    checkpoint = {"optimizer_states": [fused.state_dict()]}
    module = FormulationModule(get_recipe("rf/lognorm(0.00, 1.00)"), backbone, fused=False)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module.on_load_checkpoint(checkpoint)  # Lightning's hook, before it loads the optimizer state
    opt = module.configure_optimizers()["optimizer"]
    opt.load_state_dict(checkpoint["optimizer_states"][0])
    assert not opt.param_groups[0]["fused"]


@pytest.mark.parametrize("setting, value, match", [
    ("compile", "yes", "compile='yes'"), ("attention_backend", "flash2", "attention_backend='flash2'"),
    ("fused_modulation", "on", "fused_modulation='on'"), ("compile_backend", "fast", "compile_backend='fast'"),
])
def test_bad_option_values_name_the_setting(setting, value, match):
    with pytest.raises(ValueError, match=match):
        MMDiT(**SIZE, **{setting: value})


def test_fused_modulation_is_refused_where_it_does_not_exist():
    from src.models import DiT

    with pytest.raises(ValueError, match="fused_modulation=True is not allowed for DiT"):
        DiT(**SIZE, fused_modulation=True)
    with pytest.raises(ValueError, match="optim.fused='x'"):
        FormulationModule(get_recipe("rf/lognorm(0.00, 1.00)"), MMDiT(**SIZE), fused="x")


# ---- the planner reads the measured MFU of the configuration launched (a data name of its own: plan.py caches
# shard metadata by data name and folder)
SHARDS = ["data=shards", "data.name=perf", "data.train_dir=/nonexistent/perf-train", "data.eval_dir=/nonexistent/e",
          "data.latent_channels=16", "data.latent_size=32", "data.context_dim=64", "data.pooled_dim=32",
          "data.batch_size=1024", "trainer.devices=8"]


def write_measurements(path, device="NVIDIA H100 80GB HBM3", dry_run=False, more=()):
    """A results file as bench/bench_gpu.py writes it: the d15 default step at two batches, and the eager one;
    more: further (name, depth, batch, mfu, options)."""
    bench = __import__("tests.test_bench_gpu", fromlist=["load_bench"]).load_bench()
    results = []
    for name, depth, batch, mfu, options in [("d15-default", 15, 128, 0.52, {}),
                                             ("d15-default-largest", 15, 512, 0.55, {}),
                                             ("d15-eager", 15, 128, 0.31, dict(compile="none", fused_adamw=False,
                                                                               fused_modulation=False)), *more]:
        cfg = bench.Config(name, depth, batch, **{"compile": "blocks", "fused_adamw": True, "fused_modulation": True,
                                                  **options})
        results.append(bench.Result(config=bench.asdict(cfg), batch=batch, mfu=mfu))
    header = dict(device=device, torch="x", peak_tflops=989.4, reps=5, warmup=2, dry_run=dry_run, setup="")
    path.write_text(bench.render(results, header, None))


def test_the_measured_batch_nearest_the_launchs_is_used_the_larger_on_a_tie():
    from src.models.perf import measured_mfu

    settings = {"compile": "blocks"}
    rows = [{"status": "ok", "batch": b, "mfu": m, "config": {"name": f"b{b}", "depth": 15, **settings}}
            for b, m in ((64, 0.4), (192, 0.5))]
    results = {"header": {"device": "NVIDIA H100 80GB HBM3"}, "results": rows}
    assert measured_mfu(results, "H100", 15, 100, settings)[0] == 0.4
    assert measured_mfu(results, "H100", 15, 128, settings) == (0.5, "measured 50.0% for b192 (batch 192) on "
                                                                     "NVIDIA H100 80GB HBM3")
    assert measured_mfu(results, "H100", 16, 128, settings) is None  # another depth


def test_planner_uses_the_measured_mfu_of_the_launched_configuration(tmp_path, monkeypatch):
    from src import plan

    gpu_md = tmp_path / "gpu.md"
    monkeypatch.setattr(plan, "GPU_RESULTS", gpu_md)
    overrides = ["model=mmdit_d15", "model.qk_norm=rms_norm", *SHARDS, f"paths.root_dir={tmp_path}"]
    p = plan.plan_sweep(overrides, gpu="H100")
    assert p.mfu == plan.DEFAULT_MFU and "the default 37%: gpu.md has no measurement" in p.mfu_source
    write_measurements(gpu_md)
    p = plan.plan_sweep(overrides, gpu="H100")  # 1024 over 8 GPUs: batch 128, the GPU defaults
    assert p.mfu == 0.52 and "measured 52.0% for d15-default (batch 128)" in plan.render(p)
    p = plan.plan_sweep([*overrides, "model.compile=none", "model.fused_modulation=false", "optim.fused=false"],
                        gpu="H100")
    assert p.mfu == 0.31 and "d15-eager" in p.mfu_source
    assert plan.plan_sweep(overrides, gpu="H200").mfu == plan.DEFAULT_MFU  # another device: not this measurement
    assert plan.plan_sweep([*overrides, "model.qk_norm=null"], gpu="H100").mfu == plan.DEFAULT_MFU  # another model
    assert plan.plan_sweep(overrides, gpu="H100", mfu=0.3).mfu_source == "given (--mfu)"
    write_measurements(gpu_md, dry_run=True)  # a CPU dry run never stands for a GPU
    assert plan.plan_sweep(overrides, gpu="H100").mfu == plan.DEFAULT_MFU
    # The training job's own step, measured, is what a launch gets: preferred to the bare backbone step.
    write_measurements(gpu_md, more=[("d15-job", 15, 128, 0.47, dict(model="job"))])
    p = plan.plan_sweep(overrides, gpu="H100")
    assert p.mfu == 0.47 and "measured 47.0% for d15-job (batch 128)" in p.mfu_source
    eager = plan.plan_sweep([*overrides, "model.compile=none", "model.fused_modulation=false", "optim.fused=false"],
                            gpu="H100")
    assert eager.mfu == 0.31  # no job step measured with these settings: the backbone step's
    # The job step that reads its loss back every step stands for train.loss_check_every=1 only, whichever is listed
    # first; rows recorded before the setting was benchmarked stand for its default (auto).
    write_measurements(gpu_md, more=[("d15-job-loss-every-step", 15, 128, 0.40, dict(model="job", loss_check_every=1)),
                                     ("d15-job", 15, 128, 0.47, dict(model="job"))])
    assert plan.plan_sweep(overrides, gpu="H100").mfu == 0.47
    assert plan.plan_sweep([*overrides, "train.loss_check_every=1"], gpu="H100").mfu == 0.40
    text = gpu_md.read_text().replace(', "loss_check_every": "auto"', "")
    assert text.count('"loss_check_every"') == 1  # only the every-step row keeps it: the others read as before it
    gpu_md.write_text(text)
    assert plan.plan_sweep(overrides, gpu="H100").mfu == 0.47


def test_planner_matches_the_gpu_by_whole_model_names_and_says_why_it_falls_back(tmp_path, monkeypatch, capsys):
    """--gpu H1 or --gpu A once took an H100's measurement (a substring of its name); an unknown GPU's plan now says
    it used the default and why."""
    from src import plan

    monkeypatch.setattr(plan, "GPU_RESULTS", tmp_path / "gpu.md")
    write_measurements(tmp_path / "gpu.md")
    overrides = ["model=mmdit_d15", "model.qk_norm=rms_norm", *SHARDS, f"paths.root_dir={tmp_path}"]
    for gpu in ("H100", "h100", "NVIDIA H100", "H100 80GB", "nvidia-h100"):
        assert plan.plan_sweep(overrides, gpu=gpu).mfu == 0.52, gpu
    for gpu in ("H1", "A", "100", "H100 PCIe", "H200", "GH100"):
        p = plan.plan_sweep(overrides, gpu=gpu)
        assert p.mfu == plan.DEFAULT_MFU, gpu
        assert p.mfu_source == (f"the default 37%: gpu.md has no measurement on {gpu}, only on NVIDIA H100 80GB HBM3 "
                                "(--gpu names the jobs' GPU)")
    from src.models.perf import same_gpu

    assert same_gpu("H200", "NVIDIA H200") and not same_gpu("H100", "NVIDIA H200") and not same_gpu("", "NVIDIA H200")
    h100 = "NVIDIA H100 80GB HBM3"
    assert same_gpu("h100 80gb", h100) and not same_gpu("80GB H100", h100)  # its words in the device's order
    assert plan.main([*overrides, "--gpu", "A100"]) == 0
    assert "Utilisation: the default 37%: gpu.md has no measurement on A100, only on NVIDIA H100 80GB HBM3" \
        in capsys.readouterr().out
    assert plan.main([*overrides, "--gpu", "NVIDIA"]) == 2
    assert "--gpu='NVIDIA': names no GPU model; give one, e.g. H100, H200 or 'NVIDIA H200'\n" \
        in capsys.readouterr().err
    why = plan.plan_sweep([*overrides, "model.depth=14"], gpu="H100").mfu_source  # measured, not at this depth
    assert why.startswith("the default 37%: gpu.md has no measurement of this configuration (depth 14")
    why = plan.plan_sweep(["model=dit", *overrides[2:]], gpu="H100").mfu_source
    assert why.startswith("the default 37%: gpu.md measures MM-DiT at hidden_size 64 x depth only, not DiT")


def test_planner_gives_each_job_the_mfu_of_its_own_configuration(tmp_path, monkeypatch, capsys):
    """A sweep over depths: the d24 job at the d24 measurement, not at the first job's (d15)."""
    from src import plan

    monkeypatch.setattr(plan, "GPU_RESULTS", tmp_path / "gpu.md")
    write_measurements(tmp_path / "gpu.md", more=[("d24-default", 24, 128, 0.6, {})])
    overrides = ["-m", "model=mmdit_d15,mmdit_d24", "model.qk_norm=rms_norm", *SHARDS, f"paths.root_dir={tmp_path}"]
    p = plan.plan_sweep(overrides, gpu="H100")
    d15, d24 = p.jobs
    assert (d15.mfu, d24.mfu) == (0.52, 0.6) and p.mfu is None
    assert "d24-default (batch 128)" in d24.mfu_source
    assert p.mfu_source == ("measured 52.0% for d15-default (batch 128) on NVIDIA H100 80GB HBM3 (job 0); "
                            "measured 60.0% for d24-default (batch 128) on NVIDIA H100 80GB HBM3 (job 1)")
    hours = [j.total_flops / (plan.H100_BF16_DENSE_TFLOPS * 1e12 * mfu) / 3600 for j, mfu in ((d15, 0.52), (d24, 0.6))]
    text = plan.render(p)
    assert [line.split()[-2] for line in text.splitlines()[1:3]] == [f"{h:.3g}" for h in hours]
    assert f"peak and each job's utilisation (52% to 60%): {sum(hours):.4g} in all" in text
    given = plan.plan_sweep(overrides, gpu="H100", mfu=0.3)
    assert given.mfu == 0.3 and [j.mfu for j in given.jobs] == [0.3, 0.3] and given.mfu_source == "given (--mfu)"


def test_planner_reads_the_committed_gpu_measurements(tmp_path, capsys):
    """bench/results/gpu.md as make bench-gpu wrote it on an H200: the paper grid's launch (d15, batch 128, the GPU
    defaults) takes its measured MFU there, and the stated default elsewhere."""
    from src import plan
    from src.models.perf import read_bench_results

    measured = {r["config"]["name"]: r for r in read_bench_results(plan.GPU_RESULTS)["results"]}["d15-default"]
    overrides = ["model=mmdit_d15", "model.qk_norm=rms_norm", *SHARDS, f"paths.root_dir={tmp_path}"]
    p = plan.plan_sweep(overrides, gpu="H200")
    assert p.mfu == measured["mfu"] and "d15-default (batch 128) on NVIDIA H200" in p.mfu_source
    assert plan.plan_sweep(overrides, gpu="A100").mfu == plan.DEFAULT_MFU
    # The command line says which it used (python -m src.plan ... --gpu H200).
    assert plan.main([*overrides, "--gpu", "H200"]) == 0
    out = capsys.readouterr().out
    assert f"Utilisation: measured {measured['mfu']:.1%} for d15-default (batch 128) on NVIDIA H200." in out


def test_wrapped_backbones_are_not_compiled_by_auto_nor_fused_by_auto(monkeypatch):
    """Under FSDP the blocks are sharded units: "auto" keeps them eager and per-block (explicit settings say so)."""
    import src.models.mmdit as mmdit_code

    class Wrapper(torch.nn.Module):  # stands for FSDP's wrapper, which forwards attribute lookups inside
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    model = MMDiT(**SIZE)
    wrapper = Wrapper(model)
    assert compile_backbone(wrapper, "auto", "cuda") is wrapper
    monkeypatch.setattr(mmdit_code, "is_sharded", lambda block: True)
    monkeypatch.setattr(mmdit_code, "resolve_auto", lambda value, device: value == "auto" or bool(value))  # a GPU
    monkeypatch.setattr(MMDiT, "block_modulations", None)  # must not be reached
    x, t, _, ctx, pooled = batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(MMDiT(**SIZE, fused_modulation="auto")(x, t, ctx, pooled), model(x, t, ctx, pooled))
    with pytest.raises(ValueError, match="fused_modulation=True is not allowed with FSDP"):
        MMDiT(**SIZE, fused_modulation=True)(x, t, ctx, pooled)


def test_a_backbone_of_your_own_is_compiled_as_model_compile_asks(monkeypatch):
    """docs/backbone.md: a backbone of your own (no transformer blocks, the shared keys taken and left unread, as
    docs/examples/convnet.py does) is compiled whole under model.compile=full, with model.compile_backend's mode.
    The job read both from the backbone's own record of them, which such a backbone lacks: it stayed eager."""
    from hydra import compose, initialize_config_module

    import src.training.module as module_code
    from src.config import register_resolvers
    from src.training.job import build_module

    class Own(torch.nn.Module):
        def __init__(self, **shared_keys):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t, context, pooled):
            return x

    register_resolvers()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model.compile=full", "model.compile_backend=max-autotune"])
    calls = []
    monkeypatch.setattr(module_code, "compile_backbone",
                        lambda backbone, mode, device, backend: calls.append((mode, backend)) or backbone)
    build_module(cfg, get_recipe("rf/lognorm(0.00, 1.00)"), Own()).on_fit_start()
    assert calls == [("full", "max-autotune")]


def test_compile_settings_of_a_backbone_of_your_own_are_checked_before_training():
    """Such a backbone does not check model.compile and compile_backend itself: refused in one line by the checks
    that run before anything is built, not at the first training step."""
    from hydra import compose, initialize_config_module

    from src.config import ConfigError, register_resolvers
    from src.training.prepare import DIM_KEYS, check_model

    register_resolvers()
    for setting, message in (("model.compile=yes", "model: compile='yes' is not allowed"),
                             ("model.compile_backend=fast", "model: compile_backend='fast' is not allowed")):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=["model._target_=torch.nn.Identity", setting])
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_model(cfg, dict.fromkeys(DIM_KEYS, 1))


def test_a_backbone_whose_module_cannot_be_imported_is_one_line_naming_the_target():
    """model=convnet without docs/examples on PYTHONPATH: Hydra's error spans three lines, of which the console showed
    the first, "model: Error loading 'convnet.ConvNet':"; the check (and the job's build) name the setting instead."""
    from hydra import compose, initialize_config_module

    from src.config import ConfigError, register_resolvers
    from src.training.job import build_backbone
    from src.training.prepare import DIM_KEYS, check_model

    register_resolvers()
    for target, cause in (("not_a_module_here.ConvNet", "No module named 'not_a_module_here'"),
                          ("not_a_package.sub.ConvNet", "No module named 'not_a_package'")):
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"model._target_={target}"])
        for build in (lambda: check_model(cfg, dict.fromkeys(DIM_KEYS, 1)), lambda: build_backbone(cfg)):
            with pytest.raises(ConfigError) as raised:
                build()
            message = str(raised.value)
            assert message.startswith(f"model._target_={target}: cannot import it (ModuleNotFoundError: {cause})")
            assert "PYTHONPATH" in message and "\n" not in message
    # The module imports but has no such class: a typo in the class name, not a module to put on PYTHONPATH.
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model._target_=src.models.MMDit"])
    for build in (lambda: check_model(cfg, dict.fromkeys(DIM_KEYS, 1)), lambda: build_backbone(cfg)):
        with pytest.raises(ConfigError) as raised:
            build()
        assert str(raised.value) == "model._target_=src.models.MMDit: src.models has no MMDit (did you mean MMDiT?)"
