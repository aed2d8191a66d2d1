"""Code defined outside this repository, named by import path ("package.module:NAME"): a formulation's builder
(`loss.family`), a sampler (`sampler.name`). Importing it with one-line errors, and naming its source by content.

Pure Python: no torch, Lightning or Hydra here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import re
import sys
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


def _find_spec(name: str):
    """The module's spec without running any of its code: importlib.util.find_spec imports a dotted name's parent
    packages (their __init__.py, side effects included), which a report that only names the code need not do."""
    if name in sys.modules:
        return getattr(sys.modules[name], "__spec__", None)
    head, _, rest = name.partition(".")
    spec = importlib.util.find_spec(head)  # a top-level name is found, not imported
    for part in rest.split(".") if rest else []:
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(f"{spec.name}.{part}", list(spec.submodule_search_locations))
    return spec


def module_digest(name: str) -> str:
    """"file.py:<sha256[:12]>" of a module's source file, found without running it; for a package (its code is its
    folder's, not only __init__.py's, which often just imports from the rest) "folder/:<sha256[:12]>" of every .py
    file under the folder; "unknown" when it has none."""
    try:
        spec = _find_spec(name)
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    if origin is None or not origin.is_file():
        return "unknown"
    if spec.submodule_search_locations is None or origin.name != "__init__.py":
        return f"{origin.name}:{hashlib.sha256(origin.read_bytes()).hexdigest()[:12]}"
    folder, digest = origin.parent, hashlib.sha256()
    for path in sorted(_package_files(folder)):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{folder.name}/:{digest.hexdigest()[:12]}"


def _package_files(folder: Path):
    """The .py files of a package: its own and its subpackages' (folders with an __init__.py), not whatever else
    lies under it (a virtual environment, data, notebooks' checkpoints)."""
    for path in folder.iterdir():
        if path.suffix == ".py" and path.is_file():
            yield path
        elif path.is_dir() and (path / "__init__.py").is_file():
            yield from _package_files(path)
