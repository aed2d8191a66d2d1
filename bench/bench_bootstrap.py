"""The rank report's bootstrap FIDs at the paper's sample size: the row form against the square-root form, one run.

A resample of 1000 evaluation samples holds about 632 distinct rows, fewer than CLIP L/14's 768 features, so the
bootstrap takes frechet_distance_rows (the eigenvalues of a ~632 x 632 cross-Gram matrix; no d x d square root).
This times bootstrap_metrics (numpy, the CPU path) with it and with the square-root form forced (use_rows off), on
the same records and draws, interleaved, and checks the two agree.

    python bench/bench_bootstrap.py                  # 4 records x 8 draws, 1000 x 768, one thread (~30 s)
    python bench/bench_bootstrap.py --draws 16 --records 4

Results go to bench/results/bootstrap.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "bootstrap.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=4)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--features", type=int, default=768)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy loads its BLAS

    import numpy as np

    import src.ranking.bootstrap as bootstrap
    from src.ranking.aggregate import load_sweep
    from src.ranking.synthetic import write_synthetic_sweep

    with tempfile.TemporaryDirectory() as tmp:
        recipes = ("rf", "edm", "eps/linear", "v/cos")[: max(1, args.records)]
        sweep = write_synthetic_sweep(Path(tmp) / "s", recipes=recipes, datasets=("digits",), n_samples=args.samples,
                                      n_reference=args.samples, dim=args.features, sampler_settings=[(50, 1.0)])
        records = load_sweep([sweep]).records.iloc[: args.records]
        use_rows = bootstrap.use_rows
        times = {"rows": [], "square roots": []}
        out = {}
        for _ in range(args.reps):
            for form in times:
                bootstrap.use_rows = use_rows if form == "rows" else (lambda *a: False)
                start = time.perf_counter()
                out[form] = bootstrap.bootstrap_metrics(records, args.draws, seed=0).fid
                times[form].append(time.perf_counter() - start)
        bootstrap.use_rows = use_rows
    per = {form: statistics.median(t) / (len(records) * args.draws) for form, t in times.items()}
    rel = float(np.max(np.abs(out["rows"] - out["square roots"]) / np.abs(out["square roots"])))
    speedup = per["square roots"] / per["rows"]
    text = "\n".join([
        "# Bootstrap FIDs: the row form vs the square-root form",
        "",
        "Written by `python bench/bench_bootstrap.py` (bench/bench_bootstrap.py).",
        "",
        f"numpy on the CPU, {args.threads} thread(s); {len(records)} records x {args.draws} draws of {args.samples} "
        f"samples x {args.features} features (synthetic sweep), the reference resampled too; medians of "
        f"{args.reps} interleaved repetitions of bootstrap_metrics, per record and draw (the reference's own "
        "work, once per draw, included).",
        "",
        "| form | per record and draw (ms) |",
        "|---|---|",
        f"| rows (frechet_distance_rows, the default when a draw has fewer distinct rows than features) | "
        f"{per['rows'] * 1e3:.0f} |",
        f"| square roots (frechet_distance, forced) | {per['square roots'] * 1e3:.0f} |",
        "",
        f"Speed-up {speedup:.2f}x; largest relative difference between the two forms' FIDs: {rel:.1e}.",
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(text)
    os.replace(tmp_out, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
