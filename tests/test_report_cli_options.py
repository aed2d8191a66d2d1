"""The rank report's documented options through its command line (main(argv), as `python -m src.ranking.report`)."""
import contextlib
import io

import pandas as pd
import pytest

from src.ranking.report import main
from src.ranking.synthetic import write_synthetic_sweep
from src.ranking.tables import parse_markdown_table

SMALL = dict(datasets=("digits",), n_samples=8, n_reference=12, dim=2,
             sampler_settings=[(5, 5.0), (50, 1.0), (50, 2.5), (50, 5.0)])


def report(args, out):
    """Run the CLI; the report's Markdown table (rows) and its text."""
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*map(str, args), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    return parse_markdown_table(text), text


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return write_synthetic_sweep(tmp_path_factory.mktemp("multirun") / "s", recipes=("rf", "eps/linear", "v/cos"),
                                 **SMALL)


def test_fifty_step_cfg_chooses_the_fifty_step_column(sweep, tmp_path):
    rows, text = report([sweep, "--bootstrap", "0", "--fifty-step-cfg", "2.5"], tmp_path / "a")
    assert "50 steps (n=2)" in rows[0] and "50 steps column: the 50-step settings at CFG 2.5, chosen with" in text
    rows, text = report([sweep, "--bootstrap", "0", "--fifty-step-cfg", "all"], tmp_path / "b")
    assert "50 steps (n=6)" in rows[0] and "CFG 1.0, 2.5, 5.0, all 50-step settings (--fifty-step-cfg all)" in text


def test_confidence_and_separation_reach_the_report(sweep, tmp_path):
    _, default = report([sweep, "--bootstrap", "20"], tmp_path / "a")
    assert "90% percentile interval over 20 bootstrap draws" in default and "at least 95% of the draws" in default
    _, text = report([sweep, "--bootstrap", "20", "--confidence", "0.5", "--separation", "0.6"], tmp_path / "b")
    assert "50% percentile interval over 20 bootstrap draws" in text and "at least 60% of the draws" in text
    wide = pd.read_csv(tmp_path / "a" / "ranks.csv", index_col=0)
    narrow = pd.read_csv(tmp_path / "b" / "ranks.csv", index_col=0)
    lo, hi = [c for c in wide.columns if c.startswith("all") and c.endswith("lo")], \
        [c for c in wide.columns if c.startswith("all") and c.endswith("hi")]
    assert lo and hi
    assert (narrow[lo[0]] >= wide[lo[0]]).all() and (narrow[hi[0]] <= wide[hi[0]]).all()  # nested intervals


def test_device_cpu_gives_the_default_report_here(sweep, tmp_path):
    report([sweep, "--bootstrap", "10"], tmp_path / "auto")
    report([sweep, "--bootstrap", "10", "--device", "cpu"], tmp_path / "cpu")
    auto = pd.read_csv(tmp_path / "auto" / "ranks.csv")
    cpu = pd.read_csv(tmp_path / "cpu" / "ranks.csv")
    import torch

    if not torch.cuda.is_available():  # auto is the CPU here: the same numbers
        pd.testing.assert_frame_equal(auto, cpu)
    assert list(cpu.iloc[:, 0]) == list(auto.iloc[:, 0])


def test_two_sweeps_are_pooled_and_a_sampler_is_chosen(tmp_path):
    root = tmp_path / "multirun"
    first = write_synthetic_sweep(root / "a", recipes=("rf", "eps/linear"), sampler="rf_time", **SMALL)
    more = write_synthetic_sweep(root / "b", recipes=("v/cos",), seed=2, sampler="rf_time", **SMALL)
    native = write_synthetic_sweep(root / "c", recipes=("rf",), seed=3, sampler="native", **SMALL)
    rows, _ = report([first, more, "--bootstrap", "0"], tmp_path / "pooled")
    assert sorted(r["recipe"] for r in rows) == ["eps/linear", "rf", "v/cos"]
    rows, text = report([first, more, native, "--bootstrap", "0", "--sampler", "rf_time"], tmp_path / "one")
    assert sorted(r["recipe"] for r in rows) == ["eps/linear", "rf", "v/cos"]
    assert "Sampler: restricted to rf_time (--sampler); left out: native" in text


@pytest.mark.parametrize("flags, message", [
    (["--confidence", "1.5"], "--confidence 1.5: must lie in (0, 1)"),
    (["--separation", "2"], "--separation 2.0: must lie in (0.5, 1]"),
    (["--seed", "-1"], "--seed -1: must be an integer >= 0"),
    (["--bootstrap", "-3"], "--bootstrap -3: must be an integer >= 0 (0: no bootstrap)"),
])
def test_bad_option_values_are_refused_with_or_without_draws(sweep, tmp_path, capsys, flags, message):
    for draws in ("0", "5"):
        assert main([str(sweep), "--bootstrap", draws, *flags, "--out", str(tmp_path / "r")]) == 1
        assert capsys.readouterr().err.strip() == f"rank report: error: {message}"
    assert not (tmp_path / "r").exists()


def test_a_sweep_given_twice_and_an_unwritable_out_dir_are_refused(sweep, tmp_path, capsys):
    assert main([str(sweep), str(sweep), "--bootstrap", "0", "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.strip() == (f"rank report: error: sweep directory given twice: {sweep.resolve()}; "
                                               "give each once")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(sweep), "--bootstrap", "0", "--out", str(blocker / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rank report: error: --out {blocker / 'r'}: ") and "\n" not in err


def test_an_out_that_is_a_file_is_refused_before_any_work(sweep, tmp_path, capsys, monkeypatch):
    import src.ranking.report as report_module

    def no_work(*args, **kwargs):
        raise AssertionError("build_report ran before --out was checked")

    monkeypatch.setattr(report_module, "build_report", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out, why in ((blocker, "is a file"), (blocker / "r", f"lies under the file {blocker}")):
        assert main([str(sweep), "--bootstrap", "5", "--out", str(out)]) == 1
        assert capsys.readouterr().err.strip() == (f"rank report: error: --out {out}: {why}; give a folder (made "
                                                   "when absent)")
    assert blocker.read_text() == "not a folder"


def test_an_empty_out_is_refused_not_read_as_the_current_folder(sweep, tmp_path, capsys, monkeypatch):
    """`--out "$REPORT_DIR"` with the variable unset: Path('') is ".", and the report's files were written among
    whatever the current folder holds (the repository's root)."""
    monkeypatch.chdir(tmp_path)
    for out in ("", " "):
        assert main([str(sweep), "--bootstrap", "0", "--out", out]) == 1
        assert capsys.readouterr().err == (f"rank report: error: --out {out!r}: give a folder (made when absent), or "
                                           "leave --out out for reports/<sweep name>\n")
    assert list(tmp_path.iterdir()) == []


def test_out_in_the_sweep_it_reads_is_refused(tmp_path, capsys):
    """A report removes the temp files in its folder (a killed report's): in the sweep folder or a run directory they
    are a running job's writes in progress (failures.json, a checkpoint), which it would have removed mid-write."""
    sweep = write_synthetic_sweep(tmp_path / "s", recipes=("rf", "eps/linear"), **SMALL)
    before = sorted(p for p in sweep.rglob("*"))
    for out, what in ((sweep, "the sweep folder"), (sweep / "0", f"in the run directory {sweep / '0'} of the sweep"),
                      (sweep / "0" / "eval" / "r", f"in the run directory {sweep / '0'} of the sweep")):
        assert main([str(sweep), "--bootstrap", "0", "--out", str(out)]) == 1
        assert capsys.readouterr().err == (f"rank report: error: --out {out}: is {what} the report reads; give a "
                                           "folder of its own (made when absent), or leave --out out for "
                                           "reports/<sweep name>\n")
    assert sorted(p for p in sweep.rglob("*")) == before
    rows, _ = report([sweep, "--bootstrap", "0"], sweep / "report")  # a folder of its own in the sweep: taken
    assert rows


def test_option_errors_name_the_option_as_given(sweep, tmp_path, capsys):
    for flags, message in ((["--fifty-step-cfg", "5", "3.5"], "--fifty-step-cfg 5.0 3.5: no 50-step setting has "
                                                              "CFG scale 3.5; the sweep has 1.0, 2.5, 5.0"),
                           (["--fifty-step-cfg", "7"], "--fifty-step-cfg 7.0: no 50-step setting has CFG scale 7.0; "
                                                       "the sweep has 1.0, 2.5, 5.0"),
                           (["--train-seeds", "3"], "--train-seeds 3: no records of that training seed; the sweep has "
                                                    "none (its runs name no training seed)")):
        assert main([str(sweep), "--bootstrap", "0", *flags, "--out", str(tmp_path / "r")]) == 1
        assert capsys.readouterr().err == f"rank report: error: {message}\n"
    assert not (tmp_path / "r").exists()


def test_too_few_draws_for_the_separation_are_flagged(sweep, tmp_path):
    _, text = report([sweep, "--bootstrap", "2"], tmp_path / "a")
    assert "Only 2 draws: fewer than 20 cannot show a 95% separation" in text
    _, text = report([sweep, "--bootstrap", "2", "--separation", "0.6"], tmp_path / "b")  # 3 draws needed
    assert "Only 2 draws: fewer than 3 cannot show a 60% separation" in text
    _, text = report([sweep, "--bootstrap", "20"], tmp_path / "c")
    assert "Only 20 draws" not in text
    # 1 / (1 - 0.9) is 10.000000000000002 in floats: 10 draws suffice, 9 do not
    _, text = report([sweep, "--bootstrap", "10", "--separation", "0.9"], tmp_path / "d")
    assert "Only 10 draws" not in text
    _, text = report([sweep, "--bootstrap", "9", "--separation", "0.9"], tmp_path / "e")
    assert "Only 9 draws: fewer than 10 cannot show a 90% separation" in text


def test_a_report_of_one_sampler_never_lands_where_the_full_report_is(tmp_path, monkeypatch):
    first = write_synthetic_sweep(tmp_path / "multirun" / "s", recipes=("rf", "eps/linear"), sampler="rf_time", **SMALL)
    monkeypatch.chdir(tmp_path)  # the default report directory is relative: reports/<sweep>-sampler=...
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(first), "--bootstrap", "0", "--sampler", "rf_time"]) == 0
    assert (tmp_path / "reports" / "s-sampler=rf_time" / "report.md").is_file()
    assert not (tmp_path / "reports" / "s").exists()
    # Another 50-step column (--fifty-step-cfg) is another report too.
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(first), "--bootstrap", "0"]) == 0
        before = (tmp_path / "reports" / "s" / "report.md").read_bytes()
        assert main([str(first), "--bootstrap", "0", "--fifty-step-cfg", "2.5", "5"]) == 0
        assert main([str(first), "--bootstrap", "0", "--fifty-step-cfg", "all"]) == 0
    assert (tmp_path / "reports" / "s" / "report.md").read_bytes() == before
    assert "CFG 2.5, 5.0" in (tmp_path / "reports" / "s-fifty_step_cfg=2.5_5" / "report.md").read_text()
    assert (tmp_path / "reports" / "s-fifty_step_cfg=all" / "report.md").is_file()


def test_device_cuda_without_a_gpu_names_the_option_as_given(sweep, tmp_path, capsys, monkeypatch):
    """--device cuda where torch sees no GPU: the line names `--device cuda`, as the other options' errors do, not
    the library's `bootstrap device='cuda'`."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([str(sweep), "--bootstrap", "0", "--device", "cuda", "--out", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err == ("rank report: error: --device cuda is not allowed here: torch sees no CUDA "
                                       "device; allowed: auto, cpu\n")
    assert not (tmp_path / "r").exists()


def test_an_out_that_is_a_link_to_nothing_is_refused_naming_it(sweep, tmp_path, capsys, monkeypatch):
    """mkdir fails on a dangling link with a bare `File exists`, after the report's work."""
    import src.ranking.report as report_module

    def no_work(*args, **kwargs):
        raise AssertionError("build_report ran before --out was checked")

    monkeypatch.setattr(report_module, "build_report", no_work)
    link = tmp_path / "reports"
    link.symlink_to(tmp_path / "moved")
    for out, why in ((link, "is"), (link / "r", f"lies under {link},")):
        assert main([str(sweep), "--bootstrap", "5", "--out", str(out)]) == 1
        assert capsys.readouterr().err.strip() == (f"rank report: error: --out {out}: {why} a link to nothing "
                                                   f"({tmp_path / 'moved'}); give a folder (made when absent)")
    assert link.is_symlink() and not (tmp_path / "moved").exists()
