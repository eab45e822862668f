"""Evaluation of what an adapter does: reference preservation, prompt following, diversity, and a weight sweep.

Every score is on a 0-100 scale, computed from CLIP embeddings (L2-normalised, compared by cosine):

- **preservation** = 100 * max(0, cos(generated image, reference image)), averaged over the generated images
  (and over the references when several are given). An image identical to the reference scores 100.
- **prompt following** = CLIPScore (Hessel et al. 2021): 100 * min(1, 2.5 * max(0, cos(image, prompt))),
  averaged over the generated images. Raw CLIP image-text cosines are small (about 0.2-0.35 for a matching pair
  with OpenAI/LAION CLIP), so the published factor 2.5 maps them to 50-87.5; a cosine of 0.4 or more gives 100.
- **combined** = the mean of preservation and prompt following (preservation alone when no text model is given).
- **grade**: A+ >= 90, A >= 80, B >= 70, C >= 60, F below (see `GRADES`).
- **diversity** = 100 * the mean over pairs of generated images of the cosine distance 1 - max(0, cos): 0 when
  every image is the same, 100 when every pair is orthogonal (its typical range depends on the CLIP model).

The embedding models are behind two small interfaces (`ImageEmbedder`, `ClipEmbedder`), so the same `Scorer`
runs on a transformers CLIP (`CLIPEmbedder.from_pretrained`), on ComfyUI's loaded CLIP vision model (wrapped in
`FunctionImageEmbedder` by the node) or on a fake in tests. `WeightSweep` drives any `generate(weight, mode,
seed)` callable, so the sweep does not depend on the host that samples.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..adapter.formats import atomic_write
from ..adapter.imageprep import CLIP_MEAN, CLIP_STD
from ..errors import EvaluationError

logger = logging.getLogger(__name__)

REPORT_VERSION = 1
# CLIPScore's rescaling factor (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
# Captioning"): a published, widely reported mapping of the small raw image-text cosine onto a usable range,
# chosen over a hand-calibrated lo/hi window that would depend on the CLIP model at hand.
CLIPSCORE_WEIGHT = 2.5
# Lowest score of each grade, best first; a score gets the first grade whose bound it reaches.
GRADES: tuple[tuple[str, float], ...] = (("A+", 90.0), ("A", 80.0), ("B", 70.0), ("C", 60.0), ("F", -math.inf))
DEFAULT_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_MODES: tuple[str, ...] = ("scaled", "fused")
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
SCALES = {
    "preservation": "100 * max(0, cos(CLIP image embedding of generated image, of reference)), mean over images",
    "prompt_following": f"CLIPScore: 100 * min(1, {CLIPSCORE_WEIGHT} * max(0, cos(CLIP image, CLIP text))), mean over images",
    "combined": "mean of preservation and prompt_following (preservation alone when prompt following is skipped)",
    "grade": "A+ >= 90, A >= 80, B >= 70, C >= 60, F < 60 (of combined)",
    "diversity": "100 * mean over image pairs of (1 - max(0, cos)); 0 = identical images; null for fewer than 2",
}

# A list of PIL images, or a ComfyUI IMAGE batch [N, H, W, 3] in 0..1 (a single [H, W, 3] is one image).
Images = Sequence[Image.Image] | Sequence[torch.Tensor] | torch.Tensor


class ImageEmbedder(Protocol):
    def embed_images(self, images: Images) -> torch.Tensor:
        """Images -> L2-normalised embeddings [N, D]."""
        ...


class ClipEmbedder(ImageEmbedder, Protocol):
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> L2-normalised embeddings [N, D], in the space of `embed_images`."""
        ...


# --------------------------------------------------------------------------------------------------------
# Images and embeddings


def image_list(images: Images) -> list[torch.Tensor]:
    """PIL images, [H, W, 3] tensors or an [N, H, W, 3] batch -> list of float [H, W, 3] tensors in 0..1."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise EvaluationError(f"expected images as [N, H, W, 3] (ComfyUI IMAGE), got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise EvaluationError("no images given (empty batch)")
        return [x.float().cpu() for x in images]
    out = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            out.append(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0))
        elif isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[-1] == 3:
            out.append(img.float().cpu())
        else:
            raise EvaluationError(f"image {i}: expected a PIL image or an [H, W, 3] tensor, got {type(img).__name__}")
    if not out:
        raise EvaluationError("no images given")
    return out


def as_batches(images: Images) -> list[torch.Tensor]:
    """`image_list` grouped into [n, H, W, 3] batches of equal size (one batch when all sizes agree)."""
    items = image_list(images)
    batches: list[torch.Tensor] = []
    for _, group in itertools.groupby(items, key=lambda x: tuple(x.shape)):
        batches.append(torch.stack(list(group)))
    return batches


def clip_preprocess(image: torch.Tensor, size: int) -> torch.Tensor:
    """[H, W, 3] in 0..1 -> CLIP input [3, size, size]: bicubic short-side resize, centre crop, CLIP normalisation
    (as transformers' `CLIPImageProcessor` does, in torch so tensors and PIL images take the same path)."""
    x = image.permute(2, 0, 1)[None]  # [1, 3, H, W]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


class CLIPEmbedder:
    """A transformers `CLIPModel` (text and vision towers) with its tokenizer, as a `ClipEmbedder`.

    Args:
        model: a `transformers.CLIPModel`.
        tokenizer: its `CLIPTokenizer` (or any tokenizer returning `input_ids` and `attention_mask`).
        source: the folder or hub id it came from, for reports.
        device: where it runs (default: CUDA when available).
    """

    def __init__(self, model: Any, tokenizer: Any, source: str = "", device: torch.device | str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = tokenizer
        self.source = source
        self.image_size = int(model.config.vision_config.image_size)
        self.max_tokens = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                              int(model.config.text_config.max_position_embeddings))

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, device: torch.device | str | None = None) -> CLIPEmbedder:
        """Load a full CLIP (text + vision), e.g. `openai/clip-vit-large-patch14` or a local folder of one."""
        from transformers import AutoTokenizer, CLIPModel

        source = os.fspath(path_or_id)
        if not source:
            raise EvaluationError("no CLIP model given: pass a folder or hub id of a full CLIP model "
                                  "(e.g. openai/clip-vit-large-patch14)")
        try:
            model = CLIPModel.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise EvaluationError(
                f"cannot load a CLIP model from {source!r} ({str(e).splitlines()[0]}); give a folder or hub id of a "
                "full transformers CLIPModel with text and vision towers (e.g. openai/clip-vit-large-patch14); "
                "a CLIP vision-only model cannot score prompts") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise EvaluationError(f"{source!r} has a CLIP model but no readable tokenizer ({str(e).splitlines()[0]}); "
                                  "the folder needs the tokenizer files of the model (vocab.json, merges.txt)") from None
        logger.info("loaded CLIP model %s (embedding width %d)", source, model.config.projection_dim)
        return cls(model, tokenizer, source, device)

    @torch.no_grad()
    def embed_images(self, images: Images) -> torch.Tensor:
        pixels = torch.stack([clip_preprocess(x, self.image_size) for x in image_list(images)])  # [N, 3, S, S]
        dtype = self.model.visual_projection.weight.dtype
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, dtype)).pooler_output  # [N, W]
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()  # [N, D]

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        pooled = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                       attention_mask=enc["attention_mask"].to(self.device)).pooler_output  # [N, W]
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()  # [N, D]


class FunctionImageEmbedder:
    """An `ImageEmbedder` over any function [n, H, W, 3] -> [n, D] (e.g. ComfyUI's `clip_vision.encode_image`)."""

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], source: str = "function"):
        self.embed = embed
        self.source = source

    @torch.no_grad()
    def embed_images(self, images: Images) -> torch.Tensor:
        parts = [self.embed(batch).float().cpu().reshape(batch.shape[0], -1) for batch in as_batches(images)]
        return F.normalize(torch.cat(parts), dim=-1)  # [N, D]


# --------------------------------------------------------------------------------------------------------
# Scales


def image_similarity_score(cos: torch.Tensor | float) -> torch.Tensor:
    """Image-image cosine -> 0-100 (100 * max(0, cos))."""
    return 100.0 * torch.as_tensor(cos, dtype=torch.float32).clamp(0.0, 1.0)


def clipscore(cos: torch.Tensor | float) -> torch.Tensor:
    """Image-text cosine -> 0-100 (CLIPScore: 100 * min(1, 2.5 * max(0, cos)))."""
    return 100.0 * (CLIPSCORE_WEIGHT * torch.as_tensor(cos, dtype=torch.float32).clamp(min=0.0)).clamp(max=1.0)


def grade(score: float) -> str:
    """Letter grade of a 0-100 score (`GRADES`)."""
    if math.isnan(score):
        raise EvaluationError("cannot grade a NaN score")
    return next(name for name, lowest in GRADES if score >= lowest)


def diversity(embeddings: torch.Tensor) -> float | None:
    """100 * mean pairwise cosine distance (1 - max(0, cos)) of normalised embeddings [N, D]; None when N < 2."""
    n = embeddings.shape[0]
    if n < 2:
        return None
    cos = (embeddings @ embeddings.T).clamp(0.0, 1.0)  # [N, N]
    i, j = torch.triu_indices(n, n, offset=1)
    return float(100.0 * (1.0 - cos[i, j]).mean())


# --------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    """Scores of a set of generated images (see the module docstring for the scales)."""

    preservation: float
    prompt_following: float | None
    combined: float
    grade: str
    diversity: float | None
    images: int
    per_image: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Scorer:
    """Scores generated images against a reference image and a prompt.

    Args:
        image_model: embeds images for preservation and diversity (a transformers CLIP, or the host's CLIP
            vision model). Defaults to `text_model`.
        text_model: a CLIP with text and vision towers for prompt following (image and text in one space);
            None skips prompt following.
    """

    def __init__(self, image_model: ImageEmbedder | None = None, text_model: ClipEmbedder | None = None):
        if image_model is None and text_model is None:
            raise EvaluationError("no CLIP model to score with: give a full CLIP model (folder or hub id) "
                                  "and/or a CLIP vision model")
        self.image_model: ImageEmbedder = image_model if image_model is not None else text_model  # type: ignore[assignment]
        self.text_model = text_model

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, device: torch.device | str | None = None) -> Scorer:
        """A scorer using one transformers CLIP model for every score."""
        return cls(text_model=CLIPEmbedder.from_pretrained(path_or_id, device))

    @property
    def notes(self) -> list[str]:
        if self.text_model is None:
            return ["prompt following skipped: no full CLIP model (text tower) given; combined = preservation"]
        return []

    def score(self, images: Images, reference: Images, prompt: str | None) -> Scores:
        """Preservation, prompt following, combined score, grade and diversity of `images`.

        Args:
            images: the generated images.
            reference: the reference image(s); with several, preservation averages over them.
            prompt: the prompt the images were generated from (None or "" skips prompt following).
        """
        gen = self.image_model.embed_images(images)  # [N, D]
        ref = self.image_model.embed_images(reference)  # [R, D]
        pres = image_similarity_score(gen @ ref.T).mean(dim=1)  # [N]
        per_image = {"preservation": [round(float(v), 4) for v in pres]}
        follow = None
        if self.text_model is not None and prompt:
            img = gen if self.text_model is self.image_model else self.text_model.embed_images(images)  # [N, D']
            txt = self.text_model.embed_texts([prompt])  # [1, D']
            per = clipscore(img @ txt[0])  # [N]
            per_image["prompt_following"] = [round(float(v), 4) for v in per]
            follow = float(per.mean())
        preservation = float(pres.mean())
        combined = preservation if follow is None else (preservation + follow) / 2
        return Scores(preservation, follow, combined, grade(combined), diversity(gen), gen.shape[0], per_image)


# --------------------------------------------------------------------------------------------------------
# Weight sweep

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


# --------------------------------------------------------------------------------------------------------
# Report


@dataclass
class EvalReport:
    """Everything an evaluation found, as JSON (`to_json`, `save`, `load`)."""

    clip: str
    prompt: str
    scores: Scores | None = None
    sweep: SweepResult | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    scales: dict[str, str] = field(default_factory=lambda: dict(SCALES))
    version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "clip": self.clip, "prompt": self.prompt,
                "scores": self.scores.to_dict() if self.scores else None,
                "sweep": self.sweep.to_dict() if self.sweep else None,
                "inputs": self.inputs, "notes": self.notes, "scales": self.scales}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        return cls(clip=d["clip"], prompt=d["prompt"], scores=Scores(**d["scores"]) if d.get("scores") else None,
                   sweep=SweepResult.from_dict(d["sweep"]) if d.get("sweep") else None, inputs=d.get("inputs", {}),
                   notes=list(d.get("notes", [])), scales=dict(d.get("scales", SCALES)),
                   version=int(d.get("version", REPORT_VERSION)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically."""
        path = Path(path)
        text = self.to_json()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvaluationError(f"{os.fspath(path)!r} is not a readable evaluation report ({e})") from None


# --------------------------------------------------------------------------------------------------------
# Sampling with the diffusers backbone


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


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as 8-bit RGB (size-checked before decoding), or an `EvaluationError` naming the file."""
    from ..images import ImageRejected, open_rgb

    if not os.path.isfile(path):
        raise EvaluationError(f"image {os.fspath(path)!r} not found; give an image file")
    try:
        return open_rgb(path, 224)  # CLIP scores at 224 px
    except ImageRejected as e:
        raise EvaluationError(f"cannot use image {os.fspath(path)!r}: {e}") from None
