"""`make bench`'s CPU benchmarks (bench/bench_*.py but bench_gpu.py and the two with tests of their own) run as
documented, shortened, and write their results file where --out says (never over bench/results/ in a test).
bench_fsdp.py had broken unnoticed: it loaded conf/model/mmdit_d38.yaml without its defaults list, and `make bench`
stopped there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, out: Path, timeout: int = 300) -> str:
    results = sorted((ROOT / "bench" / "results").glob("*.md"))
    before = {p: p.stat().st_mtime_ns for p in results}
    subprocess.run([sys.executable, f"bench/{script}", *args, "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=timeout)
    assert {p: p.stat().st_mtime_ns for p in results} == before  # the committed results are left alone
    assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # written by a rename
    return out.read_text()


def test_bench_backbone_times_ours_against_diffusers_and_keeps_other_sections(tmp_path):
    out = tmp_path / "backbone.md"
    out.write_text("# Backbone benchmark\n\n<!-- cuda batch 32 -->\n## CUDA BATCH 32\n\nkept\n"
                   "<!-- /cuda batch 32 -->\n")
    text = run_bench("bench_backbone.py", "--reps", "1", "--warmup", "0", "--batch", "1", out=out)
    rows = re.findall(r"^\| (\d) \| (\d+) \| [\d,]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+ \| \d+ \|$", text, re.M)
    assert rows == [("2", "128"), ("4", "256")]
    assert "<!-- cpu -->" in text and "## CUDA BATCH 32\n\nkept" in text  # another device's section stays


def test_bench_sampler_times_every_recipe_with_and_without_guidance(tmp_path):
    text = run_bench("bench_sampler.py", "--steps", "2", "--reps", "1", "--batch", "2", "--threads", "1",
                     out=tmp_path / "sampler.md")
    rows = re.findall(r"^\| (.+?) \| (\d\.\d) \| [\d.]+ \| [\d.]+ \| [+-][\d.]+% \|", text, re.M)
    assert [cfg for _, cfg in rows] == ["1.0", "5.0"] * 3 and len({r for r, _ in rows}) == 3
    assert re.search(r"Target < 10%: (met|NOT met)\.", text)


def test_bench_shard_read_sets_the_loader_against_the_training_step(tmp_path):
    text = run_bench("bench_shard_read.py", "--samples", "16", "--per-shard", "8", "--batch", "4", "--latent", "4",
                     "8", "8", "--context", "8", "16", "--pooled", "16", "--workers", "0", "--batches", "2",
                     "--steps", "1", out=tmp_path / "shard_read.md")
    assert re.search(r"^\| 0 \| [\d.]+ \| \d+ \|$", text, re.M)
    assert re.search(r"^\| default \(conf/model/mmdit\.yaml\) \| [\d,]+ \| 4 \| [\d.]+ \| \d+ \| \d+ \| [\d.]+ ", text,
                     re.M)


def test_bench_fsdp_compares_per_rank_state_and_sizes_the_d38_model(tmp_path):
    text = run_bench("bench_fsdp.py", "--quick", out=tmp_path / "fsdp.md")
    rows = re.findall(r"^\| (ddp|fsdp) \| ([01]) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| [\d.]+ \|$", text, re.M)
    assert [(s, r) for s, r, _ in rows] == [("ddp", "0"), ("ddp", "1"), ("fsdp", "0"), ("fsdp", "1")]
    ddp, fsdp = float(rows[0][2]), float(rows[2][2])
    assert fsdp == pytest.approx(ddp / 2, rel=0.05)  # two ranks: each holds half of the state
    assert "For the paper's depth-38 MM-DiT (8.06B parameters)" in text  # model=mmdit_d38, as a job composes it


@pytest.mark.slow
def test_bench_streaming_compares_streaming_with_in_memory_training(tmp_path):
    text = run_bench("bench_streaming.py", "--steps", "2", "--warmup", "1", "--repeats", "1", "--real-samples", "16",
                     "--index-samples", "200", out=tmp_path / "streaming.md")
    modes = re.findall(r"^\| (in memory|streaming, \d workers) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", text, re.M)
    assert modes == ["in memory", "streaming, 0 workers", "streaming, 2 workers"]
    assert re.search(r"Slowest streaming mode: [\d.]+ of in-memory speed", text)
    assert re.search(r"\*\*\d+ samples/s\*\*", text)
