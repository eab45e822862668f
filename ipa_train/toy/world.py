"""The shapes world: 32 px images of one coloured shape on a plain background, with captions.

Everything is generated (nothing downloaded) and deterministic for a given seed: `render` draws a batch of
scenes in torch with 4x4 supersampling, so the edges are anti-aliased like a photo downscale. A scene is
(colour, shape, background, centre, size); its caption names the colour, the shape and the background,
e.g. "a red circle on a grey background". Captions can leave words out ("a circle on a grey background")
so that a model trained on them also draws scenes from partial prompts, and an adapter trained with
colourless captions must take the colour from the reference image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_SIZE = 32
# Foreground colours, far apart in RGB (the closest pair, yellow and orange, is 0.34 apart on a 0-1 scale).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "yellow": (0.95, 0.88, 0.10),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.90, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.45, 0.10, 0.60),
}
# Backgrounds: neutral tones, far from every foreground colour.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "grey": (0.50, 0.50, 0.50),
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 14.0, 24.0  # shape extent in pixels (diameter / side)
MARGIN = 2.0  # pixels kept free between the shape and the image border
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    cx: float  # centre, pixels
    cy: float
    size: float  # extent, pixels


def caption(scene: Scene, colour: bool = True, shape: bool = True, background: bool = True) -> str:
    """"a red circle on a grey background"; a left-out colour is dropped, a left-out shape becomes "shape"."""
    words = ["a"]
    if colour:
        words.append(scene.colour)
    words.append(scene.shape if shape else "shape")
    if background:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def vocabulary() -> list[str]:
    """Every word a caption of this world can use (the toy tokenizer has one token per word)."""
    return ["a", "on", "shape", "background", *COLOURS, *SHAPES, *BACKGROUNDS]


def random_scenes(n: int, generator: torch.Generator, colour: str | None = None, shape: str | None = None,
                  background: str | None = None) -> list[Scene]:
    """`n` scenes drawn uniformly; `colour`/`shape`/`background` fix that attribute for all of them."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    scenes = []
    for _ in range(n):
        c, s, b = torch.randint(0, 1 << 30, (3,), generator=generator).tolist()
        size_u, x_u, y_u = torch.rand(3, generator=generator).tolist()
        size = MIN_SIZE + (MAX_SIZE - MIN_SIZE) * size_u
        lo, hi = MARGIN + size / 2, IMAGE_SIZE - MARGIN - size / 2
        scenes.append(Scene(colour or colours[c % len(colours)], shape or SHAPES[s % len(SHAPES)],
                            background or backgrounds[b % len(backgrounds)],
                            lo + (hi - lo) * x_u, lo + (hi - lo) * y_u, size))
    return scenes


def shape_mask(shape: str, cx: torch.Tensor, cy: torch.Tensor, size: torch.Tensor, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    """Boolean masks [B, H, W] of one shape kind at centres/sizes [B, 1, 1] on pixel-centre grids x, y [H, W]."""
    dx, dy = x - cx, y - cy
    half = size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        side = half * 0.89  # same area as the circle, so size alone does not tell them apart
        return (dx.abs() <= side) & (dy.abs() <= side)
    if shape == "triangle":  # upright isosceles, apex at the top, base at the bottom
        top = cy - half
        rel = (y - top) / size  # 0 at the apex, 1 at the base
        return (rel >= 0) & (rel <= 1) & (dx.abs() <= rel * half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scenes: list[Scene], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1] (anti-aliased by supersampling)."""
    n = len(scenes)
    ss = size * _SUPERSAMPLE
    coords = (torch.arange(ss, dtype=torch.float32) + 0.5) / _SUPERSAMPLE * (IMAGE_SIZE / size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    cover = torch.zeros(n, ss, ss)
    for kind in SHAPES:
        idx = [i for i, s in enumerate(scenes) if s.shape == kind]
        if not idx:
            continue
        geo = torch.tensor([[scenes[i].cx, scenes[i].cy, scenes[i].size] for i in idx]).view(-1, 3, 1, 1)
        cover[idx] = shape_mask(kind, geo[:, 0], geo[:, 1], geo[:, 2], x, y).float()
    cover = torch.nn.functional.avg_pool2d(cover[:, None], _SUPERSAMPLE)  # [B, 1, size, size]
    fg = torch.tensor([COLOURS[s.colour] for s in scenes]).view(n, 3, 1, 1)
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes]).view(n, 3, 1, 1)
    return bg + (fg - bg) * cover


def to_pil(image: torch.Tensor):
    """[3, H, W] in [0, 1] -> PIL RGB image."""
    from PIL import Image

    arr = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


def write_dataset(folder: str | os.PathLike, n: int, seed: int = 0, colour: bool = True, shape: bool = True,
                  background: bool = True) -> list[Scene]:
    """Write `n` scenes as `NNNN.png` + `NNNN.txt` (a folder `load_dataset` reads); returns the scenes.

    `colour=False` writes colourless captions, `shape=False` shape-free ones (the attribute the adapter must
    take from the reference image).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = random_scenes(n, torch.Generator().manual_seed(seed))
    images = render(scenes)
    for i, (scene, image) in enumerate(zip(scenes, images)):
        to_pil(image).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption(scene, colour=colour, shape=shape, background=background) + "\n")
    return scenes
