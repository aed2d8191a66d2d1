"""The rank report's bootstrap through its command line (docs/ranking.md#bootstrap-intervals): the same seed writes
the same CSV files byte for byte, whatever the worker threads (--workers) or an explicit --device cpu, and another
seed draws other intervals."""
from pathlib import Path

from src.ranking.report import main
from src.ranking.synthetic import write_synthetic_sweep

CSVS = ("ranks.csv", "records.csv", "runs.csv", "separability.csv", "spearman.csv", "table2.csv")


def csv_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in CSVS}


def test_the_same_bootstrap_seed_writes_the_same_csvs_for_any_workers_or_device(tmp_path, capsys):
    # close recipes and two training seeds each: the draws move the intervals, and the seed bootstrap runs too
    sweep = write_synthetic_sweep(tmp_path / "multirun" / "demo", recipes=("rf", "edm", "eps/linear"),
                                  quality=(0.0, 0.02, 0.04), datasets=("digits",), n_samples=16, n_reference=24,
                                  dim=4, seeds=(0, 1), sampler_settings=((5, 5.0), (50, 5.0)))
    common = [str(sweep), "--bootstrap", "12", "--seed", "3"]
    variants = {"first": ["--workers", "1"], "threads": ["--workers", "2"],
                "every_core": ["--workers", "0", "--device", "cpu"]}
    for name, extra in variants.items():
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0
    first = csv_bytes(tmp_path / "first")
    for name in variants:
        assert csv_bytes(tmp_path / name) == first, name
    assert main([str(sweep), "--bootstrap", "12", "--seed", "4", "--out", str(tmp_path / "other")]) == 0
    other = csv_bytes(tmp_path / "other")
    assert other["ranks.csv"] != first["ranks.csv"]  # the intervals come from the seed's draws
    assert other["records.csv"] == first["records.csv"]  # the records themselves are not drawn
    capsys.readouterr()
