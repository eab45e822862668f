"""Tiles: a non-square or large reference as square tiles, each with its own mask over the latent; and the
embeds-side "enhance" (a k x k mosaic of tile hidden states mixed into the whole image's hidden states).

Image-side tiles: the reference is laid over the latent (same aspect), cut into squares of the short side (or
`short_side_tiles` squares along it), evenly spaced and overlapping where needed. Every latent position belongs
to exactly one tile, the one whose centre is nearest, so the masks sum to 1 everywhere (and stay a partition of
unity after the linear resize to each layer's token grid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import IPAKitError
from .prep import resize

Box = tuple[int, int, int]  # (top, left, side) in reference pixels


def _starts(length: int, side: int, count: int) -> list[int]:
    if count == 1:
        return [(length - side) // 2]
    return [round(i * (length - side) / (count - 1)) for i in range(count)]


def tile_grid(height: int, width: int, short_side_tiles: int = 1) -> list[Box]:
    """Square tiles covering a height x width reference, row-major: `short_side_tiles` along the short side."""
    if short_side_tiles < 1:
        raise IPAKitError(f"short_side_tiles is {short_side_tiles}; expected 1 or more")
    side = math.ceil(min(height, width) / short_side_tiles)
    rows, cols = math.ceil(height / side), math.ceil(width / side)
    return [(top, left, side) for top in _starts(height, side, rows) for left in _starts(width, side, cols)]


def tile_images(image: torch.Tensor, grid: list[Box], size: int = 224, interpolation: str = "bicubic") -> torch.Tensor:
    """[1, H, W, 3] -> [K, size, size, 3], one prepared square per tile of `grid`."""
    if image.shape[0] != 1:
        raise IPAKitError(f"tiling takes one reference image, got a batch of {image.shape[0]}; tile them one by one")
    crops = [resize(image[:, t : t + s, lft : lft + s, :3], size, size, interpolation) for t, lft, s in grid]
    return torch.cat(crops)


def tile_masks(grid: list[Box], height: int, width: int, out_height: int, out_width: int) -> torch.Tensor:
    """[K, out_height, out_width] one-hot masks: each output position goes to the tile with the nearest centre.

    The output grid is the reference stretched to out_height x out_width (the latent, or the image for preview).
    """
    ys = (torch.arange(out_height, dtype=torch.float64) + 0.5) * height / out_height
    xs = (torch.arange(out_width, dtype=torch.float64) + 0.5) * width / out_width
    centres = torch.tensor([(t + s / 2, lft + s / 2) for t, lft, s in grid], dtype=torch.float64)  # [K, 2]
    d = (ys.view(1, -1, 1) - centres[:, 0].view(-1, 1, 1)) ** 2 + (xs.view(1, 1, -1) - centres[:, 1].view(-1, 1, 1)) ** 2
    owner = d.argmin(dim=0)  # [oh, ow], ties go to the first tile
    return (owner.unsqueeze(0) == torch.arange(len(grid)).view(-1, 1, 1)).float()


def enhance_tiles(image: torch.Tensor, tiles: int, size: int = 224, interpolation: str = "bicubic") -> torch.Tensor:
    """[1, H, W, 3] -> [tiles*tiles, size, size, 3]: an even tiles x tiles split, each tile squashed to size."""
    if image.shape[0] != 1 or tiles < 1:
        raise IPAKitError(f"enhance tiles take one image and tiles >= 1, got a batch of {image.shape[0]} and {tiles}")
    h, w = image.shape[1], image.shape[2]
    ys = [round(i * h / tiles) for i in range(tiles + 1)]
    xs = [round(i * w / tiles) for i in range(tiles + 1)]
    crops = [resize(image[:, ys[r] : ys[r + 1], xs[c] : xs[c + 1], :3], size, size, interpolation)
             for r in range(tiles) for c in range(tiles)]
    return torch.cat(crops)


def mosaic_hidden(tile_hidden: torch.Tensor, tiles: int) -> torch.Tensor:
    """[tiles^2, 1 + g*g, D] tile hidden states (class token + g x g patches, row-major tiles) -> [1, 1 + g*g, D].

    The patch tokens are placed side by side as a (tiles*g) x (tiles*g) grid and average-pooled back to g x g,
    so each output patch summarises the detail of the matching region; the class token is the tiles' mean.
    """
    k2, length, dim = tile_hidden.shape
    g = math.isqrt(length - 1)
    if k2 != tiles * tiles or g * g != length - 1:
        raise IPAKitError(f"tile hidden states {tuple(tile_hidden.shape)} do not match {tiles}x{tiles} tiles of "
                          "a class token plus a square patch grid")
    patches = tile_hidden[:, 1:].reshape(tiles, tiles, g, g, dim).permute(4, 0, 2, 1, 3)  # [D, ty, gy, tx, gx]
    big = patches.reshape(1, dim, tiles * g, tiles * g)
    pooled = F.avg_pool2d(big, tiles).flatten(2).transpose(1, 2)  # [1, g*g, D]
    return torch.cat([tile_hidden[:, :1].mean(dim=0, keepdim=True), pooled], dim=1)


def enhance(full: torch.Tensor, tile_outputs: torch.Tensor, tiles: int, ratio: float) -> torch.Tensor:
    """Mix the whole image's CLIP output [1, ...] with the tiles' ([tiles^2, ...]): ratio * full + (1 - ratio) * tiles.

    Hidden states [.., L, D] use the mosaic above; pooled image embeds [.., P] use the tiles' mean. ratio 1 = full.
    """
    if not 0.0 <= ratio <= 1.0:
        raise IPAKitError(f"enhance ratio {ratio} is outside 0..1")
    if ratio == 1.0 or tiles == 1:
        return full
    merged = mosaic_hidden(tile_outputs, tiles) if tile_outputs.dim() == 3 else tile_outputs.mean(dim=0, keepdim=True)
    return full * ratio + merged.to(full) * (1 - ratio)
