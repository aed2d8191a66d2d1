"""Sample grids a person can judge: cells upscaled (nearest neighbour) with their prompt written under each.

`save_labelled_grid(images, prompts, path)` writes the evaluation's grid PNG; `read_grid` gets the sample images back
(from the npz's `grid` array when the evaluation saved one, else by cutting the PNG: the PNG records its layout in a
text chunk, and a plain torchvision grid is cut by its known padding); `save_sheet` draws a table of images with row
and column labels (the report's side-by-side comparisons). Pillow only, with matplotlib's bundled DejaVu Sans, so the
output is the same on every machine.
"""
from __future__ import annotations

import io
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from src.utils.io import atomic_write_bytes

MIN_CELL = 96  # pixels per cell side at least (16 px samples are upscaled 6x)
PAD = 4
LAYOUT_KEY = "flowsweep-grid"  # PNG text chunk: the cell layout, for read_grid
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


@lru_cache(maxsize=8)
def font(size: int = 11) -> ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's own files (always installed with it)."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def quantize(images) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] (torch or numpy) -> (B, C, H, W) uint8, as the PNGs hold them (C = 1 or 3); uint8
    input is taken as quantized already."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        array = images
    else:
        array = images.detach().cpu().float().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
        # NaN (a diverged sample) as black: its cast to uint8 is undefined (numpy warns).
        array = np.clip(np.nan_to_num((array + 1.0) * 127.5 + 0.5, nan=0.0), 0, 255).astype(np.uint8)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise ValueError(f"images: expected shape (B, 1 or 3, H, W), got {tuple(array.shape)}")
    return array


def to_uint8(images) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] (torch or numpy), or quantized already -> (B, H, W, 3) uint8; one channel is repeated
    to three."""
    array = quantize(images).transpose(0, 2, 3, 1)
    return np.repeat(array, 3, axis=3) if array.shape[3] == 1 else array


def upscale(image: np.ndarray, min_side: int = MIN_CELL) -> Image.Image:
    """(H, W, 3) uint8 -> PIL image enlarged by the smallest integer factor reaching min_side, nearest neighbour."""
    h, w = image.shape[:2]
    factor = max(1, math.ceil(min_side / max(1, min(h, w))))
    return Image.fromarray(image).resize((w * factor, h * factor), Image.NEAREST)


def wrap(text: str, width_px: int, fnt, max_lines: int = 3) -> list[str]:
    """text broken at spaces into lines no wider than width_px (a word too long for a line is cut between
    characters); at most max_lines, the last one ending in '...' if text was left out."""
    fits = lambda line: fnt.getlength(line) <= width_px  # noqa: E731
    lines: list[str] = []
    for word in text.split() or [""]:
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and fits(candidate):
            lines[-1] = candidate
            continue
        while not fits(word) and len(word) > 1:  # split a long word
            cut = max(1, max(k for k in range(1, len(word) + 1) if fits(word[:k]) or k == 1))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _text_block(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Sequence[str], fnt, width: int,
                center: bool = True) -> None:
    x, y = xy
    step = fnt.size + 2
    for i, line in enumerate(lines):
        dx = (width - fnt.getlength(line)) / 2 if center else 0
        draw.text((x + dx, y + i * step), line, fill=INK, font=fnt)


def render_labelled_grid(images, prompts: Sequence[str] | None, nrow: int = 8, min_cell: int = MIN_CELL,
                         caption_lines: int = 3, font_size: int = 11) -> Image.Image:
    """The grid image: nrow cells per row, each upscaled to at least min_cell px with its prompt under it."""
    pixels = to_uint8(images)
    if prompts is not None and len(prompts) < len(pixels):
        raise ValueError(f"prompts: {len(prompts)} for {len(pixels)} images; need one per image")
    cells = [upscale(p, min_cell) for p in pixels]
    cw, ch = cells[0].size if cells else (min_cell, min_cell)
    fnt = font(font_size)
    caption_h = (fnt.size + 2) * caption_lines + PAD if prompts is not None else 0
    ncol = max(1, min(nrow, len(cells)))
    nrows = max(1, math.ceil(len(cells) / ncol))
    sheet = Image.new("RGB", (PAD + ncol * (cw + PAD), PAD + nrows * (ch + caption_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, cell in enumerate(cells):
        x = PAD + (k % ncol) * (cw + PAD)
        y = PAD + (k // ncol) * (ch + caption_h + PAD)
        sheet.paste(cell, (x, y))
        if prompts is not None:
            _text_block(draw, (x, y + ch + 2), wrap(str(prompts[k]), cw, fnt, caption_lines), fnt, cw)
    sheet.info["layout"] = {"n": len(cells), "ncol": ncol, "cell": [cw, ch], "pad": PAD, "caption_h": caption_h,
                            "size": [int(pixels.shape[2]), int(pixels.shape[1])] if len(pixels) else [0, 0]}
    return sheet


def png_bytes(image: Image.Image, layout: dict | None = None) -> bytes:
    """PNG encoding; layout (if any) stored in a text chunk."""
    info = PngInfo()
    if layout is not None:
        info.add_text(LAYOUT_KEY, json.dumps(layout))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, optimize=True)
    return buffer.getvalue()


def save_labelled_grid(images, prompts: Sequence[str] | None, path: str | Path, nrow: int = 8,
                       min_cell: int = MIN_CELL) -> Path:
    """Write a PNG grid of images in [-1, 1] ((B, C, H, W)), each cell at least min_cell px (nearest-neighbour
    upscaling) with its prompt under it (prompts=None: no captions); atomically. The layout goes into the PNG so
    read_grid can cut the samples back out."""
    sheet = render_labelled_grid(images, prompts, nrow=nrow, min_cell=min_cell)
    return atomic_write_bytes(path, png_bytes(sheet, sheet.info["layout"]))


def save_sheet(rows: Sequence[tuple[str, Sequence[np.ndarray | None]]], column_labels: Sequence[str],
               path: str | Path | None = None, title: str | None = None, min_cell: int = MIN_CELL,
               font_size: int = 12) -> Image.Image:
    """A table of images: one row per (label, images (H, W, 3) uint8 or None for a gap), labelled columns.

    Written atomically to path when given; returns the image.
    """
    fnt, small = font(font_size + 2), font(font_size)
    cells = [[upscale(im, min_cell) if im is not None else None for im in images] for _, images in rows]
    sizes = [c.size for row in cells for c in row if c is not None] or [(min_cell, min_cell)]
    cw, ch = max(s[0] for s in sizes), max(s[1] for s in sizes)
    ncol = max([len(column_labels)] + [len(r) for r in cells])
    label_w = min(260, max([math.ceil(small.getlength(label)) + 2 * PAD for label, _ in rows] + [60]))
    head_lines = [wrap(str(c), cw, small, 3) for c in column_labels]
    head_h = (small.size + 2) * max([len(h) for h in head_lines] + [1]) + PAD
    title_h = fnt.size + 3 * PAD if title else 0
    width = label_w + ncol * (cw + PAD) + PAD
    height = title_h + head_h + len(rows) * (ch + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), title, fill=INK, font=fnt)
    for j, lines in enumerate(head_lines):
        _text_block(draw, (label_w + j * (cw + PAD), title_h), lines, small, cw)
    for i, ((label, _), row) in enumerate(zip(rows, cells)):
        y = title_h + head_h + i * (ch + PAD)
        lines = wrap(str(label), label_w - 2 * PAD, small, 4)
        _text_block(draw, (PAD, y + (ch - len(lines) * (small.size + 2)) // 2), lines, small, label_w - 2 * PAD,
                    center=False)
        for j, cell in enumerate(row):
            if cell is not None:
                sheet.paste(cell, (label_w + j * (cw + PAD), y))
    if path is not None:
        atomic_write_bytes(path, png_bytes(sheet))
    return sheet


# ---- reading samples back -----------------------------------------------------------------------------
def cut_grid(png: str | Path, n: int | None = None) -> np.ndarray:
    """The sample images (k, H, W, 3) uint8 of a grid PNG: a labelled grid (layout in its text chunk, cells
    downscaled back to the sample size) or a plain torchvision grid (8 per row, 2 px padding, square cells)."""
    with Image.open(png) as img:
        layout = img.info.get(LAYOUT_KEY)
        pixels = np.asarray(img.convert("RGB"))
    if layout:
        lay = json.loads(layout)
        (cw, ch), pad, cap, ncol = lay["cell"], lay["pad"], lay["caption_h"], lay["ncol"]
        sw, sh = lay["size"]
        count = lay["n"] if n is None else min(n, lay["n"])
        out = []
        for k in range(count):
            x, y = pad + (k % ncol) * (cw + pad), pad + (k // ncol) * (ch + cap + pad)
            out.append(pixels[y:y + ch:max(1, ch // sh), x:x + cw:max(1, cw // sw)][:sh, :sw])
        return np.stack(out) if out else np.zeros((0, sh, sw, 3), np.uint8)
    pad, ncol = 2, 8  # torchvision.utils.make_grid's defaults, as the evaluation used them
    height, width = pixels.shape[:2]
    side = (width - pad) // ncol - pad
    if side <= 0 or (width - pad) % ncol:
        # fewer than 8 samples: one row of square cells
        side = height - 2 * pad
        ncol = (width - pad) // (side + pad)
    nrows = (height - pad) // (side + pad)
    count = ncol * nrows if n is None else min(n, ncol * nrows)
    return np.stack([pixels[pad + (k // ncol) * (side + pad):][:side, pad + (k % ncol) * (side + pad):][:, :side]
                     for k in range(count)])


def _npz_array(npz: str | Path | None, name: str) -> np.ndarray | None:
    """One array of an npz file; None when the file or the array is absent, or the file is damaged (the report
    then falls back to the PNG, as for a missing file, and lists the record as unreadable)."""
    if npz is None or not Path(npz).is_file():
        return None
    try:
        with np.load(npz, allow_pickle=False) as data:
            return data[name] if name in data.files else None
    except Exception:  # noqa: BLE001 -- zipfile, zlib and numpy's header parser raise many kinds
        return None


def read_grid(npz: str | Path | None, png: str | Path | None, n: int | None = None) -> np.ndarray | None:
    """The evaluation's grid samples (k, H, W, 3) uint8: the npz's `grid` array ((k, C, H, W) uint8, or in [-1, 1]
    as float in arrays written before) when present, else cut from the PNG; None when neither is readable."""
    grid = _npz_array(npz, "grid")
    if grid is not None:
        grid = to_uint8(grid)
        return grid if n is None else grid[:n]
    if png is not None and Path(png).is_file():
        return cut_grid(png, n)
    return None


def read_prompts(npz: str | Path | None, png: str | Path | None = None) -> list[str] | None:
    """The grid's prompts: the npz's `prompts` array, else `prompts` in a JSON beside the PNG; None otherwise."""
    prompts = _npz_array(npz, "prompts")
    if prompts is not None:
        return [str(p) for p in prompts]
    if png is not None:
        side = Path(png).with_suffix(".json")
        if side.is_file():
            try:
                prompts = json.loads(side.read_text()).get("prompts")
            except (ValueError, AttributeError):
                prompts = None
            if isinstance(prompts, list):
                return [str(p) for p in prompts]
    return None
