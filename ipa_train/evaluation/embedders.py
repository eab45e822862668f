"""CLIP image and text embedders behind two small interfaces, so scoring runs on a transformers CLIP, on ComfyUI's
loaded CLIP vision model (`FunctionImageEmbedder`) or on a fake in tests."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..adapter.imageprep import CLIP_MEAN, CLIP_STD
from ..errors import EvaluationError

logger = logging.getLogger(__name__)


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
