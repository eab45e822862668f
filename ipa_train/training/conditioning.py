"""Training batches: cached or per-batch encodings, the reference's drop draw, and the sample order."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch

from ..errors import TrainConfigError
from .backbone import CLIP_INPUT, Backbone, ImageInput, TextCondition
from .config import TrainConfig
from .data import CaptionedImages

logger = logging.getLogger(__name__)

# Conditioning: cached or encoded per batch


@dataclass
class Batch:
    latents: torch.Tensor  # [B, c, h, w], scaled
    text: TextCondition  # hidden [B, S, C]
    clip: torch.Tensor  # [B, D] or [B, L, D]; [B, 0] when the adapter reads no CLIP output (FaceID)
    face: torch.Tensor | None = None  # FaceID: normalised face embeddings [B, 512] (zeros where the image is dropped)


def drop_decisions(n: int, config: TrainConfig, rng: random.Random) -> list[tuple[bool, bool]]:
    """(drop_image, drop_text) per sample: one uniform draw r; r < i image, r < i+t text, r < i+t+b both."""
    out = []
    i, t, b = config.drop_image, config.drop_text, config.drop_both
    for _ in range(n):
        r = rng.random()
        if r < i:
            out.append((True, False))
        elif r < i + t:
            out.append((False, True))
        elif r < i + t + b:
            out.append((True, True))
        else:
            out.append((False, False))
    return out


class Conditioning:
    """Gives training batches, from caches built once (small datasets) or by running the encoders per batch.

    Every image is encoded once for the cache; the empty prompt and the dropped-image CLIP input are
    encoded once too. Encoders no longer needed afterwards are released. For a backbone with
    `size_conditioning` (SDXL) every sample's text conditioning also gets `time_ids` [B, 6], the size and crop of
    its own target (`CaptionedImages.target_and_size`), whether or not its caption was dropped.
    """

    def __init__(self, backbone: Backbone, dataset: CaptionedImages, config: TrainConfig, chunk: int = 8):
        self.backbone = backbone
        self.dataset = dataset
        self.config = config
        self.output = config.clip_output
        self.size_conditioning = bool(getattr(backbone, "size_conditioning", False))
        self.guidance = config.guidance if getattr(backbone, "guidance_input", False) else None  # Flux dev
        self.image_input: ImageInput = getattr(backbone, "image_input", None) or CLIP_INPUT
        self.size_ids: torch.Tensor | None = None  # [N, 6] with cached latents
        use_cache = 0 < len(dataset) <= config.cache_limit
        self.moments: tuple[torch.Tensor, torch.Tensor] | None = None
        self.clip: torch.Tensor | None = None
        self.text: dict[str, TextCondition] | None = None
        self.faces: torch.Tensor | None = getattr(dataset, "faces", None) if config.is_faceid else None  # [N, F]
        if config.is_faceid and self.faces is None:
            raise TrainConfigError(f"projection {config.projection} trains on face embeddings, but the dataset has none; "
                                   "build it with ipa_train.training.faceid.face_dataset (the command line does)")
        with torch.no_grad():
            self.empty_text = backbone.encode_text([""]).to("cpu")
            self.dropped_clip = self._dropped_clip()
            if use_cache:
                self._build_cache(chunk)
        self._release(use_cache)

    def _dropped_clip(self) -> torch.Tensor:
        """A dropped image: zeros for vector outputs ([D]) and for the DiT adapters' SigLIP states (as the
        diffusers / DiffSynth negatives); the encoding of a zero *normalized* pixel tensor for UNet plus [L, D]."""
        if self.output == "none":
            return torch.zeros(0)
        if self.output != "penultimate":
            return torch.zeros(self.backbone.sizes.clip_embedding_dim(self.output))  # [D]
        side = self.image_input.size
        states = self.backbone.encode_image(torch.zeros(1, 3, side, side), self.output)[0].float().cpu()  # [L, D]
        return torch.zeros_like(states) if self.config.is_dit else states

    def _build_cache(self, chunk: int) -> None:
        n = len(self.dataset)
        started = time.perf_counter()
        clip, means, stds, ids = [], [], [], []
        for lo in range(0, n, chunk):
            idx = range(lo, min(n, lo + chunk))
            if self.output != "none":
                clip.append(self.backbone.encode_image(torch.stack([self._pixels(i) for i in idx]),
                                                       self.output).float().cpu())
            if self.dataset.deterministic:
                pixels, sizes = zip(*(self.dataset.target_and_size(i) for i in idx))
                mean, std = self.backbone.encode_latents(torch.stack(pixels))
                means.append(mean.float().cpu())
                stds.append(std.float().cpu())
                ids.extend(sizes)
        self.clip = torch.cat(clip) if clip else torch.zeros(n, 0)  # [N, D] or [N, L, D]
        if means:
            self.moments = (torch.cat(means), torch.cat(stds))  # [N, c, h, w] each
            self.size_ids = torch.stack(ids)  # [N, 6]
        captions = sorted({self.dataset.caption(i) for i in range(n)})
        text = [self.backbone.encode_text(captions[lo:lo + chunk]).to("cpu") for lo in range(0, len(captions), chunk)]
        cat = TextCondition.cat(text)
        self.text = {c: cat.rows([j]) for j, c in enumerate(captions)}
        logger.info("cached embeddings of %d images and %d captions%s in %.1f s", n, len(captions),
                    " and their VAE latents" if means else " (latents not cached: random crop/flip changes them every step)",
                    time.perf_counter() - started)

    def _release(self, cached: bool) -> None:
        parts = ("text", "image") + (("vae",) if self.moments is not None else ())
        if cached:
            self.backbone.release(parts)
            logger.info("released the %s encoder(s): every embedding is cached", "/".join(parts))

    def batch(self, indices: list[int], rng: random.Random) -> Batch:
        """A batch with the reference drop semantics; draws drops (and crops) from `rng`, latents from torch."""
        drops = drop_decisions(len(indices), self.config, rng)
        device = self.backbone.device
        with torch.no_grad():
            if self.moments is not None:
                mean, std = self.moments[0][indices], self.moments[1][indices]
                size_ids = self.size_ids[indices]
            else:
                pixels, sizes = zip(*(self.dataset.target_and_size(i, rng) for i in indices))
                mean, std = (t.float().cpu() for t in self.backbone.encode_latents(torch.stack(pixels)))
                size_ids = torch.stack(sizes)
            latents = mean + std * torch.randn(mean.shape)  # sampled on CPU: same draws on every device
            text = TextCondition.cat([self._text(i, drop_text) for i, (_, drop_text) in zip(indices, drops)])
            if self.size_conditioning:
                text = TextCondition(text.hidden, {**text.extra, "time_ids": size_ids})  # [B, 6]
            if self.guidance is not None:
                text = TextCondition(text.hidden, {**text.extra, "guidance": torch.full((len(indices),), self.guidance)})
            clip = torch.stack([self._clip(i, drop_image) for i, (drop_image, _) in zip(indices, drops)])
            face = None
            if self.faces is not None:
                face = torch.stack([torch.zeros_like(self.faces[i]) if drop_image else self.faces[i]
                                    for i, (drop_image, _) in zip(indices, drops)]).to(device)
        return Batch(latents.to(device), text.to(device), clip.to(device), face)

    def _text(self, index: int, drop: bool) -> TextCondition:
        if drop:
            return self.empty_text
        caption = self.dataset.caption(index)
        if self.text is not None:
            return self.text[caption]
        return self.backbone.encode_text([caption]).to("cpu")

    def _clip(self, index: int, drop: bool) -> torch.Tensor:
        if drop:
            return self.dropped_clip
        if self.clip is not None:
            return self.clip[index]
        if self.output == "none":
            return self.dropped_clip
        return self.backbone.encode_image(self._pixels(index)[None], self.output)[0].float().cpu()

    def _pixels(self, index: int) -> torch.Tensor:
        """The image encoder's input [3, S, S] for sample `index` (CLIP 224, or the backbone's `image_input`)."""
        if self.image_input == CLIP_INPUT:
            return self.dataset.clip_input(index)
        return self.dataset.clip_input(index, self.image_input)


def sample_indices(n: int, batch: int, micro_step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of micro-batch `micro_step` of process `rank`: an endless stream of per-epoch permutations.

    A pure function of its arguments, so a resumed run reads the same samples as an uninterrupted one.
    """
    out = []
    for j in range(micro_step * batch, (micro_step + 1) * batch):
        k = j * world + rank  # position in the global stream
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64))
        out.append(int(perm[pos]))
    return out

