"""Weight sweeps: sample every (weight, mode, seed) through any `generate` callable, score each point, plot it."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..errors import EvaluationError
from .embedders import Images, image_list
from .scores import Scorer

logger = logging.getLogger(__name__)


DEFAULT_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


DEFAULT_MODES: tuple[str, ...] = ("scaled", "fused")


DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)


GenerateFn = Callable[[float, str, int], Any]  # (weight, mode, seed) -> one image (PIL, [H, W, 3] or [1, H, W, 3])


@dataclass
class SweepPoint:
    weight: float
    mode: str
    preservation: float
    prompt_following: float | None
    diversity: float | None
    combined: float


@dataclass
class SweepResult:
    """Scores per (mode, weight), in the order run; `plot()` draws them."""

    weights: list[float]
    modes: list[str]
    seeds: list[int]
    points: list[SweepPoint]

    def series(self, mode: str, metric: str) -> list[float | None]:
        """One metric over the weights for one mode (None where it was not computed)."""
        by_weight = {p.weight: getattr(p, metric) for p in self.points if p.mode == mode}
        return [by_weight.get(w) for w in self.weights]

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "modes": self.modes, "seeds": self.seeds,
                "points": [dataclasses.asdict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepResult:
        return cls([float(w) for w in d["weights"]], list(d["modes"]), [int(s) for s in d["seeds"]],
                   [SweepPoint(**p) for p in d["points"]])

    def plot(self, size: tuple[int, int] = (900, 380)) -> Image.Image:
        return plot_sweep(self, size)


def parse_weights(text: str) -> list[float]:
    """'0, 0.5, 1.0' (commas and/or spaces) -> [0.0, 0.5, 1.0]; an `EvaluationError` naming the bad item.

    Duplicates are dropped (a weight is swept once); the order given is kept.
    """
    items = [t for t in text.replace(",", " ").split() if t]
    if not items:
        raise EvaluationError(f"weights {text!r}: give at least one adapter weight, e.g. '0, 0.5, 1.0, 1.5'")
    weights: list[float] = []
    for item in items:
        try:
            w = float(item)
        except ValueError:
            raise EvaluationError(f"weights {text!r}: {item!r} is not a number; write e.g. '0, 0.5, 1.0, 1.5'") from None
        if not math.isfinite(w):
            raise EvaluationError(f"weights {text!r}: {item!r} is not a finite number")
        if w not in weights:
            weights.append(w)
    return weights


class WeightSweep:
    """Scores generated images over weights x modes x seeds.

    Args:
        scorer: the `Scorer` to use.
        reference: the reference image(s) the adapter was given.
        prompt: the prompt the images are generated from.
        weights: adapter weights to try (default 0 to 1.5 in steps of 0.25).
        modes: "scaled" and/or "fused".
        seeds: seeds per setting; diversity needs at least 2.
    """

    def __init__(self, scorer: Scorer, reference: Images, prompt: str, weights: Sequence[float] = DEFAULT_WEIGHTS,
                 modes: Sequence[str] = DEFAULT_MODES, seeds: Sequence[int] = DEFAULT_SEEDS):
        if not weights or not modes or not seeds:
            raise EvaluationError(f"a sweep needs weights, modes and seeds; got weights={list(weights)}, "
                                  f"modes={list(modes)}, seeds={list(seeds)}")
        bad = [m for m in modes if m not in DEFAULT_MODES]
        if bad:
            raise EvaluationError(f"unknown mode {bad[0]!r}: use 'scaled' or 'fused'")
        self.scorer = scorer
        self.reference = reference
        self.prompt = prompt
        self.weights = [float(w) for w in weights]
        self.modes = list(modes)
        self.seeds = [int(s) for s in seeds]

    def run(self, generate: GenerateFn, progress: Callable[[int, int], None] | None = None) -> SweepResult:
        """Call `generate(weight, mode, seed)` for every combination and score each (mode, weight) group.

        Args:
            generate: returns one image for the setting (the host samples: diffusers, ComfyUI, ...).
            progress: called with (done, total) after each generated image.
        """
        total = len(self.weights) * len(self.modes) * len(self.seeds)
        done = 0
        points = []
        for mode in self.modes:
            for weight in self.weights:
                images = []
                for seed in self.seeds:
                    images.extend(image_list(_one_image(generate(weight, mode, seed), weight, mode, seed)))
                    done += 1
                    if progress is not None:
                        progress(done, total)
                s = self.scorer.score(images, self.reference, self.prompt)
                points.append(SweepPoint(weight, mode, s.preservation, s.prompt_following, s.diversity, s.combined))
                logger.info("sweep %s weight %.2f: preservation %.1f, prompt %s, diversity %s", mode, weight,
                            s.preservation, _fmt(s.prompt_following), _fmt(s.diversity))
        return SweepResult(self.weights, self.modes, self.seeds, points)


def _one_image(image: Any, weight: float, mode: str, seed: int) -> Any:
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        if image.shape[0] != 1:
            raise EvaluationError(f"generate(weight={weight}, mode={mode!r}, seed={seed}) returned {image.shape[0]} "
                                  "images; it must return one")
        return image
    return [image]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


_COLORS = {"preservation": (30, 90, 200), "prompt_following": (220, 120, 20), "diversity": (40, 160, 70)}


def plot_sweep(result: SweepResult, size: tuple[int, int] = (900, 380)) -> Image.Image:
    """One panel per mode: preservation (blue), prompt following (orange) and diversity (green), 0-100, over
    the weight. PIL only."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    n = len(result.modes)
    top, bottom, left, right, gap = 44, 36, 40, 12, 24
    panel_w = (w - left - right - gap * (n - 1)) / n
    lo_w, hi_w = min(result.weights), max(result.weights)
    span = hi_w - lo_w or 1.0
    x = left
    for name, color in _COLORS.items():
        draw.line([x, 12, x + 18, 12], fill=color, width=3)
        draw.text((x + 22, 6), name.replace("_", " "), fill="black")
        x += 40 + 7 * len(name)
    for k, mode in enumerate(result.modes):
        x0 = left + k * (panel_w + gap)
        x1 = x0 + panel_w
        y0, y1 = top, h - bottom

        def xy(weight: float, value: float, x0: float = x0, x1: float = x1, y0: float = y0, y1: float = y1):
            return x0 + (x1 - x0) * (weight - lo_w) / span, y1 - (y1 - y0) * value / 100.0

        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0 + 4, y0 - 14), f"{mode} mode", fill="black")
        for v in (0, 50, 100):
            _, y = xy(lo_w, v)
            draw.line([x0 - 4, y, x0, y], fill="black")
            if k == 0:
                draw.text((4, y - 6), str(v), fill="black")
        for wt in result.weights:
            px, _ = xy(wt, 0)
            draw.line([px, y1, px, y1 + 4], fill="black")
            draw.text((px - 8, y1 + 6), f"{wt:g}", fill="black")
        draw.text(((x0 + x1) / 2 - 18, h - 14), "weight", fill="black")
        for metric, color in _COLORS.items():
            pts = [xy(wt, v) for wt, v in zip(result.weights, result.series(mode, metric)) if v is not None]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for px, py in pts:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
    return img


def backbone_generator(backbone: Any, adapter: Any, reference: Image.Image, prompt: str, *, steps: int = 20,
                       size: int = 512, guidance: float = 5.0, fusion_lambda: float = 0.8) -> GenerateFn:
    """A `generate(weight, mode, seed)` for `WeightSweep` that samples with `backbone_diffusers.generate`.

    Args:
        backbone: a `DiffusersBackbone`.
        adapter: the `IPAdapter` to evaluate.
        reference: the reference image.
        prompt: the prompt of every sample.
    """
    from ..hosts.backbone_diffusers import generate
    from ..training.data import clip_pixels

    pixels = clip_pixels(reference)[None]  # [1, 3, 224, 224]

    def run(weight: float, mode: str, seed: int) -> torch.Tensor:
        out = generate(backbone, adapter, pixels, [prompt], mode=mode, weight=weight, fusion_lambda=fusion_lambda,
                       steps=steps, guidance=guidance, size=size, seed=seed)  # [1, 3, size, size]
        return out.permute(0, 2, 3, 1).cpu()  # [1, size, size, 3]

    return run
