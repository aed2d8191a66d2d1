"""The sweep directory's own JSON records (failures.json, jobs.json): read strictly, damage never silently dropped.

Both are written atomically (src/utils/io.py), so a file that does not parse was damaged by something else (a full
disk, an editor, a copy cut short). A reader must not take it for an empty record: the report would call a sweep
complete whose failed or planned jobs it cannot see, and the next launch would write over what is left of it. So
readers get a DamagedSweepFile error to report, and a launch that must update the file keeps the damaged one aside
(`<name>.damaged`) with a warning before starting a new one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DAMAGED_SUFFIX = ".damaged"


class DamagedSweepFile(ValueError):
    """A sweep record file that exists but cannot be read as a JSON object."""


def read_sweep_file(path: str | os.PathLike) -> dict:
    """The JSON object in path ({} when there is no file); DamagedSweepFile naming the file when it is unreadable."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedSweepFile(f"{path} is unreadable ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DamagedSweepFile(f"{path} is unreadable (not valid JSON: {exc})") from exc
    if not isinstance(data, dict):
        raise DamagedSweepFile(f"{path} is unreadable (a JSON {type(data).__name__}, expected an object)")
    return data


def read_for_update(path: str | os.PathLike) -> dict:
    """read_sweep_file for a writer holding the file's lock: a damaged file is renamed to `<name>.damaged` (a
    number added when that exists already), with a warning, and {} returned, so the new file starts empty but what
    the damaged one still holds stays on disk for the user."""
    path = Path(path)
    try:
        return read_sweep_file(path)
    except DamagedSweepFile as exc:
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        n = 1
        while aside.exists():
            aside = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}")
            n += 1
        os.replace(path, aside)
        log.warning("%s; kept as %s, a new %s is started (the entries of the damaged one are not in it)",
                    exc, aside.name, path.name)
        return {}


def update_sweep_file(path: str | os.PathLike, change) -> None:
    """Rewrite the sweep file at path with change(entries), under its lock (`.<name>.lock` beside it), atomically;
    a damaged file is kept aside first (read_for_update)."""
    from src.utils.io import atomic_write_json, file_lock

    path = Path(path)
    with file_lock(path.with_name(f".{path.name}.lock")):
        atomic_write_json(path, change(read_for_update(path)), sort_keys=True)


def damaged_copies(sweep_dir: str | os.PathLike, name: str) -> list[Path]:
    """The damaged copies of `name` a launch kept aside in sweep_dir (read_for_update), oldest name first."""
    return sorted(Path(sweep_dir).glob(f"{name}{DAMAGED_SUFFIX}*"))
