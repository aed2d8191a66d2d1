"""What the console shows while a sweep runs: one progress display per phase, and nothing else by default.

`Progress` is a live bar (tqdm) when its stream is a terminal, and a plain line every `every_s` seconds otherwise
(a log file, SLURM, CI), so a piped run still says how far it is. The training callback
(src/training/progress.py), the sweep's "job i of n" lines (`SweepProgress`, fed by src/run.py and the tagging
sweeper) and the evaluation hook (`evaluation_hook`) all print through it. `ConsoleFilter` is the console handler's
filter (conf/config.yaml, hydra.job_logging): library INFO chatter and expected warnings go to the run's log file
only, unless `verbose=true`.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import sys
import time
from typing import Callable, TextIO

#: Plain progress lines (output not a terminal): at least PLAIN_EVERY_S apart, and then only once a quarter of the
#: phase is done since the last line or PLAIN_MAX_GAP_S have passed; a short phase gives a few lines, a long one a
#: line a minute.
PLAIN_EVERY_S = 10.0
PLAIN_MAX_GAP_S = 60.0
PLAIN_FRACTION = 0.25


def format_duration(seconds: float | None) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def is_terminal(stream: TextIO) -> bool:
    """True when the stream is an interactive terminal (a live bar makes sense there)."""
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress of one phase, `total` units: a tqdm bar on a terminal, else a plain line every `every_s` seconds.

    `update(done, **fields)` sets the absolute position and the fields shown after it (e.g. loss=0.123); the
    plain form prints the first update, then a line at most every `every_s` seconds once a quarter of the total
    has passed since the last line or `max_gap_s` seconds have, and the final state on `close()`. Rate and time
    left are measured from the first update, so a resumed phase (starting at done > 0) does not report an
    inflated rate. unit=None shows no rate (only the time left).
    """

    def __init__(self, total: int, desc: str, unit: str | None = "it", stream: TextIO | None = None,
                 terminal: bool | None = None, every_s: float = PLAIN_EVERY_S, max_gap_s: float = PLAIN_MAX_GAP_S,
                 clock: Callable[[], float] = time.monotonic, start: tuple[float, int] | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.max_gap_s = float(max_gap_s)
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self.every_s, self.clock = float(every_s), clock
        self.done, self.fields = 0, {}
        self._start = start  # (clock time, done) the rate is measured from: the first update unless given
        self._printed_at: float | None = None
        self._printed_done: int | None = None
        self._bar = None
        self.closed = False
        if self.terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit or "it", file=self.stream, dynamic_ncols=True,
                             leave=True, smoothing=0.1)

    # ---- numbers -------------------------------------------------------------------------------
    def rate(self) -> float | None:
        """Units per second since the first update, or None before two distinct updates."""
        if self._start is None:
            return None
        elapsed = self.clock() - self._start[0]
        advanced = self.done - self._start[1]
        return advanced / elapsed if elapsed > 0 and advanced > 0 else None

    def remaining_s(self) -> float | None:
        """Estimated seconds left at the current rate."""
        rate = self.rate()
        return (self.total - self.done) / rate if rate else None

    def line(self) -> str:
        """The plain line: 'desc 250/500 (50%), loss 0.123, 12.3 step/s, 20 s left'."""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        parts = [f"{self.desc} {self.done}/{self.total}{pct}"]
        parts += [_field(k, v) for k, v in self.fields.items()]
        rate = self.rate()
        if rate is not None:
            if self.unit:
                parts.append(f"{rate:.3g} {self.unit}/s")
            if self.done < self.total:
                parts.append(f"{format_duration(self.remaining_s())} left")
        return ", ".join(parts)

    # ---- updates -------------------------------------------------------------------------------
    def due(self, done: int | None = None) -> bool:
        """Whether an update (to `done`) now would be shown (callers skip computing fields otherwise)."""
        if self._printed_at is None:
            return True
        gap = self.clock() - self._printed_at
        if self._bar is not None:
            return gap >= 0.5
        advanced = (self.done if done is None else int(done)) - (self._printed_done or 0)
        return gap >= self.every_s and (advanced >= PLAIN_FRACTION * self.total or gap >= self.max_gap_s)

    def update(self, done: int, **fields) -> None:
        """Set the position to `done` units (absolute) and the shown fields."""
        now = self.clock()
        if self._start is None:
            self._start = (now, int(done))
        previous, self.done = self.done, int(done)
        self.fields.update(fields)
        if self._bar is not None:
            if previous == 0 and self._bar.n == 0 and self.done > 0 and self._start[1] == self.done:
                # a resumed phase: start the bar there, so its rate counts only this run's progress
                self._bar.initial = self._bar.n = self._bar.last_print_n = self.done
                self._bar.refresh()
            else:
                self._bar.update(self.done - previous)
            if self.fields and self.due():
                self._printed_at = now
                self._bar.set_postfix_str(", ".join(_field(k, v) for k, v in self.fields.items()), refresh=False)
        elif self.due():
            self._print(now)

    def write(self, text: str) -> None:
        """A line of its own, above a live bar (or simply printed)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the display; the plain form prints the final state unless it was just printed."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._start is not None and self._printed_done != self.done:
            self._print(self.clock())

    def _print(self, now: float) -> None:
        self._printed_at, self._printed_done = now, self.done
        print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _field(name: str, value) -> str:
    """'loss 0.123', but '62.5 samples/s' for rates."""
    return f"{_fmt(value)} {name}" if name.endswith("/s") else f"{name} {_fmt(value)}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---- the sweep: job i of n, time left -------------------------------------------------------------
class SweepProgress:
    """"job i of n" lines with an estimate of what is left, from the mean duration of the jobs that did work.

    The tagging sweeper announces the sweep's size (`planned`); each job announces itself (`start`) and its end
    (`finish`). Jobs that were skipped (complete already) take no time and do not enter the mean. A job run outside
    a local sweep (a single run, a SLURM task) has no total and prints 'job i'.
    """

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.stream, self.clock = stream, clock
        self.total: int | None = None
        self.durations: list[float] = []
        self._started: float | None = None

    def planned(self, total: int) -> None:
        self.total, self.durations = int(total), []

    def drop(self, n: int) -> None:
        """n planned jobs will not be launched (their training failed in the first wave)."""
        if self.total is not None:
            self.total = max(self.total - n, 0)

    def remaining_s(self, index: int) -> float | None:
        """Estimated seconds for jobs index.. (0-based) to the end, including the one starting now."""
        if self.total is None or not self.durations:
            return None
        return (self.total - index) * sum(self.durations) / len(self.durations)

    def start(self, index: int, name: str) -> str:
        """Print and return 'job 2/3: digits/edm_-1.20_1.20 (about 1 min 40 s left in the sweep)'."""
        self._started = self.clock()
        of = f"/{self.total}" if self.total else ""
        left = self.remaining_s(index)
        tail = f" (about {format_duration(left)} left in the sweep)" if left is not None else ""
        return self._say(f"job {index + 1}{of}: {name}{tail}")

    def finish(self, skipped: bool = False, failed: bool = False, stopped: bool = False) -> str:
        """Print and return how the job ended and how long it took (stopped: by Ctrl-C or SIGTERM)."""
        took = self.clock() - self._started if self._started is not None else 0.0
        self._started = None
        if skipped:
            return self._say("  complete already, skipped")
        if stopped:
            return self._say(f"  stopped after {format_duration(took)}; rerun the command to resume")
        if not failed:
            self.durations.append(took)
        return self._say(f"  {'failed' if failed else 'done'} in {format_duration(took)}")

    def _say(self, text: str) -> str:
        print(text, file=self.stream or sys.stderr, flush=True)
        return text


#: The sweep of this process (the local launcher runs every job in the process that swept).
SWEEP = SweepProgress()


# ---- evaluation: setting i of n, samples/s ----------------------------------------------------------
def evaluation_hook(stream: TextIO | None = None, terminal: bool | None = None, every_s: float = PLAIN_EVERY_S,
                    clock: Callable[[], float] = time.monotonic) -> Callable[[int, int, str, int, float], None]:
    """The evaluation's `on_setting(i, n, label, n_samples, seconds)` callback (called after each (sampler setting,
    EMA or raw) evaluation, i counting from 1, seconds 0 for a setting that was complete already) as a progress
    display: '  eval 3/12 (25%), setting 25 steps, cfg 5.0 (ema), 62.5 samples/s, 18 s left'."""
    state: dict = {}

    def on_setting(i: int, n: int, label: str, n_samples: int, seconds: float) -> None:
        progress = state.get("progress")
        if progress is None or progress.closed or progress.total != n:
            # Timed from the start of this first setting, so the first line already has a time left.
            progress = state["progress"] = Progress(n, "  eval", unit=None, stream=stream, terminal=terminal,
                                                    every_s=every_s, clock=clock, start=(clock() - seconds, i - 1))
        fields = {"setting": label}
        if seconds > 0:
            fields["samples/s"] = round(n_samples / seconds, 1)
        progress.update(i, **fields)
        if i >= n:
            progress.close()

    return on_setting


# ---- the console: quiet unless verbose ----------------------------------------------------------------
class ConsoleFilter(logging.Filter):
    """What reaches the console: errors from anyone, warnings from this project (src.*), lines logged with
    extra={"console": True} (what a relaunch decided, e.g. evaluating without retraining); everything when verbose.

    Library INFO chatter (open_clip's model loading, Lightning's device lines) and expected warnings
    (captured into the py.warnings logger) still reach the run's log file, whose handler has no such filter.
    Hydra builds it from conf/config.yaml's hydra.job_logging (`verbose=true` lets everything through).
    """

    def __init__(self, verbose: bool | str = False):
        super().__init__()
        self.verbose = str(verbose).lower() in ("1", "true", "yes")

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose or record.levelno >= logging.ERROR or getattr(record, "console", False):
            return True
        return record.levelno >= logging.WARNING and (record.name == "src" or record.name.startswith("src."))


def quiet_console(verbose: bool, wandb: bool = False) -> None:
    """Route the remaining console chatter through logging (so the log file gets it and the console filter decides).

    Warnings become log records (py.warnings); Lightning's own stream handler is removed so its messages reach the
    root handlers once; W&B's terminal lines (wandb=True: the job uses W&B) go to the `wandb` logger unless verbose.
    """
    logging.captureWarnings(True)
    importlib.import_module("lightning.pytorch")  # imported now so its handler exists to be removed

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")  # what wandb.init reads for the run's own settings
        if wandb:  # and what its messages before that (setting deprecations) obey: the log file gets them
            import wandb as wandb_lib

            wandb_lib.termsetup(wandb_lib.Settings(silent=True), logging.getLogger("wandb"))
