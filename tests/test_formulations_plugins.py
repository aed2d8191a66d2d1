"""Code defined outside the repository: formulations (`family: module:builder`, docs/formulations.md#adding-a-family),
the checks every formulation must pass, the one-line errors of a broken one, and the documented examples (a
formulation, a backbone: docs/examples/) end to end through the commands."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from src.formulations import RECIPES, from_config, get_recipe
from src.formulations.checks import formulation_errors
from src.formulations.densities import Uniform
from src.formulations.rf import RectifiedFlow
from tests import warm

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


def test_every_paper_recipe_satisfies_the_formulation_checks():
    assert {name: formulation_errors(get_recipe(name)) for name in RECIPES} == {name: [] for name in RECIPES}
    from src.formulations.registry import BUILTIN_NAME  # the names a family from outside may not take

    assert [name for name in RECIPES if not BUILTIN_NAME.fullmatch(name)] == []


class Plugin(RectifiedFlow):
    """A uniform rectified flow under a name and family key of its own; subclasses break one property each."""

    def __init__(self):
        super().__init__(Uniform())

    @property
    def name(self):
        return "rf/plugin"

    @property
    def family(self):
        return "rf_plugin"


class Unweighted(Plugin):
    def w_eps(self, t):  # the loss is ||v_hat - v||^2, whose eps-space weight is 1 / (1 - t)^2
        return torch.ones_like(t)


class WrongTarget(Plugin):
    def target(self, x0, eps, t):
        return x0 - eps


class Unseeded(Plugin):
    def sample_t(self, n, generator=None):
        return torch.rand(n)  # ignores the generator: training would not be reproducible


class OutOfRange(Plugin):
    def sample_t(self, n, generator=None):
        return 2 * torch.rand(n, generator=generator)


class WrongInverse(Plugin):
    def t_from_sigma(self, sigma):
        return sigma


class BadKey(Plugin):
    @property
    def family(self):
        return "rf/plugin"


class Bracketed(Plugin):
    @property
    def name(self):
        return "rf/lognorm(0.00, 1.00) [seed=1]"  # ranked as seed 1 of the paper's recipe


@pytest.mark.parametrize("cls, phrase", [
    (Bracketed, "name is 'rf/lognorm(0.00, 1.00) [seed=1]': ' [' opens the rank report's qualifiers"),
    (Unweighted, "loss is not w_eps(t) * mean (eps_hat - eps)^2"),
    (WrongTarget, "to_x0_eps(target(x0, eps, t)) does not give back x0 and eps"),
    (Unseeded, "sample_t gives other times for the same generator seed"),
    (OutOfRange, "sample_t gives times outside [t_min, t_max] = [0.0, 1.0]"),
    (WrongInverse, "t_from_rf_time or t_from_sigma does not invert it"),
    (BadKey, "family is 'rf/plugin', not a key of letters, digits and '_'"),
])
def test_a_broken_formulation_is_named_by_the_property_it_breaks(cls, phrase):
    assert formulation_errors(Plugin()) == []
    errors = formulation_errors(cls())
    assert len(errors) == 1 and phrase in errors[0]


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A module `plugins` on sys.path with builders of the classes above and a few broken builders."""
    (tmp_path / "plugins.py").write_text(
        "from tests.test_formulations_plugins import Plugin, Unweighted\n"
        "from src.formulations.rf import rf\n"
        "import torch\n"
        "def good(): return Plugin()\n"
        "def unweighted(): return Unweighted()\n"
        "def builtin(): return rf()\n"
        "def not_a_formulation(): return 'rf'\n"
        "class Named(Plugin):\n"
        "    @property\n"
        "    def name(self): return 'rf/cosmap'\n"
        "def named(): return Named()\n"
        "class NamedLikeBuiltin(Plugin):\n"
        "    @property\n"
        "    def name(self): return 'rf/lognorm(0.30, 1.00)'\n"
        "def named_like_builtin(): return NamedLikeBuiltin()\n"
        "class Ends(Plugin):\n"
        "    def sample_t(self, n, generator=None): return torch.zeros(n)\n"
        "def ends(): return Ends()\n"
        "NUMBER = 3\n"
        "def raises(): raise RuntimeError('boom')\n"
        "class Forgets(Plugin):  # built with k, whose params() leave it out\n"
        "    def __init__(self, k): super().__init__()\n"
        "def forgets(k): return Forgets(k)\n"
        "class Float32(Plugin):  # keeps k as a float32 tensor: params() give it back rounded\n"
        "    def __init__(self, k): super().__init__(); self.k = torch.tensor(k, dtype=torch.float32)\n"
        "    def params(self): return {'k': float(self.k)}\n"
        "    @property\n"
        "    def name(self): return f'rf/plugin[v2]({float(self.k):.2f})'\n"
        "def float32(k): return Float32(k)\n"
    )
    (tmp_path / "raising.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_module_digest_names_a_package_by_all_its_code_and_nothing_else(tmp_path, monkeypatch):
    """A run is tied to the code of an outside package: every .py file under it, its subpackages' too, counts
    (an edit anywhere changes the digest); files that are not its code (notes, a folder without __init__.py)
    do not; a module is named by its own file; a name with no source is 'unknown'."""
    from src.utils.plugins import module_digest

    pkg = tmp_path / "digestpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "venv").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("X = 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text("Y = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "digestpkg", raising=False)
    first = module_digest("digestpkg")
    assert first.startswith("digestpkg/:")
    (pkg / "notes.txt").write_text("not code")
    (pkg / "venv" / "lib.py").write_text("Z = 1\n")
    assert module_digest("digestpkg") == first
    (pkg / "sub" / "deep.py").write_text("Y = 2\n")
    assert module_digest("digestpkg") != first
    assert module_digest("digestpkg.core").startswith("core.py:") and len(module_digest("digestpkg.core")) == 8 + 12
    assert module_digest("digestpkg.core.attr") == "unknown"  # a module is no package: nothing under it
    assert module_digest("digestpkg.absent") == "unknown" and module_digest("no_such_top_level_module") == "unknown"


@pytest.mark.parametrize("family, message", [
    ("plugins:unweighted", "formulation rf/plugin (plugins:unweighted) breaks what every formulation must satisfy: "
                           "loss is not w_eps(t)"),
    ("plugins:builtin", "its formulations call their family 'rf', the key of a built-in family"),
    ("plugins:named", "its formulation is named 'rf/cosmap', a name the built-in families give"),
    ("plugins:named_like_builtin", "named 'rf/lognorm(0.30, 1.00)', a name the built-in families give"),
    ("plugins:ends", "sample_t gives only the ends t_min, t_max = 0.0, 1.0 in 64 draws"),
    ("plugins:not_a_formulation", "the builder returned a str, not a Formulation"),
    ("plugins:missing", "family 'plugins:missing': plugins has no missing"),
    ("plugins:NUMBER", "NUMBER is a int, not a builder"),
    ("nowhere:builder", "cannot import nowhere (ModuleNotFoundError: No module named 'nowhere'); the module must be "
                        "importable where the job runs"),
    ("raising:builder", "cannot import raising (RuntimeError: broken on import)"),
    ("plugins:raises", "family 'plugins:raises': the builder raised RuntimeError: boom"),
    ("not a path", "unknown formulation family 'not a path'; valid families: rf, rf_lognorm"),
])
def test_an_imported_family_that_cannot_be_used_is_refused_in_one_line(plugins, family, message):
    assert from_config({"family": "plugins:good"}).name == "rf/plugin"
    with pytest.raises(ValueError) as e:
        from_config({"family": family})
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"family 'plugins:good' takes parameters \(\); got \(k\)"):
        from_config({"family": "plugins:good", "k": 1.0})


def test_an_imported_family_whose_params_leave_out_a_parameter_is_refused(plugins, monkeypatch):
    """A builder of (k) whose formulation's params() forget k: loss.k=1,2 gave both jobs one run directory (the sweep
    refused the second, blaming run_name) and, across sweeps, one name in the rank report."""
    with pytest.raises(ValueError) as e:
        from_config({"family": "plugins:forgets", "k": 1.0})
    assert str(e.value) == ("family 'plugins:forgets': its formulation's params() gives {}, not the parameters it was "
                            "built with, {'k': 1.0}; formulations built with other values would share its run "
                            "directory and its name in the rank report")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert from_config({"family": "rf_power:rf_power", "k": 3}).slug == "rf_power_3.00"  # 3 == 3.0: the same
    # 0.6000000238418579 for 0.6 (float32): the same formulation; a bracket without the space is no qualifier
    assert from_config({"family": "plugins:float32", "k": 0.6}).name == "rf/plugin[v2](0.60)"


class TwoArgs(torch.nn.Module):
    def __init__(self, **shared_keys):  # the keys every backbone configuration has
        super().__init__()

    def forward(self, x, t):
        return x


class Pooled(TwoArgs):
    def forward(self, x, t, context, pooled):
        return x.mean((1, 2, 3), keepdim=True)  # broadcasts against x in the loss and the sampler


@pytest.mark.parametrize("target, message", [
    ("TwoArgs", "model: TwoArgs.forward cannot be called as backbone(x, t, context, pooled) (too many positional"),
    ("Pooled", "model: Pooled returns (1, 1, 1, 1) for x of shape (1, 1, 16, 16); a backbone must return a tensor "
               "shaped like x"),
])
def test_a_backbone_of_ones_own_with_another_call_is_refused_before_training(target, message):
    """docs/backbone.md: backbone(x, t, context, pooled) -> a tensor shaped like x. Another signature failed at the
    first training step, after the run directory existed; another output shape trained and was ranked."""
    from hydra import compose, initialize_config_module

    from src.config import ConfigError, register_resolvers
    from src.training.prepare import check_model, embedded_shapes

    register_resolvers()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model._target_=tests.test_formulations_plugins.{target}"])
    with pytest.raises(ConfigError) as e:
        check_model(cfg, embedded_shapes("digits", 16))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_documented_example_family_trains_evaluates_plans_and_ranks(tmp_path, monkeypatch, capsys):
    """docs/examples: rf/power(k) from its own module and configuration folder, swept next to a built-in recipe with
    the command the example documents; the plan takes the same --config-dir."""
    from src import plan

    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert plan.main(["-m", "loss=rf_power,rf_lognorm", "loss.k=3", "--config-dir", str(EXAMPLES / "conf"),
                      f"paths.root_dir={tmp_path}", "--mfu", "0.3"]) == 2  # loss.k is not rf_lognorm's
    assert "loss.k: no such setting" in capsys.readouterr().err
    assert plan.main(["-m", "loss=rf_power,rf_lognorm", "--config-dir", str(EXAMPLES / "conf"),
                      f"paths.root_dir={tmp_path}", "--mfu", "0.3"]) == 0
    assert "outputs/multirun/default/digits/rf_power_2.00" in capsys.readouterr().out
    assert plan.main(["-m", "loss=rf_power", "loss.k=1.5,3", "--config-dir", str(EXAMPLES / "conf"),
                      f"paths.root_dir={tmp_path}", "--mfu", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "digits/rf_power_1.50" in out and "digits/rf_power_3.00" in out and "2 jobs" in out
    with pytest.raises(SystemExit):
        plan.main(["loss=rf_power", "--config-dir", str(tmp_path / "absent")])
    assert f"--config-dir {tmp_path / 'absent'}: no such folder" in capsys.readouterr().err

    # With the example sampler too (docs/examples/ab2.py): each model trained once, evaluated by both samplers.
    args = ["--config-dir", "docs/examples/conf", "-m", "loss=rf_power,rf_lognorm", "sampler=rf_time,ab2",
            f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache", "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
            "data.batch_size=16", "data.val_samples=16", "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2",
            "eval.n_samples=4", "eval.batch_size=4", "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]",
            "logger=csv", "torch_threads=1"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)])}
    out = warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                   timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "outputs/multirun/default"
    for sampler, name in (("rf_time", "rf_time"), ("ab2", "ab2:AB2")):
        records = json.loads((sweep / f"digits/rf_power_2.00/sampler={sampler}/results.json").read_text())
        assert {(r["recipe"], r["family"], r["params"]["k"], r["sampler"]) for r in records} == {
            ("rf/power(2.00)", "rf_power", 2.0, name)}
    assert (sweep / "digits/rf_power_2.00/sampler=ab2/reused_training.json").is_file()
    from src.ranking.report import build_report

    report = build_report([sweep], draws=0)
    assert sorted(report.table.index) == [f"{r} [sampler={s}]" for r in ("rf/lognorm(0.00, 1.00)", "rf/power(2.00)")
                                          for s in ("ab2", "rf_time")]
    from src import evaluate  # the documented re-evaluation of a trained run with a sampler from outside

    # Not into the sweep's directory of another sampler: its records would be ranked as rf_time's.
    run = sweep / "digits/rf_lognorm_0.00_1.00/sampler=rf_time"
    before = (run / "results.json").read_text()
    capsys.readouterr()
    assert evaluate.main([str(run), "sampler.name=ab2:AB2"]) == 2
    assert "is its sweep's directory of sampler=rf_time" in capsys.readouterr().err
    assert (run / "results.json").read_text() == before
    code = {r["sampler"]: r["sampler_code"] for r in json.loads(before)}
    code.update((r["sampler"], r["sampler_code"]) for r in json.loads(
        (sweep / "digits/rf_power_2.00/sampler=ab2/results.json").read_text()))
    assert code["rf_time"] is None and code["ab2:AB2"].startswith("ab2.py:")

    # The sampler's code edited: its records are no longer current; the run's evaluation is redone, and replaced.
    from src.ranking.aggregate import load_run
    from src.sampling.registry import _imported_sampler

    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "ab2.py").write_text((EXAMPLES / "ab2.py").read_text() + "# edited\n")
    monkeypatch.syspath_prepend(str(edited))
    monkeypatch.delitem(sys.modules, "ab2", raising=False)
    _imported_sampler.cache_clear()
    sampler_run = sweep / "digits/rf_power_2.00/sampler=ab2"
    status, _ = load_run(sampler_run)
    assert status["status"] == "partial" and "the sampler's code=ab2.py:" in status["error"]
    assert evaluate.main([str(sampler_run)]) == 0
    [record] = json.loads((sampler_run / "results.json").read_text())
    assert record["sampler_code"] != code["ab2:AB2"] and load_run(sampler_run)[0]["status"] == "done"
    _imported_sampler.cache_clear()


def test_the_example_backbone_refuses_a_width_its_group_norm_cannot_split(monkeypatch):
    """model=convnet model.hidden_size=30: a one-line ConfigError before the run, not a RuntimeError from GroupNorm
    at the first training step."""
    from hydra import compose, initialize_config_module

    from src.config import ConfigError, register_resolvers
    from src.training.prepare import check_model, embedded_shapes

    monkeypatch.syspath_prepend(str(EXAMPLES))
    register_resolvers()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model._target_=convnet.ConvNet", "model.hidden_size=30"])
    with pytest.raises(ConfigError, match=r"^model: hidden_size=30 is not allowed; allowed: a multiple of 8"):
        check_model(cfg, embedded_shapes("digits", 16))


def test_the_documented_example_backbone_plans_trains_and_evaluates(tmp_path, monkeypatch, capsys):
    """docs/examples/convnet.py through conf/model/convnet.yaml: the command its docstring gives, with the example
    formulation and the example sampler (docs/examples/ab2.py); the plan counts its FLOPs on the meta device."""
    from src import plan

    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert plan.main(["model=convnet", "loss=rf_power", "sampler=ab2", "--config-dir", str(EXAMPLES / "conf"),
                      f"paths.root_dir={tmp_path}", "--mfu", "0.3"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "rf_power_2.00" in line)
    assert row.split()[2] == "ConvNet"
    args = ["--config-dir", "docs/examples/conf", "model=convnet", "loss=rf_power", "sampler=ab2",
            f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache", "model.depth=1", "data.batch_size=16", "data.val_samples=16",
            "train.max_steps=2", "train.val_every=2", "train.ckpt_every=2", "eval.n_samples=4", "eval.batch_size=4",
            "eval.settings=[{steps: 2, cfg: 1.0}]", "eval.ema=[true]", "logger=csv", "torch_threads=1"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)])}
    out = warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                   timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    [record] = json.loads((tmp_path / "outputs/runs/digits/rf_power_2.00/results.json").read_text())
    assert (record["backbone"], record["recipe"], record["sampler"]) == ("ConvNet", "rf/power(2.00)", "ab2:AB2")
    assert record["fid_clip"] > 0
    from src.ranking.report import build_report

    assert list(build_report([tmp_path / "outputs/runs"], draws=0).table.index) == [
        "rf/power(2.00) [ConvNet, sampler=ab2:AB2]"]  # the sampler by its recorded name, the import path
    # The documented re-evaluation of a single run with a sampler of a folder of your own (--config-dir).
    from src import evaluate

    run = tmp_path / "outputs/runs/digits/rf_power_2.00"
    assert evaluate.main([str(run), "--config-dir", str(EXAMPLES / "conf"), "sampler=ab2", "eval.n_samples=6"]) == 0
    assert sorted((r["sampler"], r["n_samples"]) for r in json.loads((run / "results.json").read_text())) == [
        ("ab2:AB2", 4), ("ab2:AB2", 6)]


# ---- code from outside is part of what a run directory is tied to ----------------------------------------------
def _outside(tmp_path, monkeypatch):
    """A copy of the example formulation and backbone modules in tmp_path, importable there."""
    for name in ("rf_power", "convnet"):
        (tmp_path / f"{name}.py").write_text((EXAMPLES / f"{name}.py").read_text())
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported from docs/examples by an earlier test
    monkeypatch.syspath_prepend(str(tmp_path))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "loss.family=rf_power:rf_power", "+loss.k=2.0", "~loss.m", "~loss.s", "model._target_=convnet.ConvNet"])


def test_editing_code_from_outside_ties_the_run_directory_to_the_code_it_trained(tmp_path, monkeypatch):
    """The fingerprint holds the content of the formulation's and the backbone's modules: an edit after training is
    refused like a changed setting, in one line naming what was edited, and the directory keeps its files."""
    from src.config import ConfigError, fingerprint
    from src.training.prepare import bind_fingerprint, check_fingerprint

    cfg = _outside(tmp_path, monkeypatch)
    code = fingerprint(cfg)["code"]
    assert set(code) == {"loss.family", "model._target_"} and code["loss.family"].startswith("rf_power.py:")
    assert "code" not in fingerprint(_builtin_cfg())  # built-in code only: fingerprints as before
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    bind_fingerprint(cfg, run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"trained")  # bound: something was trained here
    check_fingerprint(cfg, run)  # the same code: resumes
    stored = (run / "fingerprint.json").read_text()
    with open(tmp_path / "rf_power.py", "a") as f:
        f.write("# an edit\n")
    with pytest.raises(ConfigError) as e:
        check_fingerprint(cfg, run)
    assert "(code.loss.family; the code its loss.family names has been edited since)" in str(e.value)
    assert "\n" not in str(e.value) and (run / "fingerprint.json").read_text() == stored
    # A run trained before the code was recorded: its code is unknown, so it is not compared.
    legacy = json.loads(stored)
    del legacy["code"]
    (run / "fingerprint.json").write_text(json.dumps(legacy))
    check_fingerprint(cfg, run)


def test_another_backbone_in_a_trained_directory_is_not_said_to_be_edited_code(tmp_path, monkeypatch):
    """model._target_=othernet.ConvNet into a directory trained with convnet.ConvNet: a changed setting, not "the code
    its model._target_ names has been edited since" (neither file was edited)."""
    from src.config import ConfigError
    from src.training.prepare import bind_fingerprint, check_fingerprint

    cfg = _outside(tmp_path, monkeypatch)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    bind_fingerprint(cfg, run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"trained")
    (tmp_path / "othernet.py").write_text((EXAMPLES / "convnet.py").read_text() + "# another file\n")
    cfg.model._target_ = "othernet.ConvNet"
    with pytest.raises(ConfigError) as e:
        check_fingerprint(cfg, run)
    assert "different configuration (code.model._target_, model._target_); use another" in str(e.value)


def _builtin_cfg():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config")


@pytest.mark.slow
def test_a_relaunch_after_editing_the_formulations_module_is_refused_and_changes_nothing(tmp_path):
    """Through the command: train with a copy of the example formulation, edit it, relaunch: exit 1 naming the
    edited code, every file of the finished run as it was; with the code restored the relaunch skips the done run."""
    from tests.test_reliability import TINY, tree_digest

    source = (EXAMPLES / "rf_power.py").read_text()
    (tmp_path / "rf_power.py").write_text(source)
    args = ["--config-dir", str(EXAMPLES / "conf"), "-m", "loss=rf_power", f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache", *TINY]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}

    def run():
        return warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=600)

    assert (first := run()).returncode == 0, first.stderr[-3000:]
    done = tmp_path / "outputs/multirun/default/digits/rf_power_2.00"
    before = tree_digest(done)
    (tmp_path / "rf_power.py").write_text(source.replace("u ** (1.0 / self.k)", "u ** (0.5 / self.k)"))
    refused = run()
    assert refused.returncode == 1
    assert "the code its loss.family names has been edited since" in refused.stderr, refused.stderr[-3000:]
    assert tree_digest(done) == before
    (tmp_path / "rf_power.py").write_text(source)
    again = run()
    assert again.returncode == 0 and "complete" in again.stdout + again.stderr, again.stderr[-3000:]


def test_re_evaluating_a_run_after_editing_its_formulations_module_is_refused(tmp_path, monkeypatch, capsys):
    """src.evaluate takes the run's own settings, but the code from outside it names can be edited after the
    training: sampling the trained model with the edited formulation would be another model's evaluation."""
    from omegaconf import OmegaConf

    from src import evaluate
    from src.training.prepare import bind_fingerprint

    cfg = _outside(tmp_path, monkeypatch)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    bind_fingerprint(cfg, run)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"trained")
    with open(tmp_path / "rf_power.py", "a") as f:
        f.write("# an edit\n")
    before = sorted(p.name for p in run.rglob("*"))
    assert evaluate.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "was trained with other code: the file its loss.family names has been edited since (rf_power.py:" in err
    assert err.count("\n") == 1 and sorted(p.name for p in run.rglob("*")) == before
