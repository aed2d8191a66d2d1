"""The rank report's bootstrap FIDs at the paper's sample size: the row form against the square-root form, and
the worker threads against one thread and against BLAS threading alone, one run.

A resample of 1000 evaluation samples holds about 632 distinct rows, fewer than CLIP L/14's 768 features, so the
bootstrap takes frechet_distance_rows (the eigenvalues of a ~632 x 632 cross-Gram matrix; no d x d square root).
Part 1 times bootstrap_metrics (numpy, the CPU path) on one worker with it and with the square-root form forced
(use_rows off), on the same records and draws, interleaved, and checks the two agree. Part 2 times the row form with
1 and with every usable core's worker threads (BLAS held to one thread each, the report's default), against the
serial loop with BLAS threading over every core (the report before it had workers), and checks the draws are equal.
Part 3 times records against a reference of the paper's size (COCO-2014 val: 40,504 images, ~25,600 distinct rows
a resample): the samples' rows against the reference's covariance (B1 S2 B1^T, what the report does) against the
same rows against the reference's rows (the cross-Gram matrix B1 B2^T, which grows with the reference), and checks
the two agree. It times the reference's own work (once per draw, shared by every record of its dataset) apart from
each record's, calling the report's Frechet operations directly in its chunks of draws.

    python bench/bench_bootstrap.py                  # 4 records x 8 draws, 1000 x 768 (~3 min on 2 cores)
    python bench/bench_bootstrap.py --draws 16 --records 8

Results go to bench/results/bootstrap.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "bootstrap.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=4, help="records (parallel work within a chunk of draws)")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--features", type=int, default=768)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians reported)")
    p.add_argument("--reference", type=int, default=40504,
                   help="part 3's reference images (40504: COCO-2014 val, which the paper's evaluation takes whole)")
    p.add_argument("--reference-draws", type=int, default=4, help="part 3's draws of its one record")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    import src.ranking.bootstrap as bootstrap
    from src.ranking.aggregate import load_sweep
    from src.ranking.synthetic import write_synthetic_sweep

    cores = bootstrap.resolve_workers(0)
    blas = max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=1)
    record_pool = bootstrap._record_pool

    @contextmanager
    def blas_threads_only(workers):  # the serial loop with BLAS's own threads (before the worker threads)
        yield SimpleNamespace(map=map)

    with tempfile.TemporaryDirectory() as tmp:
        recipes = ("rf", "edm", "eps/linear", "v/cos")
        sweep = write_synthetic_sweep(Path(tmp) / "s", recipes=recipes[: max(1, min(4, args.records))],
                                      datasets=("digits",), n_samples=args.samples, n_reference=args.samples,
                                      dim=args.features, sampler_settings=[(50, 1.0), (25, 1.0), (10, 1.0)])
        records = load_sweep([sweep]).records.iloc[: args.records]
        use_rows = bootstrap.use_rows
        runs = {"rows, 1 worker": dict(workers=1), "square roots, 1 worker": dict(workers=1, form=False),
                f"rows, {cores} workers": dict(workers=cores),
                f"rows, serial, BLAS on {blas} threads": dict(workers=1, pool=blas_threads_only)}
        bootstrap.bootstrap_metrics(records, 1, seed=0, workers=1)  # warm-up: first calls load BLAS/LAPACK paths
        times = {name: [] for name in runs}
        out = {}
        for _ in range(args.reps):
            for name, run in runs.items():
                bootstrap.use_rows = use_rows if run.get("form", True) else (lambda *a: False)
                bootstrap._record_pool = run.get("pool", record_pool)
                start = time.perf_counter()
                out[name] = bootstrap.bootstrap_metrics(records, args.draws, seed=0, workers=run["workers"]).fid
                times[name].append(time.perf_counter() - start)
        bootstrap.use_rows, bootstrap._record_pool = use_rows, record_pool

        # Part 3: records against a reference of the paper's size, its covariance (the report) vs its rows
        rng = np.random.default_rng(0)
        ref = rng.normal(size=(args.reference, args.features))
        feats = [rng.normal(size=(args.samples, args.features)) * 1.1 + 0.01 * i for i in range(3)]
        draws = args.reference_draws
        counts = rng.multinomial(args.samples, np.full(args.samples, 1 / args.samples), size=draws).astype(float)
        ref_counts = rng.multinomial(args.reference, np.full(args.reference, 1 / args.reference), size=draws)
        chunk = max(1, min(draws, bootstrap.CHUNK_BYTES // (8 * 4 * args.features ** 2)))  # as the report's
        chunks = [slice(s, min(s + chunk, draws)) for s in range(0, draws, chunk)]
        forms = {"rows vs the reference's covariance": (bootstrap.resampled_moments,
                                                       bootstrap.frechet_distance_rows_cov),
                 "rows vs the reference's rows": (bootstrap.resampled_rows, bootstrap.frechet_distance_rows)}
        ref_times = {name: [] for name in forms}
        record_times = {name: [] for name in forms}
        ref_out = {}
        with threadpool_limits(1):  # one worker's BLAS, as the report's
            for _ in range(args.reps):
                for name, (reference_form, distance) in forms.items():
                    start = time.perf_counter()
                    refs = [reference_form(ref, ref_counts[sl].astype(float)) for sl in chunks]
                    ref_times[name].append(time.perf_counter() - start)
                    fids = []
                    for f in feats:
                        start = time.perf_counter()
                        fids.append(np.concatenate([distance(*bootstrap.resampled_rows(f, counts[sl]), *r)
                                                    for sl, r in zip(chunks, refs)]))
                        record_times[name].append(time.perf_counter() - start)
                    ref_out[name] = np.stack(fids)
    per = {name: statistics.median(t) / (len(records) * args.draws) for name, t in times.items()}
    rows1, sqrt1, rows_w, rows_blas = runs
    rel = float(np.max(np.abs(out[rows1] - out[sqrt1]) / np.abs(out[sqrt1])))
    equal = np.array_equal(out[rows1], out[rows_w])
    per_record = {name: statistics.median(t) / args.reference_draws for name, t in record_times.items()}
    shared = {name: statistics.median(t) / args.reference_draws for name, t in ref_times.items()}
    cov_form, rows_form = forms
    ref_rel = float(np.max(np.abs(ref_out[cov_form] - ref_out[rows_form]) / np.abs(ref_out[rows_form])))
    text = "\n".join([
        "# Bootstrap FIDs: the row form vs the square-root form; worker threads",
        "",
        "Written by `python bench/bench_bootstrap.py` (bench/bench_bootstrap.py).",
        "",
        f"numpy on the CPU ({cores} usable cores); {len(records)} records x {args.draws} draws of {args.samples} "
        f"samples x {args.features} features (synthetic sweep), the reference resampled too; medians of "
        f"{args.reps} interleaved repetitions of bootstrap_metrics, wall time per record and draw (the reference's "
        "own work, once per chunk of draws, included).",
        "",
        "| run | per record and draw (ms) |",
        "|---|---|",
        *(f"| {name} | {per[name] * 1e3:.1f} |" for name in runs),
        "",
        f"Row form vs square-root form on one worker: {per[sqrt1] / per[rows1]:.2f}x; largest relative difference "
        f"between the two forms' FIDs: {rel:.1e}.",
        f"{cores} worker threads vs 1: {per[rows1] / per[rows_w]:.2f}x; vs the serial loop with BLAS threading: "
        f"{per[rows_blas] / per[rows_w]:.2f}x. Draws on {cores} workers equal those on 1: {equal}.",
        "",
        f"## Records against a reference of {args.reference} images",
        "",
        f"3 records x {args.reference_draws} draws of {args.samples} samples against {args.reference} reference "
        f"images x {args.features} features (Gaussian), BLAS on one thread, in the report's chunks of {chunk} draws; "
        f"medians of {args.reps} interleaved repetitions, wall time per draw: each record's own (its rows and its "
        "distances), and the reference's (its resampled covariance or rows, shared by every record of its dataset).",
        "",
        "| run | per record and draw (ms) | the reference's, per draw (ms) |",
        "|---|---|---|",
        *(f"| {name} | {per_record[name] * 1e3:.1f} | {shared[name] * 1e3:.1f} |" for name in forms),
        "",
        f"Per record, covariance vs rows: {per_record[rows_form] / per_record[cov_form]:.2f}x; largest relative "
        f"difference between their FIDs: {ref_rel:.1e}.",
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(text)
    os.replace(tmp_out, args.out)
    print(text)
    return 0 if equal and ref_rel < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
