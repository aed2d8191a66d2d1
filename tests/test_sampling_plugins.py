"""Samplers defined outside the repository (`sampler.name: module:NAME`, docs/sampling.md#adding-a-sampler): the checks
every sampler must pass, the one-line errors of a broken one, and the documented example (docs/examples/ab2.py).
The example through the commands is in test_formulations_plugins.py (with the example formulation and backbone)."""

import re
import sys

import pytest
import torch

from src.formulations import get_recipe
from src.sampling import GRIDS, SAMPLERS, Sampler, euler, get_sampler, sample, sampler_nfe
from src.sampling.checks import sampler_errors
from src.sampling.denoiser import next_process
from tests.test_evaluation import setup  # noqa: F401 -- the fixture
from tests.test_sampling import _gaussian, exact_flow, gaussian_denoiser

EXAMPLE = "ab2:AB2"


def test_every_built_in_sampler_satisfies_the_sampler_checks():
    assert {name: sampler_errors(s) for name, s in SAMPLERS.items()} == {name: [] for name in SAMPLERS}


def flipped(denoiser, z):
    """Euler in RF-equivalent coordinates with the velocity's sign flipped (x0_hat - eps_hat)."""
    f, t = denoiser.formulation, denoiser.t
    p, q, r, s = denoiser.coefficients
    a, b = f.a(t).double(), f.b(t).double()
    a_next, b_next = next_process(f, t)
    c, c_next = (a + b).tolist(), (a_next + b_next).tolist()
    h = (b_next / (a_next + b_next) - b / (a + b)).tolist()
    for i in range(len(t)):
        out = denoiser.output(z, i)
        v = (p[i] - r[i]).item() * z + (q[i] - s[i]).item() * out
        z = c_next[i] * (z / c[i] + h[i] * v)
    return z


def stops_early(denoiser, z):
    """Euler without its last step: returns the noisy z at the last grid time, not x0_hat."""
    return euler(_Truncated(denoiser), z)


class _Truncated:
    def __init__(self, denoiser):
        self.__dict__.update(denoiser.__dict__)
        self._denoiser = denoiser
        self.t = denoiser.t[:1]
        self.coefficients = tuple(c[:1] for c in denoiser.coefficients)

    def output(self, z, i):
        return self._denoiser.output(z, i)


def double_call(denoiser, z):
    for i in range(len(denoiser.t)):
        denoiser.output(z, i)
    return euler(denoiser, z)


def raising(denoiser, z):
    raise RuntimeError("not implemented yet")


def float64_only(denoiser, z):
    """Passes every check run in float64; the evaluation samples in float32."""
    if z.dtype != torch.float64:
        raise TypeError(f"expected float64, got {z.dtype}")
    return euler(denoiser, z)


def promoting(denoiser, z):
    """Euler with (1,)-shaped float64 coefficients: float32 noise comes back float64."""
    f, t = denoiser.formulation, denoiser.t
    p, q, r, s = denoiser.coefficients
    a_next, b_next = next_process(f, t)
    for i in range(len(t)):
        out = denoiser.output(z, i)
        x0, eps = p[i:i + 1] * z + q[i:i + 1] * out, r[i:i + 1] * z + s[i:i + 1] * out
        z = a_next[i:i + 1] * x0 + b_next[i:i + 1] * eps
    return z


def increasing(f, steps, shift):
    return torch.linspace(f.t_min, f.t_max, steps, dtype=torch.float64)


BROKEN = {
    "flipped": (Sampler(flipped, GRIDS["rf_time"], lambda steps: steps),
                "with the exact denoiser of Gaussian data it does not sample that Gaussian for rf at 256 steps"),
    "stops_early": (Sampler(stops_early, GRIDS["rf_time"], lambda steps: 1),
                    "does not sample that Gaussian for rf"),
    "miscounted": (Sampler(double_call, GRIDS["rf_time"], lambda steps: steps),
                   "its solver evaluates the network 2 times for rf at 1 steps, but nfe(1) = 1"),
    "raising": (Sampler(raising, GRIDS["rf_time"], lambda steps: steps), "it raises RuntimeError: not implemented yet"),
    "increasing": (Sampler(euler, increasing, lambda steps: steps), "its grid for rf at 2 steps is not decreasing"),
    "no_nfe": (Sampler(euler, GRIDS["rf_time"], lambda steps: 0), "nfe(1) is 0, not a number of network evaluations"),
    "float64_only": (Sampler(float64_only, GRIDS["rf_time"], lambda steps: steps),
                     "it raises TypeError: expected float64, got torch.float32"),
    "promoting": (Sampler(promoting, GRIDS["rf_time"], lambda steps: steps),
                  "its solver returns torch.float64 samples for torch.float32 noise"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_sampler_is_named_by_the_property_it_breaks(name):
    broken, phrase = BROKEN[name]
    errors = sampler_errors(broken)
    assert len(errors) == 1 and phrase in errors[0], errors


@pytest.fixture
def sampler_plugins(tmp_path, monkeypatch):
    """A module `sampler_plugins` on sys.path holding a good sampler and the broken ones above."""
    (tmp_path / "sampler_plugins.py").write_text(
        "from src.sampling import SAMPLERS\n"
        "from tests.test_sampling_plugins import BROKEN\n"
        "GOOD = SAMPLERS['heun']\n"
        "FLIPPED = BROKEN['flipped'][0]\n"
        "TEXT = 'rf_time'\n"
        "from src.sampling import GRIDS, Sampler, heun\n"
        "ODD = Sampler(heun, GRIDS['rf_time'], lambda steps: 2 * steps - 1 if steps <= 5 else 2 * steps)\n"
        "NOSHIFT = Sampler(heun, lambda f, steps, shift: GRIDS['rf_time'](f, steps, 1.0),\n"
        "                  lambda steps: 2 * steps - 1)\n"
    )
    (tmp_path / "sampler_raising.py").write_text("raise RuntimeError('broken on import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("name, message", [
    ("sampler_plugins:FLIPPED", "sampler 'sampler_plugins:FLIPPED' breaks what every sampler must satisfy: with the "
                                "exact denoiser of Gaussian data it does not sample that Gaussian"),
    ("sampler_plugins:TEXT", "it is a str, not a src.sampling.Sampler(solver, grid, nfe) of three functions"),
    ("sampler_plugins:MISSING", "sampler 'sampler_plugins:MISSING': sampler_plugins has no MISSING"),
    ("nowhere:SAMPLER", "cannot import nowhere (ModuleNotFoundError: No module named 'nowhere'); the module must be "
                        "importable where the job runs"),
    ("sampler_raising:S", "cannot import sampler_raising (RuntimeError: broken on import)"),
    ("not a path", "sampler='not a path' is not allowed; choose one of rf_time, native, heun, or "
                   "'package.module:NAME'"),
])
def test_an_imported_sampler_that_cannot_be_used_is_refused_in_one_line(sampler_plugins, name, message):
    assert get_sampler("sampler_plugins:GOOD") == SAMPLERS["heun"]
    assert sampler_nfe("sampler_plugins:GOOD", 5) == 9
    with pytest.raises(ValueError) as e:
        get_sampler(name)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_example_sampler_is_second_order_at_one_evaluation_per_step(monkeypatch):
    """docs/examples/ab2.py: against the exact probability-flow map of Gaussian data, halving the step divides its
    error by about 4 (Euler's by 2), and at 10 steps it is as accurate as Heun's 19 evaluations."""
    from tests.test_formulations_plugins import EXAMPLES

    monkeypatch.syspath_prepend(str(EXAMPLES))
    mu, cov = _gaussian()
    noise = torch.randn(500, 3, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    context, pooled = torch.zeros(500, 2, 4, dtype=torch.float64), torch.zeros(500, 4, dtype=torch.float64)
    for recipe in ("rf", "eps/linear", "edm(-1.20, 1.20)"):
        f = get_recipe(recipe)
        exact = exact_flow(f, mu, cov, noise)

        def error(name, steps):
            out = sample(gaussian_denoiser(f, mu, cov), f, noise, context, pooled, steps, 1.0, sampler=name)
            return float(((out.reshape(500, 3) - exact) ** 2).mean().sqrt())

        assert 3.3 < error(EXAMPLE, 10) / error(EXAMPLE, 20) < 5.0
        assert 1.8 < error("rf_time", 10) / error("rf_time", 20) < 2.2
        assert error(EXAMPLE, 10) < 1.1 * error("heun", 10)
    assert sampler_nfe(EXAMPLE, 10) == 10 and sampler_nfe("heun", 10) == 19


def test_a_sampler_miscounting_its_evaluations_at_the_evaluations_steps_is_refused_by_the_plan_and_the_job(
        sampler_plugins, tmp_path, capsys):
    """The lookup checks nfe at 1, 2 and 5 steps; at the steps the evaluation asks for (50) a sampler may count
    otherwise, and the plan would count FLOPs of evaluations that never run: refused before anything runs."""
    from src import plan
    from src.config import ConfigError
    from src.sampling.registry import check_steps
    from src.training.prepare import check_config
    from tests.test_formulations_plugins import _builtin_cfg

    assert get_sampler("sampler_plugins:ODD").nfe(5) == 9  # passes the lookup's checks
    check_steps("sampler_plugins:GOOD", (5, 50))
    message = "its solver evaluates the network 99 times at 50 steps, but nfe(50) = 100"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_steps("sampler_plugins:ODD", (5, 50))
    args = ["sampler.name=sampler_plugins:ODD", "eval.settings=[{steps: 50, cfg: 1.0}]", f"paths.root_dir={tmp_path}"]
    assert plan.main(args) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    cfg = _builtin_cfg()
    cfg.sampler.name, cfg.eval.settings = "sampler_plugins:ODD", [{"steps": 50, "cfg": 1.0}]
    with pytest.raises(ConfigError, match=f"sampler.name=sampler_plugins:ODD: .*{re.escape(message)}"):
        check_config(cfg)


def test_the_code_of_a_sampler_in_a_package_is_the_packages_and_naming_it_runs_none_of_it(tmp_path, monkeypatch):
    """`mypkg:S` whose __init__.py imports S from mypkg/impl.py: an edit of impl.py is an edit of the sampler (its
    records must be evaluated again), and naming the code (the rank report does) runs neither file."""
    from src.sampling.registry import sampler_code

    package = tmp_path / "mysamplers"
    package.mkdir()
    (package / "__init__.py").write_text("open(__file__ + '.ran', 'w').close()\nfrom .impl import S\n")
    (package / "impl.py").write_text("from src.sampling import SAMPLERS\nS = SAMPLERS['heun']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = sampler_code("mysamplers:S")
    assert before.startswith("mysamplers/:") and sampler_code("mysamplers.impl:S").startswith("impl.py:")
    with open(package / "impl.py", "a") as f:
        f.write("# an edit\n")
    assert sampler_code("mysamplers:S") != before
    assert not (package / "__init__.py.ran").exists()  # found, not imported
    # Its subpackages count; other folders under it (a virtual environment, say) are not its code.
    for folder, text in ((".venv/lib", "x = 1\n"), ("sub", "")):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text(text)
    after = sampler_code("mysamplers:S")
    (package / ".venv/lib/__init__.py").write_text("x = 2\n")
    assert sampler_code("mysamplers:S") == after
    (package / "sub/__init__.py").write_text("y = 2\n")
    assert sampler_code("mysamplers:S") != after
    assert sampler_code("mysamplers.nowhere:S") == sampler_code("nowhere.at_all:S") == "unknown"


def test_records_name_the_sampler_code_the_job_imported_not_the_file_edited_during_its_training(tmp_path,
                                                                                                 monkeypatch):
    """A job imports its sampler before the training and writes its records after it: a file edited meanwhile is
    not the code that sampled, so the records must not carry the edited file's digest (they would pass as current)."""
    from src.sampling.registry import sampler_code

    (tmp_path / "sampler_during.py").write_text("from src.sampling import SAMPLERS\nS = SAMPLERS['heun']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    get_sampler("sampler_during:S")  # the job's configuration check, before its training
    imported = sampler_code("sampler_during:S")
    with open(tmp_path / "sampler_during.py", "a") as f:
        f.write("# edited while the job trains\n")
    assert sampler_code("sampler_during:S") == imported  # the code this process samples with
    monkeypatch.delitem(sys.modules, "sampler_during")  # another process (the rank report) reads the file
    assert sampler_code("sampler_during:S") != imported


def test_a_sampler_whose_grid_ignores_the_shift_is_refused_when_the_evaluation_shifts(sampler_plugins):
    """eval.shift=3 is recorded in every record's setting ("5 steps, cfg 1.0, shift 3.0"); a grid that ignores its
    shift argument would sample unshifted under that label. Unshifted evaluations may use it."""
    from src.config import ConfigError
    from src.sampling.registry import check_steps
    from src.training.prepare import check_config
    from tests.test_formulations_plugins import _builtin_cfg

    check_steps("sampler_plugins:NOSHIFT", (5, 50), 1.0)
    check_steps("sampler_plugins:GOOD", (5, 50), 3.0)
    cfg = _builtin_cfg()
    cfg.sampler.name, cfg.eval.shift = "sampler_plugins:NOSHIFT", 3.0
    with pytest.raises(ConfigError, match=re.escape("its grid at 5 steps is the same with shift 3.0 as without")):
        check_config(cfg)


ANCESTRAL = '''
import torch
from src.sampling import GRIDS, Sampler
from src.sampling.denoiser import next_process


def ancestral(denoiser, z):
    """Euler steps with half of the next noise level drawn afresh (from torch's global generator)."""
    f, t = denoiser.formulation, denoiser.t
    p, q, r, s = denoiser.coefficients
    a_next, b_next = next_process(f, t)
    for i in range(len(t)):
        out = denoiser.output(z, i)
        x0, eps = p[i].item() * z + q[i].item() * out, r[i].item() * z + s[i].item() * out
        b = b_next[i].item()
        fresh = 0.5 * b
        z = a_next[i].item() * x0 + (b * b - fresh * fresh) ** 0.5 * eps + fresh * torch.randn_like(z)
    return z


S = Sampler(ancestral, GRIDS["rf_time"], lambda steps: steps)
'''


def test_a_stochastic_sampler_from_outside_draws_the_same_in_every_evaluation(setup, tmp_path, monkeypatch):
    """It passes the checks (a distribution check); its draws in the evaluation are seeded per batch as the initial
    noise is, so its records do not depend on what the process drew before (training, another setting, a resume)."""
    from src.evaluation.evaluate import evaluate_backbone
    from tests.test_evaluation import SETTINGS, Net

    (tmp_path / "sampler_ancestral.py").write_text(ANCESTRAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = {**setup["base_record"], "sampler": "sampler_ancestral:S"}
    scores = []
    for state in (1, 2):
        net = Net()  # (which seeds torch's generator)
        torch.manual_seed(state)
        records = evaluate_backbone(net, settings=SETTINGS, **{**setup, "base_record": base,
                                                               "out_dir": tmp_path / f"run{state}"})
        scores.append([(r["clip_score"], r["fid_clip"]) for r in records])
    assert scores[0] == scores[1]


def test_a_stochastic_samplers_draws_are_not_the_initial_noise():
    """Its draws come from a stream of their own: seeded as the batch's initial noise is, its first fresh noise
    would be the first prompt's initial noise again (an ancestral step would add the noise it started from)."""
    from src.evaluation.evaluate import _sampler_draws
    from src.sampling import initial_noise

    noise = initial_noise(4, (1, 4, 4), seed=1234, start=8)
    with _sampler_draws(torch.device("cpu"), 1234, 8):
        fresh = torch.randn(noise.shape)
    assert not any(torch.equal(fresh[i], noise[j]) for i in range(4) for j in range(4))


def test_a_stochastic_samplers_draws_leave_the_callers_generator_as_it_was():
    """Inside _sampler_draws torch's global generator is seeded per (seed, batch start), whatever it held before;
    on the way out it is restored, so what the caller draws next (training, the next setting) is not shifted."""
    from src.evaluation.evaluate import _sampler_draws

    draws = []
    for outer in (1, 2):
        torch.manual_seed(outer)
        before = torch.get_rng_state()
        expected_next = torch.randn(5)
        torch.set_rng_state(before)
        with _sampler_draws(torch.device("cpu"), 1234, 8):
            draws.append(torch.randn(6))
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.equal(torch.randn(5), expected_next)
    assert torch.equal(draws[0], draws[1])


def test_each_evaluation_batch_seeds_a_stochastic_samplers_draws_by_its_first_prompt_index(monkeypatch):
    """Batch [start, stop) draws from torch's generator seeded by (eval seed, start) on the sampler's own stream, as
    its initial noise is seeded by prompt index: batches get different fresh noise, the same at any earlier state."""
    from src.evaluation import evaluate as evaluation
    from src.evaluation.evaluate import SAMPLER_STREAM, EvalPrompts, SamplerSetting
    from src.sampling.noise import _index_seed
    from tests.test_evaluation import FakeClip, _eval_set

    drawn = []

    def fake_sample(backbone, formulation, noise, *args, **kwargs):
        drawn.append(torch.randn(3))  # what a stochastic sampler's first fresh draw would be
        return noise

    monkeypatch.setattr(evaluation, "sample", fake_sample)
    evaluation._generate(None, None, EvalPrompts.from_any(_eval_set()), SamplerSetting(2, 1.0), FakeClip(), None,
                         n=12, seed=3, batch_size=5, decode=lambda x: x, device=torch.device("cpu"))
    expected = [torch.randn(3, generator=torch.Generator().manual_seed(_index_seed(3, start, stream=SAMPLER_STREAM)))
                for start in (0, 5, 10)]
    assert len(drawn) == 3 and all(torch.equal(d, e) for d, e in zip(drawn, expected))
