"""Tests for src.evaluation: sampler settings, results records, and the plain evaluation loop."""

from __future__ import annotations

import json
import re
import zlib

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.evaluation import (
    PAPER_SETTINGS,
    Record,
    SamplerSetting,
    evaluate_backbone,
    find_record,
    merge_results,
    read_results,
    record_identity,
    write_results,
)
from src.formulations import get_recipe
from src.metrics import ClipFeatureExtractor, clip_score, fid_from_features, reference_features
from src.metrics.images import to_rgb01
from tests.test_metrics import TINY_CLIP, tiny_clip_file  # noqa: F401  (fixture)

SHAPE = (1, 8, 8)


class FakeClip:
    """Deterministic stand-in for ClipFeatureExtractor: random projections, L2-normalised."""

    def __init__(self, dim: int = 8):
        self.proj = torch.randn(48, dim, generator=torch.Generator().manual_seed(0))
        self.dim = dim

    def image_features(self, images):
        return F.normalize(F.adaptive_avg_pool2d(to_rgb01(images), 4).flatten(1) @ self.proj, dim=1)

    def text_features(self, captions):
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(c.encode()))) for c in captions]
        return F.normalize(torch.stack(rows), dim=1)


class Net(torch.nn.Module):
    """A small conditional conv backbone that counts its forward calls."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.cond = torch.nn.Linear(4, 1)
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x, t, context, pooled):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("interrupted")
        assert not self.training
        return torch.tanh(self.conv(x)) + self.cond(pooled).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)


def _eval_set(n: int = 10) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {
        "captions": [f"a photo of a {k}" for k in range(n)],
        "context": torch.randn(n, 3, 4, generator=gen),
        "pooled": torch.randn(n, 4, generator=gen),
        "latent_shape": SHAPE,
    }


@pytest.fixture
def setup(tmp_path):
    extractor = FakeClip()
    images = torch.rand(40, *SHAPE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    reference = reference_features("fake", "toy/eval", images, extractor, tmp_path / "cache")
    kwargs = dict(
        formulation=get_recipe("rf/lognorm(0.00, 1.00)"), eval_set=_eval_set(), extractor=extractor, n_samples=12,
        seed=3, batch_size=5, decode=lambda x: x * 2, out_dir=tmp_path / "run", ema=True,
        base_record={"dataset": "toy", "checkpoint_step": 100, "config": {"lr": 1e-3}}, reference=reference,
    )
    return kwargs


SETTINGS = [SamplerSetting(2, 1.0), SamplerSetting(3, 5.0)]


# ---- settings -------------------------------------------------------------------------------------
def test_paper_settings_and_labels():
    assert [s.label for s in PAPER_SETTINGS] == [
        "50 steps, cfg 1.0", "50 steps, cfg 2.5", "50 steps, cfg 5.0",
        "5 steps, cfg 5.0", "10 steps, cfg 5.0", "25 steps, cfg 5.0",
    ]
    assert SamplerSetting(25, 5.0, shift=3.0).label == "25 steps, cfg 5.0, shift 3.0"
    for bad in (dict(steps=0, cfg=1.0), dict(steps=5, cfg=-1.0), dict(steps=5, cfg=1.0, shift=0.0),
                dict(steps=5, cfg=float("nan"))):
        with pytest.raises(ValueError, match="sampler setting"):
            SamplerSetting(**bad)


# ---- records --------------------------------------------------------------------------------------
def _record(**over) -> Record:
    base = dict(recipe="rf", family="rf", params={}, dataset="toy", tags={}, train_seed=0, backbone="MMDiT",
                setting="5 steps, cfg 5.0", steps=5, cfg=5.0, shift=1.0, ema=True, sampler="rf_time",
                n_samples=10, eval_seed=0, feature_extractor="fake", fid_features="clip_raw", checkpoint="best",
                checkpoint_step=7, clip_score=0.25, fid_clip=1.5, fid_inception=None, n_reference=20,
                arrays="eval/a.npz", reference_arrays="/r.npz")
    return Record(**{**base, **over})


def test_results_json_round_trip_and_merge(tmp_path):
    write_results(tmp_path, [_record(), _record(ema=False)])
    assert [record_identity(r) for r in read_results(tmp_path)] == [
        record_identity(_record()), record_identity(_record(ema=False))]
    assert record_identity(_record())[:3] == ("rf", "rf", "{}") and record_identity(_record())[11] is True
    merged = merge_results(tmp_path, [_record(fid_clip=0.5), _record(recipe="edm/rf")])
    assert len(merged) == 3 and read_results(tmp_path) == merged
    assert find_record(merged, record_identity(_record()))["fid_clip"] == 0.5
    # Another evaluation setting is another record: kept apart, not replaced.
    merged = merge_results(tmp_path, [_record(n_samples=20, fid_clip=0.7)])
    assert len(merged) == 4 and find_record(merged, record_identity(_record()))["fid_clip"] == 0.5
    assert Record.from_dict(merged[0]) == Record.from_dict(json.loads((tmp_path / "results.json").read_text())[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.json.lock", "results.json"]


def test_record_non_finite_metric_is_null_and_missing_field_is_named(tmp_path):
    assert _record(fid_clip=float("nan")).to_dict()["fid_clip"] is None
    d = _record().to_dict()
    del d["n_samples"]
    with pytest.raises(ValueError, match="n_samples"):
        Record.from_dict(d)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        read_results(tmp_path)


def test_a_results_file_with_nan_or_infinity_takes_new_records_and_is_written_strict(tmp_path):
    """A diverged run's metrics stored as NaN / Infinity (an older writer, another tool; json reads them): merging
    the next evaluation's record wrote them back through the strict writer, "ValueError: Out of range float values
    are not JSON compliant", and the new record was lost. Now they are written as null, as Record.to_dict does."""
    (tmp_path / "results.json").write_text(json.dumps([{**_record().to_dict(), "fid_clip": float("inf"),
                                                        "clip_score": float("nan")}]))
    merged = merge_results(tmp_path, [_record(ema=False)])
    assert [(r["ema"], r["clip_score"], r["fid_clip"]) for r in merged] == [(True, None, None), (False, 0.25, 1.5)]
    text = (tmp_path / "results.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}")) == merged


# ---- evaluate_backbone ----------------------------------------------------------------------------
def test_evaluate_writes_records_arrays_and_grid(setup):
    net = Net()
    net.train()
    records = evaluate_backbone(net, settings=SETTINGS, **setup)
    assert net.training  # restored after evaluation
    assert net.calls == 3 * 2 + 3 * 3  # 3 batches (12 samples, batch 5) x steps; CFG in one batched forward
    run = setup["out_dir"]
    assert read_results(run) == records and len(records) == 2
    rec = records[1]
    assert rec["recipe"] == "rf/lognorm(0.00, 1.00)" and rec["family"] == "rf_lognorm"
    assert rec["params"] == {"m": 0.0, "s": 1.0} and rec["setting"] == "3 steps, cfg 5.0"
    assert (rec["steps"], rec["cfg"], rec["shift"], rec["ema"]) == (3, 5.0, 1.0, True)
    assert (rec["n_samples"], rec["n_reference"], rec["eval_seed"], rec["checkpoint_step"]) == (12, 40, 3, 100)
    assert (rec["sampler"], rec["fid_features"], rec["checkpoint"], rec["tags"]) == ("rf_time", "clip_raw", "best", {})
    assert rec["config"] == {"lr": 1e-3} and rec["fid_inception"] is None and rec["created"]
    with np.load(run / rec["arrays"]) as arrays:
        scores, feats, prompts = arrays["clip_scores"], arrays["features"], arrays["prompts"]
    assert scores.shape == (12,) and feats.shape == (12, 8)
    assert list(prompts) == [f"a photo of a {k % 10}" for k in range(12)]  # sample k is prompted with caption k % N
    assert rec["clip_score"] == pytest.approx(float(scores.mean()), rel=1e-6)
    ref = setup["reference"]
    assert rec["fid_clip"] == pytest.approx(fid_from_features(feats, ref.features), rel=1e-9)
    assert rec["reference_arrays"] == str(ref.path.resolve())  # the cache lies outside the run dir: absolute
    text = setup["extractor"].text_features([f"a photo of a {k % 10}" for k in range(12)])
    np.testing.assert_allclose(scores, clip_score(torch.tensor(feats), text).numpy(), rtol=1e-5, atol=1e-6)
    # The PNG grid: the 12 samples, enlarged and labelled with their prompts; its cells read back as the npz's grid.
    png = Path(str(run / rec["arrays"]).replace(".npz", ".png"))
    from src.evaluation.grids import cut_grid, read_grid, read_prompts

    with np.load(run / rec["arrays"]) as arrays:
        grid = arrays["grid"]
    assert grid.shape == (12, 1, 8, 8) and grid.dtype == np.uint8  # grey samples, as generated, as the PNG's 8 bits
    cells, stored = cut_grid(png), read_grid(run / rec["arrays"], None)
    assert cells.shape == (12, 8, 8, 3) and np.array_equal(cells, stored)
    np.savez(run / "float.npz", grid=grid / 127.5 - 1.0)  # a float grid in [-1, 1], as arrays were written before
    assert np.array_equal(read_grid(run / "float.npz", None), stored)
    assert read_prompts(run / rec["arrays"], png) == [f"a photo of a {k % 10}" for k in range(12)]


def test_diverged_samples_are_recorded_with_null_metrics_and_the_evaluation_goes_on(setup):
    """A backbone whose samples are NaN (a diverged run): the FID stopped the whole evaluation with "features contains
    NaN or inf values", no later setting was scored and the job failed, though the report ranks such a record in
    the last front of its setting. Now every setting's record holds null metrics (strict JSON), its grid is black
    (no undefined NaN cast), and a rerun finds the records complete."""
    import warnings

    class Diverged(Net):
        def forward(self, *args):
            return super().forward(*args) * float("nan")

    net = Diverged()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        records = evaluate_backbone(net, settings=SETTINGS, **setup)
    assert [(r["setting"], r["clip_score"], r["fid_clip"]) for r in records] == [
        ("2 steps, cfg 1.0", None, None), ("3 steps, cfg 5.0", None, None)]
    text = (setup["out_dir"] / "results.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}")) == records
    with np.load(setup["out_dir"] / records[0]["arrays"]) as arrays:
        assert np.isnan(arrays["clip_scores"]).all() and not arrays["grid"].any()
    calls = net.calls
    assert evaluate_backbone(net, settings=SETTINGS, **setup) == records and net.calls == calls
    # With Inception too: its FID is null as well, and the record is complete (it was sampled again at every rerun).
    inc = FakeClip(dim=5)
    images = torch.rand(30, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    inc_ref = reference_features("fake-inception", "toy/eval", images, inc, setup["out_dir"].parent / "cache")
    records = evaluate_backbone(net, settings=SETTINGS, inception=(inc, inc_ref), **setup)
    assert [(r["fid_inception"], r["inception_extractor"]) for r in records] == [(None, "FakeClip")] * 2
    calls = net.calls
    assert evaluate_backbone(net, settings=SETTINGS, inception=(inc, inc_ref), **setup) == records
    assert net.calls == calls


def test_sample_k_is_caption_k_mod_n_with_noise_k_at_the_settings_steps_cfg_and_shift(setup):
    """Each sample's features are those of sampling its own prompt's conditioning from its own initial noise (common
    random numbers: noise k depends on (seed, k) only) at exactly this setting, decoded and clamped."""
    from src.sampling import initial_noise, sample

    setting = SamplerSetting(3, 2.5, shift=3.0)
    rec = evaluate_backbone(Net(), settings=[SamplerSetting(2, 1.0), setting], **setup)[1]
    assert (rec["setting"], rec["steps"], rec["cfg"], rec["shift"]) == (setting.label, 3, 2.5, 3.0)
    eval_set, idx = setup["eval_set"], torch.arange(12) % 10
    with torch.no_grad():
        x0 = sample(Net().eval(), setup["formulation"], initial_noise(12, SHAPE, 3), eval_set["context"][idx],
                    eval_set["pooled"][idx], 3, 2.5, 3.0)
        expected = setup["extractor"].image_features(setup["decode"](x0).clamp(-1, 1))
    with np.load(setup["out_dir"] / rec["arrays"]) as arrays:
        np.testing.assert_allclose(arrays["features"], expected.numpy(), rtol=1e-5, atol=1e-6)
        assert list(arrays["prompts"]) == [f"a photo of a {k % 10}" for k in range(12)]


def test_rerun_skips_complete_settings(setup):
    first = evaluate_backbone(Net(), settings=SETTINGS, **setup)
    net = Net()
    again = evaluate_backbone(net, settings=SETTINGS, **setup)
    assert net.calls == 0 and again == first
    as_dicts = [{"steps": 2, "cfg": 1.0}, {"steps": 3, "cfg": 5.0, "shift": 1.0}]  # e.g. from a Hydra config
    assert evaluate_backbone(net, settings=as_dicts, **setup) == first and net.calls == 0
    more = evaluate_backbone(net, settings=SETTINGS, **{**setup, "n_samples": 13})  # a different sample count
    assert net.calls > 0 and [r["n_samples"] for r in more] == [13, 13]
    # The 12-sample records stay, kept apart by their settings, with their own arrays.
    stored = read_results(setup["out_dir"])
    assert stored[:2] == first and stored[2:] == more
    assert {r["arrays"] for r in first}.isdisjoint(r["arrays"] for r in more)


def test_records_of_another_checkpoint_step_are_sampled_again(setup):
    """A record of this checkpoint at an earlier step was scored before training went on: not this model's."""
    first = evaluate_backbone(Net(), settings=SETTINGS[:1], **setup)
    net = Net()
    later = evaluate_backbone(net, settings=SETTINGS[:1], **{**setup, "base_record": {
        **setup["base_record"], "checkpoint_step": 200}})
    assert net.calls > 0 and [r["checkpoint_step"] for r in first + later] == [100, 200]


def test_interrupted_evaluation_keeps_finished_settings_and_resumes(setup):
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate_backbone(Net(fail_after=7), settings=SETTINGS, **setup)  # the first setting takes 6 calls
    assert [r["setting"] for r in read_results(setup["out_dir"])] == ["2 steps, cfg 1.0"]
    net = Net()
    records = evaluate_backbone(net, settings=SETTINGS, **setup)
    assert net.calls == 9 and [r["setting"] for r in records] == ["2 steps, cfg 1.0", "3 steps, cfg 5.0"]
    assert not list(setup["out_dir"].glob("**/*.tmp"))


def test_samples_do_not_depend_on_batch_size(setup, tmp_path):
    a = evaluate_backbone(Net(), settings=SETTINGS[1:], **setup)[0]
    b = evaluate_backbone(Net(), settings=SETTINGS[1:], **{**setup, "batch_size": 12, "out_dir": tmp_path / "b"})[0]
    with np.load(setup["out_dir"] / a["arrays"]) as x, np.load(tmp_path / "b" / b["arrays"]) as y:
        np.testing.assert_allclose(x["features"], y["features"], rtol=1e-5, atol=1e-6)
    c = evaluate_backbone(Net(), settings=SETTINGS[1:], **{**setup, "seed": 4, "out_dir": tmp_path / "c"})[0]
    assert c["fid_clip"] != a["fid_clip"]


def test_ema_and_raw_are_separate_records(setup):
    evaluate_backbone(Net(), settings=SETTINGS[:1], **setup)
    evaluate_backbone(Net(), settings=SETTINGS[:1], **{**setup, "ema": False})
    records = read_results(setup["out_dir"])
    assert [r["ema"] for r in records] == [True, False] and records[0]["arrays"] != records[1]["arrays"]


def test_inception_is_optional_and_recorded(setup, tmp_path):
    inc = FakeClip(dim=5)
    images = torch.rand(30, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    inc_ref = reference_features("fake-inception", "toy/eval", images, inc, tmp_path / "cache")
    rec = evaluate_backbone(Net(), settings=SETTINGS[:1], inception=(inc, inc_ref), **setup)[0]
    assert rec["inception_extractor"] == "FakeClip"  # the extractor's id (this one has none: its class)
    named = {**setup["base_record"], "inception_extractor": "inception-v3-2048:abc"}  # as evaluate_run names it
    again = evaluate_backbone(Net(), settings=SETTINGS[:1], inception=(inc, inc_ref), **{**setup, "base_record": named})
    assert again[0]["inception_extractor"] == "inception-v3-2048:abc"
    with np.load(setup["out_dir"] / rec["arrays"]) as arrays:
        assert arrays["inception_features"].shape == (12, 5)
        assert rec["fid_inception"] == pytest.approx(fid_from_features(arrays["inception_features"], inc_ref.features))


def test_the_grid_holds_the_first_samples_with_their_own_prompts(setup, monkeypatch):
    """The grid's samples are the first GRID_SAMPLES across batches, each drawn over its own prompt."""
    from src.evaluation import evaluate

    drawn = {}
    monkeypatch.setattr(evaluate, "GRID_SAMPLES", 7)  # 5 from the first batch, 2 from the second
    monkeypatch.setattr(evaluate, "save_labelled_grid", lambda images, prompts, path: drawn.update(
        images=images, prompts=list(prompts)))
    rec = evaluate_backbone(Net(), settings=SETTINGS[:1], **setup)[0]
    with np.load(setup["out_dir"] / rec["arrays"]) as arrays:
        assert arrays["grid"].shape == (7, 1, 8, 8) and list(arrays["prompts"][:7]) == drawn["prompts"]
    assert drawn["prompts"] == [f"a photo of a {k}" for k in range(7)] and len(drawn["images"]) == 7


def test_evaluate_rejects_bad_input(setup):
    with pytest.raises(ValueError, match="n_samples"):
        evaluate_backbone(Net(), settings=SETTINGS, **{**setup, "n_samples": 1})
    with pytest.raises(ValueError, match="dataset"):
        evaluate_backbone(Net(), settings=SETTINGS, **{**setup, "base_record": {}})
    with pytest.raises(ValueError, match="latent_shape"):
        evaluate_backbone(Net(), settings=SETTINGS, **{**setup, "eval_set": {**_eval_set(), "latent_shape": None}})


def test_evaluate_with_the_real_clip_extractor(tiny_clip_file, tmp_path):
    extractor = ClipFeatureExtractor(TINY_CLIP, tiny_clip_file[0])
    eval_set = {**_eval_set(6), "x0": torch.zeros(6, 3, 16, 16)}  # latent shape taken from x0
    eval_set.pop("latent_shape")
    reference = reference_features(extractor.id, "toy", torch.rand(8, 3, 16, 16) * 2 - 1, extractor, tmp_path)

    def net(x, t, context, pooled):
        return x - 0.3 * pooled[:, :3].reshape(-1, 3, 1, 1)

    rec = evaluate_backbone(net, get_recipe("edm(-1.20, 1.20)"), eval_set, [SamplerSetting(2, 2.5)], extractor, 6, 0,
                            4, lambda x: x, tmp_path / "run", False, {"dataset": "toy"}, reference)[0]
    assert -1 <= rec["clip_score"] <= 1 and rec["fid_clip"] > 0 and rec["checkpoint_step"] is None
    with np.load(tmp_path / "run" / rec["arrays"]) as arrays:
        assert arrays["features"].shape == (6, 32)


def test_select_checkpoint_best_last_and_the_weights_of_ema_or_raw(tmp_path):
    """best: best.ckpt where there is one, else last.ckpt (no validation chose one); last: last.ckpt; EMA or raw."""
    from src.evaluation.run import backbone_weights, select_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 4, "callbacks": {}}, ckpts / "last.ckpt")
    assert select_checkpoint(tmp_path, "best") == select_checkpoint(tmp_path, "last") == ckpts / "last.ckpt"
    torch.save({"global_step": 2}, ckpts / "best.ckpt")
    assert (select_checkpoint(tmp_path, "best"), select_checkpoint(tmp_path, "last")) == (
        ckpts / "best.ckpt", ckpts / "last.ckpt")
    state = {"backbone.w": torch.zeros(1), "ema_backbone.w": torch.ones(1), "other.w": torch.full((1,), 2.0)}
    assert backbone_weights(state, ema=True) == {"w": state["ema_backbone.w"]}
    assert backbone_weights(state, ema=False) == {"w": state["backbone.w"]}


def test_callback_evaluates_on_the_trainers_device_not_the_torn_down_modules():
    """By on_fit_end Lightning's teardown has moved the module to the CPU; evaluation must still use the GPU."""
    from types import SimpleNamespace

    from src.evaluation.callback import EvaluationCallback

    callback = EvaluationCallback.__new__(EvaluationCallback)  # no configuration needed for the dispatch
    seen = {}
    callback.evaluate = lambda loggers, device=None: seen.update(device=device)
    trainer = SimpleNamespace(global_rank=0, loggers=[], strategy=SimpleNamespace(root_device=torch.device("cuda", 3)))
    module = torch.nn.Linear(1, 1)  # on the CPU, as after the teardown
    callback.on_fit_end(trainer, module)
    assert seen["device"] == torch.device("cuda", 3)
    seen.clear()
    callback.on_fit_end(SimpleNamespace(**{**vars(trainer), "global_rank": 1}), module)
    assert seen == {}  # only rank 0 evaluates


def test_force_quick_gelu_without_a_clip_model_is_refused():
    """The tiny CLIP ignored it: its records were named ",quickgelu" for features computed with GELU."""
    from omegaconf import OmegaConf

    from src.config import ConfigError
    from src.evaluation.run import check_eval_files

    ev = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "eval" / "default.yaml")
    check_eval_files(ev)
    ev.clip.force_quick_gelu = True
    with pytest.raises(ConfigError, match=r"eval.clip.force_quick_gelu=true: only with eval.clip.model_name"):
        check_eval_files(ev)


def test_a_configured_clip_takes_quick_gelu_from_the_setting_or_the_weights_sidecar(tmp_path):
    """The sidecar's force_quick_gelu was read by preprocessing's text encoders and ignored by the evaluation: the same
    weights ran with QuickGELU in one and GELU in the other. Now eval.clip.force_quick_gelu=null (the default) takes
    the sidecar's, an explicit true/false comes first, and the extractor's name says which."""
    import json
    import shutil

    from omegaconf import OmegaConf

    from src.config import ConfigError
    from src.evaluation.run import check_eval_files, feature_extractor_name, load_clip_extractor
    from src.text import tiny_clip

    ev = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "eval" / "default.yaml")
    assert ev.clip.force_quick_gelu is None
    weights = tmp_path / "w" / "tiny_clip.pt"
    weights.parent.mkdir()
    shutil.copy(tiny_clip.WEIGHTS_PATH, weights)
    sidecar = json.loads(tiny_clip.WEIGHTS_PATH.with_suffix(".json").read_text())
    ev.clip.model_name, ev.clip.weights_path = tiny_clip.MODEL_NAME, str(weights)
    images = torch.rand(4, 3, 16, 16) * 2 - 1

    def extractor():
        check_eval_files(ev)
        model = load_clip_extractor(ev, torch.device("cpu"))
        return model.force_quick_gelu, model.image_features(images), feature_extractor_name(ev, tmp_path)

    weights.with_suffix(".json").write_text(json.dumps(sidecar))
    gelu, gelu_features, gelu_name = extractor()
    weights.with_suffix(".json").write_text(json.dumps({**sidecar, "force_quick_gelu": True}))
    quick, quick_features, quick_name = extractor()
    assert (gelu, quick) == (False, True) and quick_name == gelu_name + ",quickgelu"
    assert not torch.allclose(gelu_features, quick_features)
    ev.clip.force_quick_gelu = False  # the setting comes first
    assert extractor()[0] is False and extractor()[2] == gelu_name
    ev.clip.force_quick_gelu = "yes"
    with pytest.raises(ConfigError, match=re.escape("eval.clip.force_quick_gelu=yes: allowed values are true, false, "
                                                    "null")):
        check_eval_files(ev)
    ev.clip.force_quick_gelu = None
    weights.with_suffix(".json").write_text(json.dumps({**sidecar, "force_quick_gelu": "false"}))
    with pytest.raises(ConfigError, match=re.escape("its sidecar's force_quick_gelu='false' is not true or false")):
        check_eval_files(ev)
    # As the message says, the setting given instead is taken: the loading did not read the sidecar's value again
    # (after the training, where the check had passed).
    ev.clip.force_quick_gelu = False
    assert extractor()[0] is False and extractor()[2] == gelu_name
    from src.text.encoder import ClipTextEncoder

    assert ClipTextEncoder(tiny_clip.MODEL_NAME, weights, force_quick_gelu=True).fingerprint.endswith(",quickgelu")


def test_a_configured_clip_takes_its_normalisation_from_the_setting_or_the_weights_sidecar(tmp_path):
    """A local weights file bypasses open_clip's per-weight settings: the tiny CLIP configured by its model name took
    the model config's (OpenAI's) mean and std, not the 0.5 its sidecar JSON records, and computed other features
    than the same weights as the default extractor. Now: eval.clip.image_mean/std, else the sidecar's, else the
    model config's; the extractor's name says which, so records of another normalisation are computed again."""
    import shutil

    from omegaconf import OmegaConf

    from src.config import ConfigError
    from src.evaluation.run import check_eval_files, feature_extractor_name, load_clip_extractor
    from src.text import tiny_clip

    ev = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "eval" / "default.yaml")
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    default = load_clip_extractor(ev, torch.device("cpu")).image_features(images)
    ev.clip.model_name, ev.clip.weights_path = tiny_clip.MODEL_NAME, str(tiny_clip.WEIGHTS_PATH)
    check_eval_files(ev)
    named = load_clip_extractor(ev, torch.device("cpu"))
    assert named.mean.flatten().tolist() == [0.5, 0.5, 0.5] and named.std.flatten().tolist() == [0.5, 0.5, 0.5]
    torch.testing.assert_close(named.image_features(images), default)
    name = feature_extractor_name(ev, tmp_path)
    assert name.startswith(f"{tiny_clip.MODEL_NAME}:") and name.endswith(",mean=0.5/0.5/0.5,std=0.5/0.5/0.5")

    bare = tmp_path / "bare" / "tiny_clip.pt"  # the same weights without a sidecar: the model config's (OpenAI's)
    bare.parent.mkdir()
    shutil.copy(tiny_clip.WEIGHTS_PATH, bare)
    ev.clip.weights_path = str(bare)
    assert load_clip_extractor(ev, torch.device("cpu")).mean.flatten()[0].item() == pytest.approx(0.48145466)
    assert feature_extractor_name(ev, tmp_path) == name.split(",")[0]  # as records made before this were named
    ev.clip.image_mean, ev.clip.image_std = [0.5, 0.5, 0.5], [0.25, 0.5, 1.0]  # the setting comes first
    assert load_clip_extractor(ev, torch.device("cpu")).std.flatten().tolist() == [0.25, 0.5, 1.0]
    assert feature_extractor_name(ev, tmp_path).endswith(",mean=0.5/0.5/0.5,std=0.25/0.5/1")

    for key, value, message in (("image_std", [1.0, 0.0, 1.0], "eval.clip.image_std=[1.0, 0.0, 1.0]: must be three "
                                 "finite numbers > 0 (per RGB channel)"),
                                ("image_mean", [0.5], "eval.clip.image_mean=[0.5]: must be three finite numbers")):
        bad = ev.copy()
        bad.clip[key] = value
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_eval_files(bad)
    (bare.with_suffix(".json")).write_text("[1, 2")
    ev.clip.image_mean = ev.clip.image_std = None
    with pytest.raises(ConfigError, match=r"its sidecar .*tiny_clip.json is not a JSON object"):
        check_eval_files(ev)
    ev.clip.model_name = None
    ev.clip.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match=r"eval.clip.image_mean: only with eval.clip.model_name"):
        check_eval_files(ev)
