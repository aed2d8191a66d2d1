"""The failed jobs of this process's sweep, for the summary the entry point prints before a non-zero exit.

A module of its own because `python -m src.run` runs src/run.py as `__main__`: a list kept there would not be the
one a launcher appends to when it collects failures reported by job processes (SLURM, submitit).
"""

from __future__ import annotations

#: (run name, one-line error) of every failed job, in the order they were collected.
FAILED: list[tuple[str, str]] = []


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def record_failure(name: str, error: str) -> None:
    FAILED.append((str(name), str(error).splitlines()[0] if str(error) else "unknown error"))


def summary() -> str:
    """The failure summary; empty when every job succeeded."""
    if not FAILED:
        return ""
    lines = [f"{len(FAILED)} job(s) failed:"]
    lines += [f"  {name}: {err}" for name, err in FAILED]
    return "\n".join(lines)
