"""Reads an image of the shapes world: which colour and which shape it shows, from pixels alone (no CLIP).

The image is first smoothed with a 3x3 box filter (generated samples keep some pixel noise). The background
is the median of the border pixels; the foreground is every pixel far from it. The colour
is the palette entry nearest to the median foreground pixel; the shape comes from how the foreground fills
its bounding box (see `_shape`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .world import COLOURS

_FOREGROUND_DISTANCE = 0.25  # RGB distance (0-1 scale) from the background that counts as foreground
_MIN_PIXELS = 6  # fewer foreground pixels: no shape found
_TRIANGLE_UPPER_SHARE = 0.38  # share of the area in the top half of the box: triangle 0.25, circle/square 0.5
_SQUARE_FILL = 0.89  # share of the box filled: square 1.0, circle 0.785


@dataclass(frozen=True)
class Reading:
    colour: str | None  # None: no foreground found
    shape: str | None
    foreground: float  # share of the image that is foreground

    def as_dict(self) -> dict[str, object]:
        return {"colour": self.colour, "shape": self.shape, "foreground": round(self.foreground, 4)}


def _smooth(image: torch.Tensor) -> torch.Tensor:
    """3x3 box filter of [C, H, W] (border pixels average their in-image neighbours)."""
    return torch.nn.functional.avg_pool2d(image[None], 3, stride=1, padding=1, count_include_pad=False)[0]


def _background(image: torch.Tensor) -> torch.Tensor:
    """Median colour [3] of the one-pixel border of [3, H, W]."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, 1:-1, 0], image[:, 1:-1, -1]], dim=1)  # [3, N]
    return border.median(dim=1).values


def _shape(mask: torch.Tensor) -> str:
    """Shape of a boolean foreground mask [H, W] from two size-free measures of its bounding box.

    A triangle (apex up) puts about a quarter of its area in the top half of the box, a circle or a square
    half; a square fills its box (1.0, a little less once smoothed), a circle about pi/4.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    top, bottom = ys.min().item(), ys.max().item() + 1
    left, right = xs.min().item(), xs.max().item() + 1
    box = mask[top:bottom, left:right].float()
    mid = box.shape[0] / 2
    rows = torch.arange(box.shape[0]).float() + 0.5
    upper = float(box[rows < mid].sum()) + 0.5 * float(box[rows == mid].sum())
    if upper / max(1.0, float(box.sum())) < _TRIANGLE_UPPER_SHARE:
        return "triangle"
    return "square" if float(box.mean()) > _SQUARE_FILL else "circle"


def read(image: torch.Tensor) -> Reading:
    """Colour and shape shown by one image [3, H, W] in [0, 1]."""
    image = image.float().clamp(0, 1)
    image = _smooth(image)
    bg = _background(image)
    distance = (image - bg.view(3, 1, 1)).norm(dim=0)  # [H, W]
    mask = distance > _FOREGROUND_DISTANCE
    share = mask.float().mean().item()
    if int(mask.sum()) < _MIN_PIXELS:
        return Reading(None, None, share)
    fg = image[:, mask].median(dim=1).values  # [3]
    palette = torch.tensor(list(COLOURS.values()))  # [K, 3]
    colour = list(COLOURS)[int((palette - fg).norm(dim=1).argmin())]
    return Reading(colour, _shape(mask), share)


def read_batch(images: torch.Tensor) -> list[Reading]:
    """`read` for each image of [B, 3, H, W]."""
    return [read(x) for x in images]


def accuracy(readings: list[Reading], expected: list[str], attribute: str) -> float:
    """Share of readings whose `attribute` ("colour" or "shape") equals the expected value."""
    if not readings:
        return 0.0
    return sum(getattr(r, attribute) == e for r, e in zip(readings, expected)) / len(readings)
