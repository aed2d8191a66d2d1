"""Plain tables rendered as Markdown or HTML, and Markdown tables parsed back."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass


@dataclass
class Table:
    """Headers and rows of strings, rendered identically to Markdown and HTML."""

    headers: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        """GitHub-flavoured Markdown table."""
        lines = [_md_row(self.headers), "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += [_md_row(row) for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        """HTML table."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows (header -> cell) of the first Markdown table in text."""
    lines = [line.strip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None or start + 1 >= len(lines) or not set(lines[start + 1]) <= set("|-: "):
        raise ValueError("parse_markdown_table: no Markdown table (header row then |---| row) found")
    headers = _cells(lines[start])
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, _cells(line))))
    return rows


def fmt(value, digits: int = 2) -> str:
    """A number with fixed decimals, '-' for missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _md_row(cells) -> str:
    """One Markdown table row; '|' and '\\' in cells escaped (a backslash before '|' would escape the escape)."""
    return "| " + " | ".join(str(c).replace("\\", "\\\\").replace("|", "\\|") for c in cells) + " |"


def _cells(line: str) -> list[str]:
    """Cells of a Markdown table row."""
    inner = line.strip().strip("|")
    parts, cell, escaped = [], "", False
    for ch in inner:
        if escaped:
            cell += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "|":
            parts.append(cell.strip())
            cell = ""
        else:
            cell += ch
    parts.append(cell.strip())
    return parts
