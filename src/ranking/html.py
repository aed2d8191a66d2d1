"""The rank report as one self-contained HTML file (figures and samples embedded as data URIs), to be mailed.

Tables are ordered by rank and sortable by clicking a header (a few lines of inline JavaScript); every column
header carries its definition in a title attribute (hover), and a definitions section lists them all. The rank
table is rendered from whatever columns the report's table has: a pair "<name> lo" / "<name> hi" becomes one
interval column, unknown columns are shown as they are.
"""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from src.ranking.tables import Table

esc = html.escape

# Definitions, matched against column names (regular expressions, first match wins). {c} stands for a column group
# (all, 5 steps, 50 steps, ...).
GROUP_WORDS = {
    "all": "all control settings",
    "5 steps": "the 5-step sampler settings",
    "50 steps": "the 50-step sampler settings",
}
DEFINITIONS: list[tuple[str, str]] = [
    (r"^#$", "Position in the order of the table (by average rank over all settings)."),
    (r"^recipe$", "The training formulation (the paper's name), qualified by swept values or another backbone."),
    (r"^n (.+)$", "Number of control settings averaged for {g} (fewer than the sweep has when the recipe lacks some)."),
    (r"^paper (.+)$", "The paper's average rank for {g} (Esser et al. 2024, Table 1; 61 recipes on ImageNet and CC12M)."),
    (r"^(.+) interval$", "Bootstrap percentile interval [lo, hi] of the average rank for {g}: resampling the "
                         "training seeds, the evaluation samples and the reference images; it covers training-seed "
                         "variance too (none for a recipe with one seed)."),
    (r"^missing settings$", "Control settings the sweep has but this recipe lacks (failed or unfinished evaluations)."),
    (r"^mean rank(.*)$", "Mean of the average rank over the seed replicates."),
    (r"^seeds?$", "Number of training seeds (replicates) of the recipe."),
    (r"^seeds min$", "Fewest training seeds the recipe has in any one control setting (fewer than 'seeds' when a "
                     "seed lacks some setting)."),
    (r"^P\(front 1\)(.*)$", "Share of the column's control settings in which the recipe is on the first front "
                            "(non-dominated), over the bootstrap draws when there are any."),
    (r"^(all|5 steps|50 steps)$", "Average rank over {g}: the mean non-dominated front (1 = best) of the recipe, "
                                  "one front per control setting (dataset, sampler setting, EMA or raw weights)."),
]
TERMS = [
    ("CLIP score", "Mean cosine similarity between the CLIP image embedding of a sample and the CLIP text embedding "
                   "of its prompt (higher is better)."),
    ("FID (CLIP features)", "Frechet distance between the Gaussian statistics of the CLIP image embeddings of the "
                            "samples and of the evaluation images (lower is better); the notes say which embeddings "
                            "(raw, as the paper, or L2-normalised in older results)."),
    ("Control setting", "One (dataset, sampler setting, EMA or raw weights) combination; recipes are ranked within "
                        "each."),
    ("Front", "Non-dominated sorting on (CLIP score up, FID down): front 1 holds the recipes no other recipe beats on "
              "both; removing them, the next front is non-dominated among the rest, and so on."),
    ("Average rank", "A recipe's mean front over a group of control settings (all, 5 steps, 50 steps); lower is "
                     "better."),
    ("Bootstrap interval", "Percentile interval of the average rank over bootstrap draws that resample the training "
                           "seeds and, paired across recipes, the evaluation samples and reference images."),
    ("Common random noise", "Sample k uses the same prompt and the same initial noise in every recipe and sampler "
                            "setting, so the sample sheets compare like with like."),
]


def definition(column: str) -> str:
    """The hover text of a column header."""
    for pattern, text in DEFINITIONS:
        match = re.match(pattern, column)
        if match:
            group = match.group(1).strip() if match.groups() and match.group(1) else column
            return text.format(g=GROUP_WORDS.get(group, group or "all control settings"))
    return f"Column '{column}' of the rank table (ranks.csv)."


def _number(value) -> tuple[str, str]:
    """(shown text, sort key) of a cell."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-", ""
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value)), str(int(value))
    if isinstance(value, (float, np.floating)):
        text = f"{value:.3g}" if 0 < abs(value) < 1e-2 else f"{value:.2f}"
        return text, repr(float(value))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"[{_number(value[0])[0]}, {_number(value[1])[0]}]", _number(value[0])[1]
    return str(value), str(value)


def rank_table_view(table: pd.DataFrame) -> tuple[list[str], list[list[object]]]:
    """Headers and cell values of the rank table: '#', 'recipe', then its columns in order, each 'X lo'/'X hi'
    pair merged into one 'X interval' column placed after 'X'."""
    columns = [str(c) for c in table.columns]
    pairs = {c[:-3] for c in columns if c.endswith(" lo") and f"{c[:-3]} hi" in columns}
    shown: list[tuple[str, object]] = []
    for c in columns:
        if (c.endswith(" lo") or c.endswith(" hi")) and c[:-3] in pairs:
            continue
        shown.append((c, c))
        if c in pairs:
            shown.append((f"{c} interval", (f"{c} lo", f"{c} hi")))
    for base in sorted(pairs - set(columns)):  # an interval without its point column
        shown.append((f"{base} interval", (f"{base} lo", f"{base} hi")))
    headers = ["#", "recipe"] + [name for name, _ in shown]

    def integral(column: str) -> bool:  # counts (n, seeds, missing settings) shown without decimals
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(float)
        finite = values[np.isfinite(values)]
        return bool(re.search(r"^(n |seeds?\b)|missing", column)) and len(finite) > 0 \
            and bool(np.all(finite == np.round(finite)))

    counts = {c for c in columns if integral(c)}
    rows = []
    for i, (recipe, row) in enumerate(table.iterrows(), start=1):
        cells: list[object] = [i, str(recipe)]
        for _, source in shown:
            if isinstance(source, tuple):
                cells.append((row[source[0]], row[source[1]]))
            elif source in counts and pd.notna(row[source]):
                cells.append(int(row[source]))
            else:
                cells.append(row[source])
        rows.append(cells)
    return headers, rows


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], titles: Mapping[str, str] | None = None,
               table_id: str | None = None) -> str:
    """A sortable HTML table: headers with title attributes, cells with data-v sort keys."""
    titles = titles or {}
    head = "".join(f'<th title="{esc(titles.get(h, definition(h)))}">{esc(h)}</th>' for h in headers)
    body = []
    for row in rows:
        cells = []
        for value in row:
            text, key = _number(value) if not isinstance(value, str) else (value, value)
            cells.append(f'<td data-v="{esc(key)}">{esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f'<table class="sortable"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def plain_table_html(table: Table) -> str:
    """A report Table (strings) as a sortable HTML table."""
    return table_html(table.headers, table.rows, titles={h: h for h in table.headers})


def data_uri(path: str | Path) -> str:
    """A PNG file as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def figure_html(title: str, path: str | Path, caption: str = "") -> str:
    anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return (f'<figure id="{anchor}"><h3>{esc(title)}</h3><img alt="{esc(title)}" src="{data_uri(path)}">{cap}'
            "</figure>")


STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1500px;margin:1.5em auto;
 padding:0 1em;color:#1a1a1a;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #0072B2;padding-bottom:.15em;margin-top:1.8em}
nav a{margin-right:1.2em}
table{border-collapse:collapse;font-size:14px;margin:.6em 0}
td,th{border:1px solid #c8c8c8;padding:4px 9px;text-align:right;white-space:nowrap}
td:nth-child(2),th:nth-child(2){text-align:left}
th{background:#eef3f8;cursor:pointer;user-select:none;position:sticky;top:0}
th[title]{text-decoration:underline dotted}
th.asc::after{content:' \\25B2'}th.desc::after{content:' \\25BC'}
tbody tr:nth-child(even){background:#f8f8f8}
tbody tr:hover{background:#fff4d6}
.first td{font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#444}
.notes li{margin:.25em 0}.status{font-size:15px}
dl dt{font-weight:600;margin-top:.5em}dl dd{margin-left:1.5em}
.scroll{overflow-x:auto}
"""

# Click a header to sort by it (again to reverse); numbers by value, '-' last.
SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click',function(){
    var table=th.closest('table'),body=table.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
    var asc=!th.classList.contains('asc');
    table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
    th.classList.add(asc?'asc':'desc');
    var rows=Array.prototype.slice.call(body.rows);
    function key(r){var v=r.cells[i].getAttribute('data-v');var n=parseFloat(v);
      return v===''?null:(isNaN(n)||!/^[-+0-9.eE]+$/.test(v)?v:n);}
    rows.sort(function(a,b){var x=key(a),y=key(b);if(x===null)return 1;if(y===null)return -1;
      var c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
  });
});
document.body.setAttribute('data-ready','1');
// For checks (tests, a headless browser): the decoded width of every image once the page has loaded.
window.addEventListener('load',function(){document.body.setAttribute('data-image-widths',
  Array.prototype.map.call(document.images,function(i){return i.complete?i.naturalWidth:0;}).join(','));});
"""


def html_page(
    title: str,
    status: Sequence[str],
    table: pd.DataFrame,
    notes: Sequence[str],
    figures: Mapping[str, Path],
    extra_tables: Sequence[tuple[str, Table]] = (),
    captions: Mapping[str, str] | None = None,
) -> str:
    """The page: status, the rank table (sortable, hover definitions), notes, figures (samples included),
    further tables and the definitions; everything inline."""
    captions = captions or {}
    headers, rows = rank_table_view(table)
    samples = {k: v for k, v in figures.items() if k.lower().startswith("samples")}
    plots = {k: v for k, v in figures.items() if k not in samples}
    nav = ['<a href="#ranks">Ranks</a>', '<a href="#figures">Figures</a>']
    nav += ['<a href="#samples">Samples</a>'] if samples else []
    nav += ['<a href="#tables">Tables</a>'] if extra_tables else []
    nav += ['<a href="#definitions">Definitions</a>']
    body = [f"<h1>{esc(title)}</h1>", "<nav>" + "".join(nav) + "</nav>",
            *[f'<p class="status">{esc(s)}</p>' for s in status],
            '<h2 id="ranks">Average rank</h2>',
            "<p>Ordered by rank; click a header to sort, hover over it for its definition.</p>",
            f'<div class="scroll">{table_html(headers, rows, table_id="rank-table")}</div>',
            '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes if n) + "</ul>",
            '<h2 id="figures">Figures</h2>',
            *[figure_html(name, path, captions.get(name, "")) for name, path in plots.items()]]
    if samples:
        body += ['<h2 id="samples">Samples</h2>',
                 "<p>Sample k has the same prompt and initial noise in every recipe and sampler setting (common "
                 "random noise), so each column compares like with like. Rows follow the rank order.</p>",
                 *[figure_html(name, path, captions.get(name, "")) for name, path in samples.items()]]
    if extra_tables:
        body.append('<h2 id="tables">Tables</h2>')
        for name, tab in extra_tables:
            body += [f"<h3>{esc(name)}</h3>", f'<div class="scroll">{plain_table_html(tab)}</div>']
    terms = [(h, definition(h)) for h in headers]
    body += ['<h2 id="definitions">Definitions</h2>', "<dl>"
             + "".join(f"<dt>{esc(t)}</dt><dd>{esc(d)}</dd>" for t, d in [*TERMS, *terms]) + "</dl>"]
    page = "".join(body)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{page}<script>{SCRIPT}</script></body></html>\n")
