"""bench/bench_bootstrap.py runs as documented (tiny sizes) and writes its results file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_bootstrap_times_both_forms_and_the_workers_and_finds_them_equal(tmp_path):
    out = tmp_path / "bootstrap.md"
    subprocess.run([sys.executable, "bench/bench_bootstrap.py", "--records", "2", "--draws", "3", "--samples", "60",
                    "--features", "48", "--reps", "1", "--reference", "400", "--reference-draws", "2",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    text = out.read_text()
    assert "| rows, 1 worker |" in text and "| square roots, 1 worker |" in text
    assert re.search(r"\| rows, \d+ workers \|", text) and re.search(r"\| rows, serial, BLAS on \d+ threads \|", text)
    rel = float(re.search(r"FIDs: ([0-9.e+-]+)\.", text).group(1))
    assert rel < 1e-6
    assert re.search(r"Draws on \d+ workers equal those on 1: True\.", text)
    # Part 3: against a reference of many rows, its covariance and its rows give the same FIDs
    assert "| rows vs the reference's covariance |" in text and "| rows vs the reference's rows |" in text
    assert float(re.search(r"difference between their FIDs: ([0-9.e+-]+)\.", text).group(1)) < 1e-6
