"""A loss curve as a PNG, drawn with PIL only (no plotting library needed)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw

from .adapter.formats import atomic_write


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(losses: list[float], path: str | os.PathLike, title: str = "training loss",
                size: tuple[int, int] = (640, 360)) -> Path:
    """Write the per-step losses (grey) and their moving average (blue) as a PNG with labelled axes."""
    if not losses:
        raise ValueError("no loss values to plot")
    w, h = size
    left, right, top, bottom = 64, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = len(losses)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, n - 1))
        y = top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        v = lo + (hi - lo) * frac
        _, y = xy(0, v)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{v:.4g}", fill="black")
    for i in sorted({0, (n - 1) // 2, n - 1}):
        x, _ = xy(i, lo)
        draw.line([x, h - bottom, x, h - bottom + 4], fill="black")
        draw.text((x - 8, h - bottom + 6), str(i + 1), fill="black")
    draw.text((left, 8), f"{title} ({n} steps; blue: moving average)", fill="black")
    draw.text((w // 2 - 12, h - 14), "step", fill="black")
    if n > 1:
        draw.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 170, 170), width=1)
        smooth = moving_average(losses, max(1, n // 20))
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 90, 200), width=2)
    else:
        x, y = xy(0, losses[0])
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 90, 200))
    path = Path(path)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
