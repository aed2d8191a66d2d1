"""The report a researcher reads: labelled sample grids, sample comparison sheets, a self-contained HTML file
(checked by parsing it, and in a real headless browser), readable figures, no meaningless messages."""
import base64
import html.parser
import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from src.evaluation.grids import cut_grid, read_grid, read_prompts, save_labelled_grid, to_uint8
from src.ranking.report import build_report, main, notes
from src.ranking.synthetic import write_synthetic_sweep

RECIPES = ("rf/lognorm(0.00, 1.00)", "eps/linear", "edm(-1.20, 1.20)")
SETTINGS = [(5, 5.0), (25, 5.0), (50, 5.0)]
CHROMIUM = Path("/usr/bin/chromium")


# ---- grids ------------------------------------------------------------------------------------------------------
def test_labelled_grid_upscales_cells_and_reads_back_exactly(tmp_path):
    images = torch.rand(20, 3, 16, 16) * 2 - 1
    prompts = [f"a photo of a digit {k}" for k in range(20)]
    path = save_labelled_grid(images, prompts, tmp_path / "grid.png")
    with Image.open(path) as png:
        layout = json.loads(png.info["flowsweep-grid"])
        assert layout["cell"] == [96, 96] and layout["ncol"] == 8 and layout["caption_h"] > 0
        assert png.size[0] >= 8 * 96 and png.size[1] >= 3 * (96 + layout["caption_h"])
    assert np.array_equal(read_grid(None, path), to_uint8(images))  # the cells, downscaled back
    assert not list(tmp_path.glob(".*tmp"))
    grey = save_labelled_grid(torch.zeros(2, 1, 8, 8), None, tmp_path / "grey.png")  # no prompts, one channel
    assert read_grid(None, grey).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="prompts: 1 for 2 images"):
        save_labelled_grid(torch.zeros(2, 3, 8, 8), ["one"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"expected shape \(B, 1 or 3, H, W\)"):
        save_labelled_grid(torch.zeros(2, 8, 8), None, tmp_path / "bad.png")


def test_each_cell_is_at_least_min_cell_and_captioned_with_its_own_prompt(tmp_path, monkeypatch):
    """Cells of samples whose side does not divide MIN_CELL are still at least MIN_CELL (the smallest integer factor
    reaching it); non-square samples read back whole; the caption under cell k is prompt k."""
    from src.evaluation import grids

    assert grids.upscale(np.zeros((10, 10, 3), np.uint8)).size == (100, 100)  # 10x, not 9x (90 px)
    assert grids.upscale(np.zeros((16, 40, 3), np.uint8)).size == (240, 96)
    tall = torch.rand(3, 3, 12, 8) * 2 - 1
    path = save_labelled_grid(tall, None, tmp_path / "tall.png")
    assert np.array_equal(read_grid(None, path), to_uint8(tall))
    assert np.array_equal(read_grid(None, path, 2), to_uint8(tall[:2]))  # the first n cells only
    one = grids.wrap("a photo of a handwritten nine", 96, grids.font(11), max_lines=1)  # two lines' worth
    assert len(one) == 1 and one[0].endswith("...")
    captions = []
    monkeypatch.setattr(grids, "wrap", lambda text, *args: captions.append(text) or [text])
    grids.render_labelled_grid(torch.zeros(10, 1, 8, 8), [f"prompt {k}" for k in range(10)])
    assert captions == [f"prompt {k}" for k in range(10)]


def test_captions_wrap_at_spaces_within_the_cell():
    from src.evaluation.grids import font, wrap

    f = font(11)
    assert wrap("a photo of a handwritten nine", 96, f) == ["a photo of a", "handwritten nine"]
    assert wrap("a red circle", 500, f) == ["a red circle"]
    lines = wrap("one two three four five six seven eight nine ten", 60, f)
    assert len(lines) == 3 and lines[-1].endswith("...") and all(f.getlength(x) <= 60 for x in lines)
    assert all(f.getlength(x) <= 40 for x in wrap("supercalifragilistic", 40, f, max_lines=9))


def test_plain_torchvision_grid_is_cut_and_npz_grid_preferred(tmp_path):
    images = torch.rand(12, 3, 16, 16) * 2 - 1
    save_image((images + 1) / 2, tmp_path / "g.png", nrow=8)  # what the evaluation writes today
    assert np.array_equal(cut_grid(tmp_path / "g.png", 12), to_uint8(images))
    other = torch.rand(12, 3, 16, 16) * 2 - 1
    np.savez(tmp_path / "g.npz", grid=other.numpy(), prompts=np.array([f"p{k}" for k in range(12)]))
    assert np.array_equal(read_grid(tmp_path / "g.npz", tmp_path / "g.png"), to_uint8(other))
    assert read_prompts(tmp_path / "g.npz") == [f"p{k}" for k in range(12)]
    np.savez(tmp_path / "h.npz", features=np.zeros(3))
    (tmp_path / "h.json").write_text(json.dumps({"prompts": ["a", "b"]}))
    assert read_prompts(tmp_path / "h.npz", tmp_path / "h.png") == ["a", "b"]
    assert read_grid(tmp_path / "missing.npz", tmp_path / "missing.png") is None


# ---- a synthetic sweep with sample grids ------------------------------------------------------------------------
def add_grids(sweep: Path, labelled: bool) -> None:
    """Write each record's grid as the evaluation does (labelled grid or plain torchvision grid), sample k of
    recipe r a flat grey that encodes (r, k)."""
    for results in sweep.rglob("results.json"):
        records = json.loads(results.read_text())
        for rec in records:
            npz = results.parent / rec["arrays"]
            r = RECIPES.index(rec["recipe"])
            images = torch.stack([torch.full((3, 16, 16), -1 + 0.2 * r + 0.02 * k) for k in range(16)])
            if labelled:
                save_labelled_grid(images, [f"a photo of a {k}" for k in range(16)], npz.with_suffix(".png"))
            else:
                save_image((images + 1) / 2, npz.with_suffix(".png"), nrow=8)
                npz.with_suffix(".json").write_text(json.dumps({"prompts": [f"prompt {k}" for k in range(16)]}))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multirun") / "demo"
    sweep = write_synthetic_sweep(root, recipes=RECIPES, datasets=("digits",), n_samples=16, n_reference=16, dim=2,
                                  sampler_settings=SETTINGS)
    add_grids(sweep, labelled=True)
    out = tmp_path_factory.mktemp("report")
    with io.StringIO() as buffer:
        import contextlib

        with contextlib.redirect_stdout(buffer):
            assert main([str(sweep), "--out", str(out), "--bootstrap", "10"]) == 0
    return out


class Refs(html.parser.HTMLParser):
    """Every src and href of a page, the images' sources and the rank table's header titles."""

    def __init__(self):
        super().__init__()
        self.refs, self.images, self.titles, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.refs += [(tag, k, v) for k, v in attrs.items() if k in ("src", "href", "srcset", "action", "data")]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "th":
            self.titles.append(attrs.get("title", ""))


def test_html_report_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text()
    refs = Refs()
    refs.feed(text)
    for tag, key, value in refs.refs:  # only embedded data and in-page anchors
        assert value.startswith("data:image/png;base64,") or (key == "href" and value.startswith("#")), (tag, value)
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert "link" not in refs.tags and "iframe" not in refs.tags
    assert len(refs.images) == 5  # Pareto fronts, average ranks, metrics vs steps, two sample sheets
    for src in refs.images:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.load()
            assert min(image.size) > 100


def test_html_report_tables_are_ranked_defined_and_sortable(report_dir):
    text = (report_dir / "report.html").read_text()
    refs = Refs()
    refs.feed(text)
    assert all(refs.titles) and len(set(refs.titles)) > 5  # every header has its definition on hover
    ranks = pd.read_csv(report_dir / "ranks.csv")
    table = text[text.index('id="rank-table"'):text.index("</table>", text.index('id="rank-table"'))]
    positions = [table.index(f">{recipe}<") for recipe in ranks["recipe"]]
    assert positions == sorted(positions)  # rows in rank order
    assert ">all interval<" in table and ">all lo<" not in table  # lo/hi merged into one interval column
    assert 'class="sortable"' in text and "addEventListener('click'" in text
    assert 'id="definitions"' in text and "FID (CLIP features)" in text
    assert "Samples, digits: same prompts across recipes" in text
    assert "Samples, digits: one prompt across sampler settings" in text


class Cells(html.parser.HTMLParser):
    """The header and cell texts of the table with id `table_id`."""

    def __init__(self, table_id: str):
        super().__init__()
        self.table_id, self.inside, self.cell, self.headers, self.rows = table_id, False, None, [], []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.inside = dict(attrs).get("id") == self.table_id
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("th", "td"):
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("th", "td"):
            (self.headers if tag == "th" else self.rows[-1]).append(self.cell)
            self.cell = None


def test_html_rank_table_shows_seed_counts_as_integers(report_dir):
    """'seeds min' as 'seeds' (1, not 1.00), with its own definition on hover."""
    text = (report_dir / "report.html").read_text()
    cells = Cells("rank-table")
    cells.feed(text)
    rows = [r for r in cells.rows if r]
    for column in ("seeds", "seeds min"):
        at = cells.headers.index(column)
        assert [r[at] for r in rows] == ["1"] * len(RECIPES), column
    assert "Fewest training seeds the recipe has in any one control setting" in text


def test_sample_sheets_show_the_same_sample_across_recipes_and_settings(tmp_path):
    from src.ranking.aggregate import load_sweep
    from src.ranking.samples import chosen_setting, sample_figures

    sweep = write_synthetic_sweep(tmp_path / "s", recipes=RECIPES, datasets=("digits",), n_samples=16,
                                  n_reference=16, dim=2, sampler_settings=SETTINGS)
    add_grids(sweep, labelled=False)  # plain grids, prompts in a JSON beside them
    records = load_sweep([sweep]).records
    assert chosen_setting(records) == ("25 steps, cfg 5.0", True)
    order = ["edm(-1.20, 1.20)", "rf/lognorm(0.00, 1.00)", "eps/linear"]
    figures = sample_figures(records, tmp_path / "out", order)
    sheet = np.asarray(Image.open(figures["Samples, digits: same prompts across recipes"]).convert("RGB"))[..., 0]
    # row i is recipe order[i], column k its sample k (a flat grey encoding (recipe, k)), each at least 96x96 px
    centres = {}
    for recipe in order:
        for k in range(8):
            grey = (0.2 * RECIPES.index(recipe) + 0.02 * k) * 127.5  # neighbours differ by 2.55 levels
            ys, xs = np.nonzero(np.abs(sheet.astype(float) - grey) <= 1)
            assert len(ys) >= 96 * 96, (recipe, k)
            centres[recipe, k] = (ys.mean(), xs.mean())
    for k in range(8):
        rows = [centres[recipe, k][0] for recipe in order]
        assert rows == sorted(rows)  # rows follow the rank order
    for recipe in order:
        columns = [centres[recipe, k][1] for k in range(8)]
        assert columns == sorted(columns)  # sample k in column k
    strip = Image.open(figures["Samples, digits: one prompt across sampler settings"])
    assert strip.size[0] > 3 * 96  # three settings side by side


def test_one_recipe_report_says_nothing_about_separating_pairs(tmp_path):
    sweep = write_synthetic_sweep(tmp_path / "one", recipes=("eps/linear",), datasets=("digits",), n_samples=8,
                                  n_reference=8, dim=2, sampler_settings=SETTINGS)
    report = build_report([sweep], draws=5)
    assert not any("separat" in line for line in notes(report))
    assert any("percentile interval" in line for line in notes(report))  # the interval still explained


def test_pareto_title_and_legend_clear_the_panels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from src.ranking.aggregate import rank_table
    from src.ranking.plots import OKABE_ITO, front_style, plot_pareto_fronts, series_style

    ranked = rank_table(pd.DataFrame({
        "recipe": ["a", "b", "c"] * 2, "dataset": "digits", "setting": ["25 steps, cfg 5.0"] * 3 + ["5 steps, cfg 5.0"] * 3,
        "steps": [25] * 3 + [5] * 3, "cfg": 5.0, "ema": True, "clip_score": [0.3, 0.2, 0.1, 0.3, 0.25, 0.2],
        "fid_clip": [0.1, 0.2, 0.3, 0.1, 0.3, 0.05],
    }))
    fig = plot_pareto_fronts(ranked)
    renderer = FigureCanvasAgg(fig).get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        if ax.axison:
            top = ax.title.get_window_extent(renderer).y1
            assert top < legend.y0 < legend.y1 < title.y0
    assert front_style(1) != front_style(2) and series_style(0)[0] == OKABE_ITO[0]
    assert len({series_style(i) for i in range(12)}) == 12


# ---- a real browser ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_renders_in_a_headless_browser(report_dir, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (/usr/bin/chromium): apt-get install -y chromium")
    page = (report_dir / "report.html").read_text()
    # Script errors are recorded on the page itself, by a handler installed before anything else runs.
    probe = ("<script>window.addEventListener('error',function(e){document.documentElement.setAttribute("
             "'data-errors',(document.documentElement.getAttribute('data-errors')||'')+e.message+';');});</script>")
    checked = tmp_path / "report.html"
    checked.write_text(page.replace("<head>", "<head>" + probe, 1))
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", checked.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom and "data-errors" not in dom.split("<head>", 1)[0], dom[:300]  # <html ...>
    widths = dom.split('data-image-widths="', 1)[1].split('"', 1)[0].split(",")
    assert len(widths) == 5 and all(int(w) > 100 for w in widths), widths  # every image present and decoded
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1400,1800",
                    f"--screenshot={shot}", checked.as_uri()], capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1400, 1800)
        assert len(np.unique(np.asarray(image.convert("L")))) > 20  # rendered content, not a blank page


def test_wandb_gets_the_figures_samples_and_html_report(tmp_path, monkeypatch):
    from src.ranking.publish import publish_wandb
    from src.ranking.report import write_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = write_synthetic_sweep(tmp_path / "sweep", recipes=RECIPES[:2], datasets=("digits",), n_samples=16,
                                  n_reference=8, dim=2, sampler_settings=[(5, 5.0), (25, 5.0)])
    add_grids(sweep, labelled=True)
    report = build_report([sweep], draws=0)
    import wandb

    try:
        run_dir = Path(publish_wandb(report, write_report(report, tmp_path / "report"), project="test-rank-report"))
    finally:
        wandb.teardown()  # W&B keeps its first settings (WANDB_DIR) per process; later tests set their own
    media = run_dir / "media"
    images = sorted(p.name.split("_0_")[0] for p in (media / "images").rglob("*.png"))
    assert images == ["average_ranks", "metrics_vs_steps", "pareto_fronts", "samples_digits", "steps_cfg_digits"]
    assert [p.parent.name for p in (media / "images").rglob("samples_digits*.png")] == ["samples"]
    assert len(list((media / "html").glob("report*.html"))) == 1


def test_definitions_say_what_the_report_computes():
    from src.ranking.html import TERMS, definition

    interval = definition("all interval")
    assert "training seeds" in interval and "not training seeds" not in interval  # the bootstrap resamples seeds
    assert "bootstrap draws" in definition("P(front 1) all") and "settings" in definition("P(front 1) all")
    fid = dict(TERMS)["FID (CLIP features)"]
    assert "0.02" not in fid and not fid.startswith("Frechet distance between the Gaussian statistics of L2")
    assert "training seeds" in dict(TERMS)["Bootstrap interval"]


def test_chosen_setting_prefers_table2_with_ema_else_the_most_shared_setting():
    """The side-by-side sheet shows the paper's Table 2 setting (25 steps, largest CFG, EMA weights; a raw-weights
    run at a larger CFG does not count); without it, the setting most recipes share, ties to more steps."""
    from src.ranking.samples import chosen_setting

    def records(rows):
        return pd.DataFrame(rows, columns=["recipe", "setting", "ema", "steps", "cfg"])

    table2 = records([("a", "25 steps, cfg 1.0", True, 25, 1.0), ("a", "25 steps, cfg 5.0", True, 25, 5.0),
                      ("a", "25 steps, cfg 9.0", False, 25, 9.0)])
    assert chosen_setting(table2) == ("25 steps, cfg 5.0", True)
    shared = records([("a", "5 steps, cfg 5.0", True, 5, 5.0), ("b", "5 steps, cfg 5.0", True, 5, 5.0),
                      ("a", "50 steps, cfg 1.0", False, 50, 1.0), ("b", "50 steps, cfg 1.0", False, 50, 1.0),
                      ("a", "10 steps, cfg 9.0", True, 10, 9.0)])
    assert chosen_setting(shared) == ("50 steps, cfg 1.0", False)
    assert chosen_setting(shared.iloc[:0]) is None


def test_sheet_rows_follow_the_rank_order_then_the_unranked_recipes_at_most_max_recipes():
    """Rows: the ranked recipes present (a ranked recipe without samples takes no row), then the others as they
    come, cut to the best MAX_RECIPES."""
    from src.ranking.samples import MAX_RECIPES, _ordered_recipes

    records = pd.DataFrame({"recipe": ["c", "a", "b", "a"]})
    assert _ordered_recipes(records, ["b", "gone", "a"]) == ["b", "a", "c"]
    many = pd.DataFrame({"recipe": [f"r{i}" for i in range(MAX_RECIPES + 3)]})
    assert _ordered_recipes(many, None) == [f"r{i}" for i in range(MAX_RECIPES)]


def test_one_sampler_setting_gives_no_settings_sheet(tmp_path):
    """The steps x CFG sheet compares sampler settings: with one setting there is nothing to compare, so no sheet."""
    from src.ranking.aggregate import load_sweep
    from src.ranking.samples import sample_figures

    sweep = write_synthetic_sweep(tmp_path / "s", recipes=RECIPES[:2], datasets=("digits",), n_samples=16,
                                  n_reference=16, dim=2, sampler_settings=[(25, 5.0)])
    add_grids(sweep, labelled=False)
    figures = sample_figures(load_sweep([sweep]).records, tmp_path / "out")
    assert list(figures) == ["Samples, digits: same prompts across recipes"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples_digits.png"]


def _grid_npz(path: Path, values, prompts=None) -> Path:
    """An evaluation npz whose `grid` holds one flat 2x2 sample per value (uint8, (k, 3, 2, 2))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None], (len(values), 3, 2, 2))
    extra = {} if prompts is None else {"prompts": np.asarray(prompts)}
    np.savez(path, grid=np.ascontiguousarray(grid), **extra)
    return path


def _captured_sheets(monkeypatch) -> dict:
    """save_sheet replaced: file name -> (rows as (recipe, [sample value or None]), column labels, title)."""
    import src.ranking.samples as samples

    sheets = {}

    def save(rows, labels, path, title=None):
        cells = [(recipe, [None if im is None else int(im[0, 0, 0]) for im in images]) for recipe, images in rows]
        sheets[Path(path).name] = (cells, list(labels), title)

    monkeypatch.setattr(samples, "save_sheet", save)
    return sheets


def _sample_record(recipe, arrays, setting=("25 steps, cfg 5.0", 25, 5.0), ema=True, **extra) -> dict:
    label, steps, cfg = setting
    return {"recipe": recipe, "dataset": "digits", "setting": label, "steps": steps, "cfg": cfg, "ema": ema,
            "arrays": str(arrays), **extra}


def test_sample_sheet_finds_a_relative_npz_in_the_run_dir_and_shows_at_most_n_samples(tmp_path, monkeypatch):
    """Records name their arrays relative to the run directory (the report runs from anywhere), and a run
    evaluated with 3 samples shows those 3, not the rest of a larger grid array."""
    from src.ranking.samples import sample_figures

    sheets = _captured_sheets(monkeypatch)
    _grid_npz(tmp_path / "run" / "eval" / "a.npz", range(10, 90, 10), prompts=[f"p{k}" for k in range(8)])
    records = pd.DataFrame([_sample_record("a", "eval/a.npz", run_dir=str(tmp_path / "run"), n_samples=3)])
    sample_figures(records, tmp_path / "out")
    rows, labels, _ = sheets["samples_digits.png"]
    assert rows == [("a", [10, 20, 30])] and labels == ["p0", "p1", "p2"]


def test_sample_sheet_captions_cycle_through_a_small_evaluation_set(tmp_path, monkeypatch):
    """Without stored prompts the captions come from the evaluation shards, prompt k being caption k % N: with
    3 captions and 5 samples the columns read c0 c1 c2 c0 c1."""
    from src.data.shards import write_shards
    from src.ranking.samples import sample_figures

    write_shards(tmp_path / "eval_set", torch.randn(3, 1, 2, 2), torch.zeros(3, 2, 4), torch.zeros(3, 4),
                 ["c0", "c1", "c2"], encoder_names=["enc"])
    sheets = _captured_sheets(monkeypatch)
    record = _sample_record("a", _grid_npz(tmp_path / "a.npz", [1, 2, 3, 4, 5]),
                            config={"data": {"eval_dir": str(tmp_path / "eval_set")}})
    sample_figures(pd.DataFrame([record]), tmp_path / "out")
    assert sheets["samples_digits.png"][1] == ["c0", "c1", "c2", "c0", "c1"]


def test_sample_sheet_keeps_the_first_prompts_found_and_labels_the_widest_row(tmp_path, monkeypatch):
    """The prompts are the same in every recipe: the first recipe that has them names the columns (a later one
    without prompts does not blank them), and there is a label for every column of the widest row."""
    from src.ranking.samples import sample_figures

    sheets = _captured_sheets(monkeypatch)
    records = pd.DataFrame([
        _sample_record("a", _grid_npz(tmp_path / "a.npz", [1, 2, 3], prompts=[f"p{k}" for k in range(8)])),
        _sample_record("b", _grid_npz(tmp_path / "b.npz", [11, 12, 13, 14, 15]))])
    sample_figures(records, tmp_path / "out", ["a", "b"])
    rows, labels, _ = sheets["samples_digits.png"]
    assert rows == [("a", [1, 2, 3]), ("b", [11, 12, 13, 14, 15])]
    assert labels == ["p0", "p1", "p2", "p3", "p4"]


def test_settings_sheet_orders_settings_by_cfg_then_steps_with_ema_samples_and_the_first_prompt(tmp_path,
                                                                                              monkeypatch):
    """The steps x CFG sheet: one column per setting (once, however many recipes have it), ordered by CFG then
    steps; EMA samples when the sweep evaluated EMA weights; a recipe with a gap keeps its row, one with no sample
    at all takes none; the title quotes the first recipe's prompt (a recipe lacking the first setting is skipped)."""
    from src.ranking.samples import sample_figures

    sheets = _captured_sheets(monkeypatch)
    settings = [("5 steps, cfg 9.0", 5, 9.0), ("50 steps, cfg 5.0", 50, 5.0), ("10 steps, cfg 5.0", 10, 5.0),
                ("25 steps, cfg 1.0", 25, 1.0)]  # neither by cfg nor by steps
    rows = []
    for r, (recipe, prompt) in enumerate((("a", "cat"), ("b", "dog"), ("c", "owl"))):
        for s, setting in enumerate(settings):
            for ema in (True, False):
                if (recipe == "a" and s == 3) or (recipe == "c" and ema):
                    continue  # a lacks the first column's setting; c has raw-weights samples only
                value = 100 * r + 10 * s + (1 if ema else 5)
                npz = _grid_npz(tmp_path / f"{recipe}{s}{ema}.npz", [value], prompts=[prompt])
                rows.append(_sample_record(recipe, npz, setting, ema))
    sample_figures(pd.DataFrame(rows), tmp_path / "out", ["a", "b", "c"])
    cells, labels, title = sheets["steps_cfg_digits.png"]
    assert labels == ["25 steps, cfg 1.0", "10 steps, cfg 5.0", "50 steps, cfg 5.0", "5 steps, cfg 9.0"]
    assert cells == [("a", [None, 21, 11, 1]), ("b", [131, 121, 111, 101])]
    assert "'cat'" in title and "EMA weights" in title


def test_rank_table_cells_show_small_numbers_booleans_and_intervals_readably():
    """Cells: values under 0.01 keep 3 significant digits (not '0.00'), booleans read yes/no, an interval [lo, hi]
    sorts by its lower end, a missing value is '-'."""
    from src.ranking.html import _number

    assert _number(0.00512) == ("0.00512", "0.00512") and _number(0.02)[0] == "0.02"
    assert _number(True) == ("yes", "1") and _number(np.bool_(False)) == ("no", "0")
    assert _number((1.0, 2.5)) == ("[1.00, 2.50]", "1.0")
    assert _number(float("nan")) == ("-", "") and _number(np.int64(3)) == ("3", "3")


def test_rank_table_view_numbers_rows_merges_intervals_and_shows_whole_counts_as_integers():
    """Rows are numbered from 1; an 'X lo'/'X hi' pair becomes 'X interval' (after X, or at the end when X is not a
    column); counts that are whole numbers drop their decimals, others keep them."""
    from src.ranking.html import rank_table_view

    table = pd.DataFrame({"all": [1.5, 2.0], "all lo": [1.0, 1.5], "all hi": [2.0, 2.5], "n all": [3.0, 2.0],
                          "n 5 steps": [1.5, 2.0], "5 steps lo": [1.0, 2.0], "5 steps hi": [3.0, 4.0]},
                         index=pd.Index(["a", "b"], name="recipe"))
    headers, rows = rank_table_view(table)
    assert headers == ["#", "recipe", "all", "all interval", "n all", "n 5 steps", "5 steps interval"]
    assert rows[0] == [1, "a", 1.5, (1.0, 2.0), 3, 1.5, (1.0, 3.0)]
    assert rows[1][0] == 2 and type(rows[1][4]) is int and type(rows[1][5]) is not int


def test_html_page_files_samples_under_samples_and_links_only_sections_it_has(tmp_path):
    """A figure titled 'Samples, ...' goes to the Samples section; without sample sheets or extra tables the page
    links to no such section; empty notes leave no empty bullet."""
    from src.ranking.html import html_page

    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG")
    table = pd.DataFrame({"all": [1.0]}, index=pd.Index(["a"], name="recipe"))
    plain = html_page("t", [], table, ["", "a note"], {"Pareto fronts": png})
    assert 'href="#samples"' not in plain and 'href="#tables"' not in plain
    assert "<li></li>" not in plain and "<li>a note</li>" in plain
    page = html_page("t", [], table, [], {"Samples, digits: x": png, "Pareto fronts": png})
    assert 'href="#samples"' in page
    assert page.index('id="samples"') < page.index('id="samples-digits-x"')


def test_front_styles_and_legend_name_fronts_beyond_the_fifth_as_one_grey_group():
    """Fronts 1-5 have their own colour and marker, later ones share grey; the legend lists the fronts present,
    the later ones once as 'front 6+'."""
    from src.ranking.plots import FRONT_STYLES, LATER_FRONT, front_style, plot_pareto_fronts

    assert front_style(5) == FRONT_STYLES[4] and front_style(6) == LATER_FRONT and front_style(0) == LATER_FRONT
    ranked = pd.DataFrame({"recipe": list("abcdefg"), "dataset": "digits", "setting": "25 steps, cfg 5.0",
                           "steps": 25, "cfg": 5.0, "ema": True, "clip_score": np.linspace(0.1, 0.7, 7),
                           "fid_clip": np.linspace(0.1, 0.7, 7), "front": [1, 2, 3, 4, 5, 6, 7]})
    labels = [t.get_text() for t in plot_pareto_fronts(ranked).legends[0].get_texts()]
    assert labels == ["front 1", "front 2", "front 3", "front 4", "front 5", "front 6+"]


def test_pareto_panels_name_the_entries_whose_metrics_are_not_finite():
    """A diverged entry (null CLIP score and FID: NaN) is ranked in the last front, which the legend lists, but has
    no point to draw: the panel showed the other entries only, and nothing said it was there. Now the panel names it
    with its front."""
    from src.ranking.aggregate import rank_table
    from src.ranking.plots import plot_pareto_fronts

    ranked = rank_table(pd.DataFrame({
        "recipe": ["a", "b", "eps/linear"], "dataset": "digits", "setting": "25 steps, cfg 5.0", "steps": 25,
        "cfg": 5.0, "ema": True, "clip_score": [0.3, 0.2, np.nan], "fid_clip": [0.1, 0.2, np.nan]}))
    assert ranked["front"].tolist() == [1, 2, 3]
    (ax,) = [ax for ax in plot_pareto_fronts(ranked).axes if ax.axison]
    assert "3: eps/linear (not finite, not drawn)" in [t.get_text() for t in ax.texts]


def test_steps_cfg_is_the_cfg_with_the_most_step_counts_ties_to_the_largest():
    """The metrics-vs-steps figure follows the steps sweep: the CFG with the most distinct step counts."""
    from src.ranking.plots import steps_cfg

    records = pd.DataFrame({"cfg": [1.0, 1.0, 1.0, 5.0, 5.0, 9.0, 9.0], "steps": [5, 25, 50, 5, 25, 5, 5]})
    assert steps_cfg(records) == 1.0
    assert steps_cfg(records[records["cfg"] > 1.0]) == 5.0  # 5.0 has two step counts, 9.0 one
    tied = pd.DataFrame({"cfg": [1.0, 1.0, 5.0, 5.0], "steps": [5, 25, 5, 25]})
    assert steps_cfg(tied) == 5.0 and steps_cfg(tied.iloc[:0]) is None
