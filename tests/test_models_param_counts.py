"""scripts/param_counts.py: the paper's d = 24 and d = 38 MM-DiTs have about 2B and 8B parameters."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "param_counts.py"


def load_script():
    spec = importlib.util.spec_from_file_location("param_counts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_sizes_match_2b_and_8b(capsys):
    table = load_script().main([])
    counts = {r["depth"]: r["params"] for r in table}
    # 2,028,328,000 is also the published parameter count of SD3-medium's transformer (d = 24).
    assert counts == {24: 2_028_328_000, 38: 8_056_617_792}
    assert abs(counts[24] / 2e9 - 1) < 0.05 and abs(counts[38] / 8e9 - 1) < 0.05
    out = capsys.readouterr().out
    assert "| mmdit | 24 | 1,536 | 24 |" in out and "2B" in out and "8B" in out


def test_counts_agree_with_diffusers_on_meta():
    pytest.importorskip("diffusers")
    table = load_script().main(["--depths", "24", "--qk-norm", "--diffusers"])
    assert len(table) == 2 and all(r["params"] == r["diffusers"] for r in table)
