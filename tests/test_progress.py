"""Console progress: the plain and terminal displays, the sweep's job lines, the evaluation hook, the console filter,
and the real CLI (a two-job sweep whose console, piped to a file, shows progress and no library chatter)."""
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.utils.progress import (
    ConsoleFilter, Progress, SweepProgress, evaluation_hook, format_duration,
)
from tests import warm

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_format_duration():
    assert [format_duration(s) for s in (None, float("nan"), 0, 42.4, 185, 7620)] == \
        ["?", "?", "0 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_plain_progress_prints_a_few_lines_with_rate_and_time_left():
    clock, out = Clock(), io.StringIO()
    p = Progress(100, "train", unit="step", stream=out, terminal=False, clock=clock)
    for k in range(101):
        clock.t = 0.5 * k  # 2 steps/s, 50 s in all
        p.update(k, loss=1.0 / (k + 1))
    p.close()
    lines = out.getvalue().splitlines()
    # the first update, then each quarter (12.5 s apart >= the 10 s minimum), and the end
    assert lines == ["train 0/100 (0%), loss 1",
                     "train 25/100 (25%), loss 0.03846, 2 step/s, 38 s left",
                     "train 50/100 (50%), loss 0.01961, 2 step/s, 25 s left",
                     "train 75/100 (75%), loss 0.01316, 2 step/s, 12 s left",
                     "train 100/100 (100%), loss 0.009901, 2 step/s"]


def test_plain_progress_of_a_long_phase_prints_a_line_a_minute():
    clock, out = Clock(), io.StringIO()
    p = Progress(100_000, "train", unit="step", stream=out, terminal=False, clock=clock)
    for k in range(0, 100_001, 10):
        clock.t = k / 10  # 10 steps/s: 10000 s in all
        p.update(k)
    p.close()
    lines = out.getvalue().splitlines()
    assert 160 <= len(lines) <= 170  # 10000 s / 60 s, plus the first and the last
    assert lines[-1] == "train 100000/100000 (100%), 10 step/s"


def test_resumed_progress_measures_its_rate_from_the_resume_point():
    clock, out = Clock(), io.StringIO()
    p = Progress(500, "train", unit="step", stream=out, terminal=False, clock=clock)
    p.update(400)
    clock.t = 10.0
    p.update(450)
    assert p.rate() == pytest.approx(5.0) and p.remaining_s() == pytest.approx(10.0)


def test_terminal_progress_is_a_live_bar():
    out = io.StringIO()
    p = Progress(10, "train", unit="step", stream=out, terminal=True)
    for k in range(11):
        p.update(k, loss=0.5)
    p.close()
    text = out.getvalue()
    assert "\r" in text and "10/10" in text and "loss 0.5" in text


def test_sweep_progress_says_job_i_of_n_and_what_is_left():
    clock, out = Clock(), io.StringIO()
    sweep = SweepProgress(stream=out, clock=clock)
    sweep.planned(3)
    assert sweep.start(0, "digits/rf") == "job 1/3: digits/rf"
    clock.t = 60.0
    sweep.finish()
    assert sweep.start(1, "digits/edm") == "job 2/3: digits/edm (about 2 min 00 s left in the sweep)"
    sweep.finish(skipped=True)  # takes no time and does not enter the mean
    assert sweep.durations == [60.0]
    clock.t = 100.0
    sweep.start(2, "digits/eps")
    clock.t = 130.0
    assert sweep.finish(failed=True) == "  failed in 30 s"
    assert out.getvalue().splitlines()[-1] == "  failed in 30 s"
    single = SweepProgress(stream=io.StringIO(), clock=clock)
    assert single.start(4, "x") == "job 5: x"  # no total known (a SLURM task)


def test_evaluation_hook_reports_settings_and_samples_per_second():
    clock, out = Clock(), io.StringIO()
    hook = evaluation_hook(out, terminal=False, clock=clock)
    for i in range(1, 13):
        clock.t += 4.0
        hook(i, 12, f"{i} steps, cfg 5.0, ema", 100, 4.0 if i != 2 else 0.0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  eval 1/12 (8%), setting 1 steps, cfg 5.0, ema, 25 samples/s, 44 s left"
    assert lines[-1].startswith("  eval 12/12 (100%), setting 12 steps, cfg 5.0, ema, 25 samples/s")
    assert 3 <= len(lines) <= 6


def _record(name, level):
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_console_filter_keeps_errors_and_project_warnings_unless_verbose():
    quiet, verbose = ConsoleFilter(False), ConsoleFilter("true")
    assert not quiet.filter(_record("root", logging.INFO))  # open_clip's model loading
    assert not quiet.filter(_record("lightning.pytorch.utilities.rank_zero", logging.INFO))
    assert not quiet.filter(_record("py.warnings", logging.WARNING))  # "Found 71 module(s) in eval mode"
    assert quiet.filter(_record("src.run", logging.ERROR)) and quiet.filter(_record("root", logging.ERROR))
    assert quiet.filter(_record("src.training.job", logging.WARNING))
    assert not quiet.filter(_record("src.training.job", logging.INFO))
    assert all(verbose.filter(_record(n, logging.INFO)) for n in ("root", "py.warnings", "src.x"))


def test_format_duration_at_the_unit_boundaries_and_for_impossible_values():
    """60 s is a minute, 3600 s an hour (never '60 s' or '60 min 00 s'); a negative or infinite estimate is unknown."""
    assert [format_duration(s) for s in (59.4, 59.6, 60, 3599, 3600)] == \
        ["59 s", "1 min 00 s", "1 min 00 s", "59 min 59 s", "1 h 00 min"]
    assert format_duration(-1.0) == "?" and format_duration(float("inf")) == "?"


def test_a_dumb_terminal_gets_plain_lines(monkeypatch):
    """TERM=dumb (Emacs shells, some CI consoles) cannot redraw a bar: plain lines there."""
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm")
    assert Progress(1, "x", stream=Tty()).terminal
    monkeypatch.setenv("TERM", "dumb")
    assert not Progress(1, "x", stream=Tty()).terminal


def test_plain_line_without_progress_or_total_shows_no_rate_or_percentage():
    """A stalled phase shows no '0 step/s' (and no time left); a phase of zero units shows no percentage."""
    clock = Clock()
    p = Progress(10, "train", unit="step", stream=io.StringIO(), terminal=False, clock=clock)
    p.update(5)
    clock.t = 10.0
    p.update(5)
    assert p.rate() is None and p.line() == "train 5/10 (50%)"
    assert Progress(0, "eval", stream=io.StringIO(), terminal=False).line() == "eval 0/0"


def test_sweep_progress_new_plan_forgets_old_durations_and_drops_never_go_below_zero():
    """A new sweep in the same process starts without an estimate; failed jobs do not enter the mean; dropping more
    jobs than planned leaves no total rather than 'job 1/-2'."""
    clock = Clock()
    sweep = SweepProgress(stream=io.StringIO(), clock=clock)
    sweep.planned(2)
    sweep.start(0, "a")
    clock.t = 60.0
    sweep.finish()
    sweep.start(1, "b")
    clock.t = 90.0
    sweep.finish(failed=True)
    assert sweep.durations == [60.0]
    sweep.planned(2)
    assert sweep.start(0, "c") == "job 1/2: c"
    sweep.drop(5)
    assert sweep.total == 0 and sweep.start(0, "d") == "job 1: d"


def test_evaluation_hook_starts_a_new_display_when_the_number_of_settings_changes():
    """The next evaluation (another run, another count of settings) is counted against its own total."""
    clock, out = Clock(), io.StringIO()
    hook = evaluation_hook(out, terminal=False, clock=clock)
    hook(1, 4, "a", 10, 1.0)
    hook(1, 2, "b", 10, 1.0)
    assert out.getvalue().splitlines()[-1].startswith("  eval 1/2 (50%), setting b")


def test_console_filter_lets_console_lines_and_the_src_logger_through():
    """Lines logged with extra={"console": True} (a relaunch's decision) reach the console at INFO; the package logger
    'src' itself counts as the project; verbose=1 or yes (shell spellings) means verbose."""
    quiet = ConsoleFilter(False)
    record = _record("src.run", logging.INFO)
    record.console = True
    assert quiet.filter(record)
    assert quiet.filter(_record("src", logging.WARNING)) and not quiet.filter(_record("srcery", logging.WARNING))
    assert ConsoleFilter("1").verbose and ConsoleFilter("yes").verbose and not ConsoleFilter("no").verbose


# ---- the real command --------------------------------------------------------------------------------------------
TINY = [
    "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.batch_size=16", "data.val_samples=32",
    "train.max_steps=8", "train.val_every=4", "train.ckpt_every=4", "eval.n_samples=4", "eval.batch_size=4",
    "eval.settings=[{steps: 2, cfg: 1.0}]", "logger=csv", "torch_threads=1",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from src.data.embedded import prepare_embedded

    cache = tmp_path_factory.mktemp("cache")
    prepare_embedded("digits", cache / "data")
    return cache


def run_cli(args, log_path: Path):
    """The CLI with its console (stdout and stderr together) going to a file, as under SLURM or `> log 2>&1`."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    with open(log_path, "w") as log:
        proc = warm.run([sys.executable, "-m", "src.run", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                        env=env, timeout=600)
    return proc.returncode, log_path.read_text()


def test_sweep_console_shows_progress_and_no_chatter(tmp_path, cache_dir):
    code, console = run_cli(["-m", *TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}",
                             "sweep_name=quiet", "loss=rf_lognorm"], tmp_path / "console.txt")
    assert code == 0, console[-3000:]
    lines = console.splitlines()
    assert lines[0] == "job 1/1: digits/rf_lognorm_0.00_1.00"  # the sweeper told the job how many there are
    assert lines[1] == "  train 0/8 (0%)"
    at = lines.index("  evaluating the selected checkpoint")
    assert lines[at - 1].startswith("  train 8/8 (100%), loss ") and "step/s" in lines[at - 1]
    evaluation = lines[at + 1:-1]  # one line per (setting, EMA or raw) at most, the last one closing it
    assert evaluation and all(line.startswith("  eval ") and "samples/s" in line for line in evaluation), lines
    assert evaluation[-1].startswith("  eval 2/2 (100%), setting 2 steps, cfg 1.0")
    assert lines[-1].startswith("  done in ")
    assert len(lines) <= 8, console
    for chatter in ("[INFO]", "HYDRA", "Loading full pretrained weights", "GPU available", "eval mode"):
        assert chatter not in console, chatter
    # the chatter is in the run's log file instead, the expected warnings included
    log = (tmp_path / "outputs/multirun/quiet/digits/rf_lognorm_0.00_1.00/run.log").read_text()
    assert "Loading full pretrained weights" in log and "GPU available" in log and "[py.warnings]" in log


@pytest.mark.slow
def test_two_jobs_verbose_and_a_rerun(tmp_path, cache_dir):
    """job i of n with the time left, verbose=true brings the chatter back, a rerun says each job is skipped."""
    args = [*TINY, f"paths.root_dir={tmp_path}", f"paths.cache_dir={cache_dir}", "sweep_name=loud",
            "loss=rf_lognorm,edm"]
    code, console = run_cli(["-m", *args, "verbose=true"], tmp_path / "loud.txt")
    assert code == 0, console[-3000:]
    assert "Loading full pretrained weights" in console and "GPU available" in console and "[HYDRA]" in console
    assert any(line.startswith("job 2/2: digits/edm_-1.20_1.20 (about ") for line in console.splitlines())
    code, console = run_cli(["-m", *args], tmp_path / "again.txt")
    assert code == 0 and console.splitlines() == [
        "job 1/2: digits/rf_lognorm_0.00_1.00", "  complete already, skipped",
        "job 2/2: digits/edm_-1.20_1.20", "  complete already, skipped"], console


def test_terminal_bar_of_a_resumed_phase_starts_at_the_resume_point():
    out = io.StringIO()
    p = Progress(500, "train", unit="step", stream=out, terminal=True)
    p.update(400)
    assert p._bar.n == 400 and p._bar.initial == 400
    p.update(450)
    p.close()
    assert "450/500" in out.getvalue()


def test_training_progress_lines_carry_the_loss():
    from types import SimpleNamespace

    from src.training.progress import TrainingProgress

    out = io.StringIO()
    bar = TrainingProgress(stream=out, terminal=False, every_s=0.0)
    trainer = SimpleNamespace(max_steps=8, global_step=0, is_global_zero=True, callbacks=[],
                              progress_bar_metrics={})
    bar.on_train_start(trainer, None)
    for step in range(1, 9):
        trainer.global_step = step
        trainer.progress_bar_metrics = {"train/loss": 1.0 / step, **({"val_ema/loss_mean": 0.5} if step >= 4 else {})}
        bar.on_train_batch_end(trainer, None, None, None, step - 1)
    bar.on_train_end(trainer, None)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  train 0/8 (0%)" and len(lines) == 5  # the start, each quarter (the last closes it)
    assert all("loss " in line for line in lines[1:]), lines
    assert lines[-1].startswith("  train 8/8 (100%), loss 0.125, val loss (EMA) 0.5, ")
