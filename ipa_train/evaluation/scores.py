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
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import EvaluationError
from .embedders import CLIPEmbedder, ClipEmbedder, ImageEmbedder, Images

# CLIPScore's rescaling factor (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
# Captioning"): a published, widely reported mapping of the small raw image-text cosine onto a usable range,
# chosen over a hand-calibrated lo/hi window that would depend on the CLIP model at hand.
CLIPSCORE_WEIGHT = 2.5


# Lowest score of each grade, best first; a score gets the first grade whose bound it reaches.
GRADES: tuple[tuple[str, float], ...] = (("A+", 90.0), ("A", 80.0), ("B", 70.0), ("C", 60.0), ("F", -math.inf))


SCALES = {
    "preservation": "100 * max(0, cos(CLIP image embedding of generated image, of reference)), mean over images",
    "prompt_following": f"CLIPScore: 100 * min(1, {CLIPSCORE_WEIGHT} * max(0, cos(CLIP image, CLIP text))), mean over images",
    "combined": "mean of preservation and prompt_following (preservation alone when prompt following is skipped)",
    "grade": "A+ >= 90, A >= 80, B >= 70, C >= 60, F < 60 (of combined)",
    "diversity": "100 * mean over image pairs of (1 - max(0, cos)); 0 = identical images; null for fewer than 2",
}


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
