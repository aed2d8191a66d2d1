"""The ranking reads what src.evaluation writes: Record objects, their npz arrays and the reference cache file."""
import numpy as np
import pytest

from src.ranking.report import build_report


@pytest.mark.slow  # imports src.evaluation / src.metrics (torch, open_clip)
def test_report_on_records_written_by_the_evaluation_code(tmp_path):
    from src.results import Record, merge_results
    from src.metrics import feature_statistics, fid_from_features
    from src.utils.io import save_npz

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(40, 5)).astype(np.float32)
    mu, sigma = feature_statistics(reference)
    ref_path = save_npz(tmp_path / "cache" / "clip__digits.npz", features=reference, mu=mu, sigma=sigma,
                        extractor_id=np.asarray("tiny-clip"), dataset_id=np.asarray("digits"))
    sweep = tmp_path / "multirun" / "compat"
    for job, (recipe, shift) in enumerate([("rf/lognorm(0.00, 1.00)", 0.1), ("eps/linear", 0.8), ("v/cos", 2.0)]):
        run_dir = sweep / str(job)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("{}\n")
        records = []
        for steps, cfg in ((5, 5.0), (25, 5.0), (50, 5.0)):
            for ema in (True, False):
                feats = (rng.normal(size=(24, 5)) + shift).astype(np.float32)
                scores = (0.25 - 0.02 * shift + 0.01 * rng.normal(size=24)).astype(np.float32)
                arrays = run_dir / "eval" / f"{job}_{steps}_{ema}.npz"
                save_npz(arrays, clip_scores=scores, features=feats)
                fid = fid_from_features(feats, reference)
                if recipe == "v/cos" and steps == 5 and not ema:
                    fid = float("nan")  # a diverged setting: written as null
                records.append(Record(
                    recipe=recipe, family=recipe.split("/")[0], params={}, dataset="digits",
                    tags={}, train_seed=0, backbone="MMDiT",
                    setting=f"{steps} steps, cfg {cfg:.1f}", steps=steps, cfg=cfg, shift=1.0, ema=ema,
                    sampler="rf_time", n_samples=24, eval_seed=0, feature_extractor="tiny_clip:0123456789ab",
                    fid_features="clip_raw", checkpoint="best", checkpoint_step=100,
                    clip_score=float(scores.astype(np.float64).mean()), fid_clip=fid, fid_inception=None,
                    n_reference=40,
                    arrays=str(arrays.relative_to(run_dir)), reference_arrays=str(ref_path), config={},
                ))
        merge_results(run_dir, records)
    report = build_report([sweep], draws=20)
    ranked = report.ranked
    assert len(ranked) == 18 and ranked["fid_clip"].isna().sum() == 1
    records = report.records
    assert set(records["fid_features"]) == {"clip_raw"}  # what the evaluation code writes: the paper's raw features
    nan_row = int(np.flatnonzero(records["fid_clip"].isna())[0])
    assert list(report.bootstrap.metrics.fixed) == [nan_row]  # stays in the last front in every draw
    assert np.isnan(report.bootstrap.metrics.fid[:, nan_row]).all()
    # The bootstrap's moments with every sample drawn once give the evaluation's own fid_clip (one Frechet distance).
    from src.metrics.frechet import frechet_distance
    from src.ranking.bootstrap import resampled_moments

    for rec in records[records["fid_clip"].notna()].itertuples():
        feats = np.load(rec.arrays)["features"].astype(np.float64)
        ones = np.ones((1, len(feats)))
        fid = frechet_distance(*resampled_moments(feats, ones), *resampled_moments(reference.astype(np.float64),
                                                                                   np.ones((1, len(reference)))))
        assert fid[0] == pytest.approx(rec.fid_clip, rel=1e-6)
    diverged = ranked[ranked["fid_clip"].isna()].iloc[0]
    assert diverged["front"] == ranked[(ranked["setting"] == "5 steps, cfg 5.0") & ~ranked["ema"]]["front"].max()
    assert list(report.table.index) == ["rf/lognorm(0.00, 1.00)", "eps/linear", "v/cos"]
