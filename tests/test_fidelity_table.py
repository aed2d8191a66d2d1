"""scripts/fidelity_table.py (the README's fidelity-study command) on a synthetic sweep of Table 1 recipes."""
import subprocess
import sys
from pathlib import Path

from src.ranking.synthetic import write_synthetic_sweep
from src.ranking.tables import parse_markdown_table

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("rf/lognorm(0.00, 1.00)", "eps/linear", "v/cos", "edm/cos")


def test_fidelity_table_per_rung_with_each_seed_alone(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "table1", recipes=RECIPES, seeds=(0, 1), datasets=("digits", "shapes"),
                                  n_samples=12, n_reference=16, dim=2, sampler_settings=[(5, 5.0), (50, 5.0)])
    out = tmp_path / "fidelity.md"
    run = subprocess.run([sys.executable, "scripts/fidelity_table.py", f"default={sweep}", "--bootstrap", "5",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert text.strip() == run.stdout.strip()
    assert f"### Rung `default` ({sweep}): 16 finished runs, seeds 0, 1" in text
    rows = parse_markdown_table(text)
    assert [r["column"] for r in rows] == ["all", "5 steps", "50 steps"]
    assert set(rows[0]) == {"column", "seeds pooled", "p", "90% interval (seeds and samples)", "seed 0 alone",
                            "seed 1 alone", "seed vs seed", "paper's top 3 in our top 5"}
    for row in rows:
        assert -1.0 <= float(row["seeds pooled"]) <= 1.0 and row["90% interval (seeds and samples)"].startswith("[")
        assert -1.0 <= float(row["seed vs seed"]) <= 1.0
    assert "Largest disagreements on 'all'" in text and "cannot separate over all settings" in text
    assert "leaving out one parameterisation" in text
    for family in ("edm", "eps", "rf", "v"):  # one recipe each here: 3 left, a Spearman for each
        assert f"without {family} (1 recipe) " in text and f"without {family} (1 recipe) -," not in text
    # Each dataset ranked alone: one row per recipe, then the Spearman and the seeds' agreement per dataset.
    assert "with each dataset's settings ranked alone" in text
    datasets = parse_markdown_table(text[text.index("| recipe | digits alone"):])
    assert [r["recipe"] for r in datasets[:len(RECIPES)]] == list(RECIPES)  # in the paper's order
    assert set(datasets[0]) == {"recipe", "digits alone", "shapes alone", "both (the report)", "paper"}
    assert [r["recipe"] for r in datasets[len(RECIPES):]] == ["Spearman with the paper", "seed vs seed"]
    assert datasets[-2]["both (the report)"] == rows[0]["seeds pooled"]  # the pooled column is the report's
    assert datasets[-1]["both (the report)"] == rows[0]["seed vs seed"]
    for column in ("digits alone", "shapes alone"):
        assert -1.0 <= float(datasets[-2][column]) <= 1.0 and -1.0 <= float(datasets[-1][column]) <= 1.0
    assert "Noise ceiling on 'all': seeds agree at" in text and "mean of 2 seeds has reliability" in text
    bad = subprocess.run([sys.executable, "scripts/fidelity_table.py", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "expected NAME=SWEEP_DIR" in bad.stderr

