"""Every path a comment, docstring or document cites exists in the repository, and nothing points outside it.

Scans the project's source and documentation files for
- citations of the design document, `docs/<file>.md` or `docs/<file>.md#<anchor>`: the file must exist and the
  anchor must be a heading of it (GitHub's anchor rule, see docs/design.md#citing-this-document);
- relative links in markdown, `[text](path)`, `[text](path#anchor)` and `[text](#anchor)`;
- code paths named in docs/*.md (`src/...`, `conf/...`, ...);
- references to documents outside the repository (the spec the project was first built from, a `shared` folder
  next to the clone): the repository must explain itself.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".ipynb", ".toml", ".sh", ".cfg", ".txt"}
NAMES = {"Makefile"}
# Generated or installed trees, not the project's own text.
SKIP_DIRS = {"__pycache__", "outputs", "multirun", "reports", "wandb", "build", "node_modules"}

DOC_CITATION = re.compile(r"(?<![\w./-])(docs/[\w./-]*?\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`((?:src|conf|tests|scripts|sweeps|bench|assets|notebooks|hydra_plugins)/[\w./-]+)`")
# Built from pieces so that this file does not match itself.
OUTSIDE = [
    (re.compile(r"\b" + "SP" + r"EC\b"), "cites the external spec; cite docs/<file>.md#<section> instead"),
    (re.compile(r"\.\./" + "shared" + r"\b"), "points outside the repository (a shared folder next to the clone)"),
    (re.compile("/work/" + "shared"), "points outside the repository (an absolute path to the shared folder)"),
]


def project_files() -> list[Path]:
    files = []
    for current, dirs, names in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in names:
            path = Path(current) / name
            if path.suffix in SUFFIXES or name in NAMES:
                files.append(path)
    return sorted(files)


FILES = project_files()


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@lru_cache(maxsize=None)
def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a markdown file outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text_of(path).splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, backticks dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Anchors of a markdown file's headings (duplicates numbered -1, -2, ... as GitHub does)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def check_target(target: Path, anchor: str | None, where: str) -> list[str]:
    if not target.resolve().is_relative_to(ROOT):
        return [f"{where}: {target} is outside the repository"]
    if not target.exists():
        return [f"{where}: {rel(target)} does not exist"]
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return [f"{where}: no heading with anchor #{anchor} in {rel(target)}"]
    return []


def test_slug_follows_github():
    assert slug("Weights & Biases") == "weights--biases"
    assert slug("Backbone: MM-DiT") == "backbone-mm-dit"
    assert slug("EDM weights matched to rf and v/cos") == "edm-weights-matched-to-rf-and-vcos"
    assert slug("The `heun` option") == "the-heun-option"


def test_files_found():
    names = {rel(p) for p in FILES}
    assert {"README.md", "ARCHITECTURE.md", "docs/design.md", "src/formulations/base.py", "Makefile"} <= names
    assert not any(n.startswith((".venv/", ".git/")) for n in names)


def test_design_document_citations_resolve():
    """`docs/<file>.md#<anchor>` anywhere in the repository names an existing file and heading."""
    errors = []
    for path in FILES:
        for i, line in enumerate(text_of(path).splitlines(), 1):
            for m in DOC_CITATION.finditer(line):
                errors += check_target(ROOT / m.group(1), m.group(2), f"{rel(path)}:{i}")
    assert not errors, "dangling citations:\n" + "\n".join(errors)


def test_markdown_links_resolve():
    """Relative markdown links (in .md files and notebook markdown cells) point to existing files and headings."""
    errors = []
    for path in FILES:
        if path.suffix == ".md":
            lines = prose_lines(path)
        elif path.suffix == ".ipynb":
            cells = json.loads(text_of(path)).get("cells", [])
            lines = [(k, "".join(c.get("source", []))) for k, c in enumerate(cells) if c.get("cell_type") == "markdown"]
        else:
            continue
        for i, line in lines:
            for m in MD_LINK.finditer(line):
                link = m.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I):  # http:, https:, mailto:, ...
                    continue
                target, _, anchor = link.partition("#")
                where = f"{rel(path)}:{i}: ({link})"
                errors += check_target((path.parent / target).resolve() if target else path, anchor or None, where)
    assert not errors, "dangling markdown links:\n" + "\n".join(errors)


def test_design_document_code_paths_exist():
    """Code paths the design document names (`src/...`, `conf/...`, ...) exist."""
    errors = []
    for path in sorted((ROOT / "docs").glob("*.md")):
        for i, line in prose_lines(path):
            for m in CODE_PATH.finditer(line):
                if not (ROOT / m.group(1)).exists():
                    errors.append(f"{rel(path)}:{i}: {m.group(1)} does not exist")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("pattern,problem", OUTSIDE, ids=["spec", "dotdot-shared", "abs-shared"])
def test_nothing_points_outside_the_repository(pattern, problem):
    hits = [
        f"{rel(path)}:{i}: {line.strip()[:100]}"
        for path in FILES
        for i, line in enumerate(text_of(path).splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, f"{problem}:\n" + "\n".join(hits)
