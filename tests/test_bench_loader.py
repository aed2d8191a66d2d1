"""bench/bench_loader.py (one of `make bench`'s benchmarks) runs as documented, shortened (--quick), and writes its
results file: the embedded and real-like shards read by 0 and 2 loader workers against the training step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_loader_compares_the_loader_with_the_training_step(tmp_path):
    make = subprocess.run(["make", "-n", "bench", "PY=python"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "bench/bench_*.py" in make.stdout  # `make bench` runs every bench/bench_*.py but the GPU one
    out = tmp_path / "loader.md"
    subprocess.run([sys.executable, "bench/bench_loader.py", "--quick", "--threads", "1", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = out.read_text()
    rows = re.findall(r"^\| (digits|real-like) \(.*?\) \| (\d) \| [\d,]+ \| [\d.]+x \|$", text, re.M)
    assert sorted(rows) == [("digits", "0"), ("digits", "2"), ("real-like", "0"), ("real-like", "2")]
    assert re.search(r"Training step \(MM-DiT depth 2, hidden 64, .*\): [\d.]+ ms median", text)
    assert "Written by `python bench/bench_loader.py`." in text
