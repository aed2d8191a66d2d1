"""bench/bench_gpu.py (make bench-gpu) works before it meets a GPU: its --dry-run runs every configuration at tiny
size on the CPU, and a failing configuration is recorded, not fatal."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_configuration_and_writes_the_results(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "gpu.md"
    assert bench.main(["--dry-run", "--out", str(out), "--budget-s", "3600"]) == 0
    printed = capsys.readouterr().out
    data = bench.read_results(out)
    names = [c.name for c in bench.configurations()]
    assert [r["config"]["name"] for r in data["results"]] == names
    assert all(r["status"] == "ok" for r in data["results"]), [(r["config"]["name"], r["status"])
                                                              for r in data["results"] if r["status"] != "ok"]
    assert all(name in printed for name in names)  # printed as it goes
    text = out.read_text()
    assert "| d24-default |" in text and "| d15-diffusers |" in text and "SDPA cudnn" not in text  # CPU: math
    job = next(r for r in data["results"] if r["config"]["name"] == "d15-job")  # the training module in Lightning
    assert job["config"]["model"] == "job" and job["step_ms"] > 0 and "| d15-job | 15 | 2 | the training job's" in text
    assert "| d15-job-loss-every-step | 15 | 2 |" in text and "loss read back every step" in text
    largest = next(r for r in data["results"] if r["config"]["name"] == "d15-default-largest")
    assert largest["batch"] == 2 * largest["config"]["batch"]  # the dry run's planned batch ran
    assert data["bootstrap"]["max_rel_diff"] < 1e-6 and data["header"]["dry_run"] is True
    methods = data["bootstrap"]["methods"]
    cpu = methods.pop("cpu workers")  # the report's numpy path on every core: timed, it is the reference itself
    assert {m: v["max_rel_diff"] < 1e-6 for m, v in methods.items()} == {
        "rows": True, "rows-newton-schulz": True, "eigh": True, "newton-schulz": True, "rows-cov": True}
    assert methods["rows-cov"]["reference"] > methods["rows-cov"]["records"] and "covariance of a reference" in text
    assert cpu["workers"] >= 1 and cpu["records"] >= 2 and cpu["ms_per_record_draw"] > 0 and cpu["grid_minutes"] > 0
    assert "numpy on the CPU's" in text


def test_largest_batch_is_sized_from_the_defaults_memory(monkeypatch):
    """Activation memory per sample = (peak - what stays allocated) / batch; the batch fills 90% of the device,
    rounded down to a multiple of 32; without a fitting default, checkpointing at the default's batch."""
    bench = load_bench()
    monkeypatch.setattr(bench.torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"total_memory": 100 * 2**30})())
    cfg = next(c for c in bench.configurations() if c.name == "d24-default-largest")
    default = bench.Result(config={"name": "d24-default"}, batch=128, peak_gib=60.0, static_gib=20.0)
    assert bench.largest_batch_plan(cfg, [default], "cuda", False) == (224, False)  # (90 - 20) / (40 / 128)
    oom = bench.Result(config={"name": "d24-default"}, batch=128, status="failed: out of memory")
    assert bench.largest_batch_plan(cfg, [oom], "cuda", False) == (128, True)
    full = bench.Result(config={"name": "d24-default"}, batch=128, peak_gib=80.0, static_gib=20.0)
    assert bench.largest_batch_plan(cfg, [full], "cuda", False) == (128, False)  # no room above the default's batch
    args = bench.parse_args([])  # as on a GPU
    args.deadline = float("inf")
    res = bench.run_config(cfg, args, bench.TINY_SETUP, "cuda", [full])  # skipped: nothing is built or measured
    assert res.status.startswith("skipped: no batch above 128 fits")


def test_a_failing_configuration_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    bench = load_bench()
    real = bench.measure

    def measure(cfg, *args, **kwargs):
        if cfg.name == "d15-eager":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if cfg.name == "d15-diffusers":
            raise RuntimeError("compile failed: something")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(bench, "measure", measure)
    out = tmp_path / "gpu.md"
    argv = ["--dry-run", "--out", str(out), "--no-bootstrap", "--only", "d15-eager", "d15-diffusers", "d24-eager"]
    assert bench.main(argv) == 0
    status = {r["config"]["name"]: r["status"] for r in bench.read_results(out)["results"]}
    assert status == {"d15-eager": "failed: out of memory", "d15-diffusers": "failed: RuntimeError: compile failed: "
                      "something", "d24-eager": "ok"}


def test_time_budget_skips_what_no_longer_fits(tmp_path):
    bench = load_bench()
    out = tmp_path / "gpu.md"
    assert bench.main(["--dry-run", "--out", str(out), "--no-bootstrap", "--budget-s", "0",
                       "--only", "d15-eager"]) == 0
    assert bench.read_results(out)["results"][0]["status"] == "skipped: time budget"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is present")
def test_without_a_gpu_only_the_dry_run_runs(tmp_path, capsys):
    assert load_bench().main(["--out", str(tmp_path / "gpu.md")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "gpu.md").exists()


def test_a_dry_run_never_replaces_the_measured_results(tmp_path, monkeypatch):
    """`make bench-gpu BENCH_ARGS=--dry-run` without --out writes to the temp folder, not bench/results/gpu.md."""
    bench = load_bench()
    measured = (ROOT / "bench" / "results" / "gpu.md").read_bytes()
    monkeypatch.setattr(bench.tempfile, "gettempdir", lambda: str(tmp_path))
    assert bench.main(["--dry-run", "--no-bootstrap", "--only", "d15-eager"]) == 0
    assert (tmp_path / "gpu-dry-run.md").is_file()
    assert (ROOT / "bench" / "results" / "gpu.md").read_bytes() == measured


def test_make_target_runs_the_benchmark():
    dry = subprocess.run(["make", "-n", "bench-gpu"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "bench/bench_gpu.py" in dry


def test_profile_breaks_the_step_down_by_kind_of_kernel(tmp_path):
    bench = load_bench()
    out = tmp_path / "gpu.md"
    assert bench.main(["--dry-run", "--profile", "--no-bootstrap", "--out", str(out), "--only", "d15-default"]) == 0
    breakdown = bench.read_results(out)["results"][0]["breakdown"]
    assert breakdown["matmul"] > 0 and breakdown["attention"] > 0 and breakdown["optimizer"] > 0
    assert "## Where the step's time goes" in out.read_text()
    top = bench.read_results(out)["results"][0]["top_kernels"]
    times = [ms for _, _, ms in top]
    assert 0 < len(top) <= bench.TOP_KERNELS and times == sorted(times, reverse=True)
    assert "Costliest kernels of d15-default" in out.read_text() and f"| `{top[0][0][:100]}` |" in out.read_text()
    assert bench.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert bench.kernel_kind("fmha_cutlassB_f32_aligned_64x64") == "attention"  # before its CUTLASS name
    assert bench.kernel_kind("triton_per_fused_native_layer_norm_0") == "compiled (inductor)"
