"""A labelled picture of demo samples, drawn with PIL only: rows are references, columns are how they were applied."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..adapter.formats import atomic_write
from .world import to_pil


def draw_grid(path: str | os.PathLike, title: str, references: list[torch.Tensor], row_labels: list[str],
              columns: list[str], cells: list[list[torch.Tensor]], cell_labels: list[list[str]],
              scale: int = 3) -> Path:
    """Write a grid PNG: a reference image and its label on the left of each row, one sample per column.

    Args:
        references: one image [3, h, w] in [0, 1] per row.
        cells: cells[row][column], images [3, h, w] in [0, 1].
        cell_labels: a short caption under each cell (e.g. the oracle's reading).
    """
    h, w = references[0].shape[-2:]
    cw, ch = w * scale, h * scale
    pad, label_h, head_h, left_w = 10, 14, 44, cw + 90
    width = left_w + len(columns) * (cw + pad) + pad
    height = head_h + len(references) * (ch + label_h + pad) + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 6), title, fill="black")
    draw.text((pad, 26), "reference", fill="black")
    for j, name in enumerate(columns):
        draw.text((left_w + j * (cw + pad), 26), name, fill="black")
    for i, (ref, label) in enumerate(zip(references, row_labels)):
        y = head_h + i * (ch + label_h + pad)
        img.paste(to_pil(ref).resize((cw, ch), Image.Resampling.NEAREST), (pad, y))
        draw.text((pad + cw + 6, y + ch // 2 - 6), label, fill="black")
        for j, cell in enumerate(cells[i]):
            x = left_w + j * (cw + pad)
            img.paste(to_pil(cell).resize((cw, ch), Image.Resampling.NEAREST), (x, y))
            draw.text((x, y + ch + 1), cell_labels[i][j], fill=(60, 60, 60))
    path = Path(path)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
