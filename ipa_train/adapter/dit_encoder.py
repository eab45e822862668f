"""Which encoder output a Flux / SD3.5 adapter reads, and the check that the CLIP vision model gives it.

- XLabs: CLIP ViT-L/14 `image_embeds` [N, 768]; its negative is the embedding of a black image.
- InstantX SD3.5: SigLIP so400m penultimate hidden states [N, 729, 1152]; negative: zeros.
- InstantX Flux: SigLIP's pooled output [N, 1152] (the attention-pooling head over the last hidden state);
  negative: zeros.
"""

from __future__ import annotations

import torch

from ..errors import EncoderMismatchError
from .dit_formats import SIGLIP, SIGLIP_FILE, VIT_L, DitConfig

_NEEDS = {
    "xlabs-flux": (VIT_L, "image_embeds", "clip-vit-large-patch14.safetensors (openai/clip-vit-large-patch14)"),
    "instantx-flux": (SIGLIP, "pooled output", "google/siglip-so400m-patch14-384's model.safetensors"),
    "instantx-sd3": (SIGLIP, "penultimate hidden states", SIGLIP_FILE + " (Comfy-Org) or google/siglip-so400m-patch14-384"),
}
_KNOWN_WIDTHS = {768: "ViT-L/14", 1024: "ViT-H/14", 1280: "ViT-bigG/14", 1152: SIGLIP, 1664: "ViT-bigG/14"}


def needs(cfg: DitConfig) -> str:
    enc, output, file = _NEEDS[cfg.format]
    return f"{enc} {output} ({file} in ComfyUI/models/clip_vision)"


def negative_is_black_image(cfg: DitConfig) -> bool:
    """XLabs (and diffusers' Flux pipeline) encode a black image for the unconditional side; the others use zeros."""
    return cfg.format == "xlabs-flux"


def check_features(cfg: DitConfig, feats: torch.Tensor, file: str = "adapter") -> None:
    """One line naming both sides when the CLIP vision model's output is not what the adapter reads."""
    width = int(feats.shape[-1])
    tokens_ok = feats.dim() == (3 if cfg.format == "instantx-sd3" else 2)
    if width == cfg.clip_embedding_dim and tokens_ok:
        return
    got = _KNOWN_WIDTHS.get(width, "an unknown encoder")
    raise EncoderMismatchError(
        f"{file}: this {cfg.format} adapter needs {needs(cfg)}, [N, {'729, ' if cfg.format == 'instantx-sd3' else ''}"
        f"{cfg.clip_embedding_dim}], but the CLIP vision model gives shape {tuple(feats.shape)} ({got}): load the "
        f"encoder named here in Load CLIP Vision")
