"""Code defined outside this repository, named by import path ("package.module:NAME"): a formulation's builder
(`loss.family`), a sampler (`sampler.name`). Importing it with one-line errors, and naming its source by content.

Pure Python: no torch, Lightning or Hydra here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

#: "package.module:NAME" (NAME may be an attribute path, a.b).
IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def import_object(path: str, setting: str) -> Any:
    """The object an import path names; a one-line ValueError naming the setting when it cannot be imported."""
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- an ImportError, or any error raised while the module runs
        raise ValueError(f"{setting} {path!r}: cannot import {module_name} ({type(e).__name__}: {e}); the module "
                         "must be importable where the job runs (the working directory or PYTHONPATH)") from None
    try:
        return functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise ValueError(f"{setting} {path!r}: {module_name} has no {attribute}") from None


def module_digest(name: str) -> str:
    """"file.py:<sha256[:12]>" of a module's source file, found without running it; "unknown" when it has none."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        return "unknown"
    return f"{origin.name}:{hashlib.sha256(origin.read_bytes()).hexdigest()[:12]}"
