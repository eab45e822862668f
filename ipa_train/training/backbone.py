"""What training needs from a base model: the `Backbone` protocol and the text conditioning it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..adapter.config import ClipOutput
from ..adapter.modules import IPAdapter
from ..errors import IPAKitError

# Backbone interface


@dataclass
class TextCondition:
    """Text conditioning of a batch: hidden states [B, S, C] plus model-specific extras (e.g. SDXL pooled
    `text_embeds` [B, P] and `time_ids` [B, 6]), every extra with the batch as first dimension."""

    hidden: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, index: torch.Tensor | list[int]) -> TextCondition:
        return TextCondition(self.hidden[index], {k: v[index] for k, v in self.extra.items()})

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.hidden.to(device), {k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def cat(items: list[TextCondition]) -> TextCondition:
        keys = items[0].extra.keys()
        return TextCondition(torch.cat([i.hidden for i in items]), {k: torch.cat([i.extra[k] for i in items]) for k in keys})


@dataclass(frozen=True)
class BackboneSizes:
    """The widths an adapter is built from: the denoiser's text width and the inner width of every layer that
    gets image K/V, and the image encoder's output widths."""

    cross_attention_dim: int  # C: text tokens [B, S, C], image tokens [B, T, C]
    layer_hidden_sizes: tuple[int, ...]  # per cross-attention layer, in diffusers processor order
    clip_dims: Mapping[str, int]  # {"image_embeds": D of [B, D], "penultimate": D of [B, L, D]}

    def clip_embedding_dim(self, output: ClipOutput) -> int:
        if output not in self.clip_dims:
            raise IPAKitError(f"this adapter reads the image encoder's {output} output, but no image encoder was given; "
                              "give one (--image-encoder, or connect a CLIP vision model)")
        return int(self.clip_dims[output])


class Backbone(Protocol):
    """What training needs from a base model. `ipa_train.hosts.backbone_diffusers.DiffusersBackbone` implements it
    for diffusers folders; a host (ComfyUI) can implement it over its own model objects; a DiT backbone (Flux,
    SD3) implements the same methods over its transformer.

    Memory order: training asks only for `sizes` before the encoders have run, caches every embedding of a small
    dataset, calls `release`, and only then calls the methods that need the denoiser (`init_adapter`,
    `attach`, `predict`, `enable_gradient_checkpointing`). A backbone that loads lazily thus never holds the
    denoiser and an encoder at once: peak memory is max(encoders, denoiser), not their sum.

    Encoders are frozen and run without gradients; `predict` runs the frozen denoiser with the installed adapter
    and must let gradients reach `ip_tokens` (and the adapter's image K/V weights).

    SDXL: a backbone with `size_conditioning = True` (optional attribute, False when absent) gets in
    `text.extra` its `encode_text`'s pooled `text_embeds` [B, P] plus `time_ids` [B, 6] = (original height,
    original width, crop top, crop left, target height, target width) of each sample, as the dataset prepared it.
    """

    device: torch.device
    prediction_type: str  # "epsilon" | "v_prediction"
    num_train_timesteps: int

    @property
    def sizes(self) -> BackboneSizes:
        """The adapter's widths, read from the models' configs (or meta-device modules): never loads weights,
        so the pre-flight and the adapter's shape cost no memory."""
        ...

    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B, 3, H, W] in [-1, 1] -> (mean, std) of the *scaled* latent distribution, [B, c, h, w] each."""
        ...

    def encode_text(self, captions: list[str]) -> TextCondition:
        """Captions -> text conditioning (hidden states [B, S, C] and extras)."""
        ...

    def encode_image(self, clip_pixels: torch.Tensor, output: ClipOutput) -> torch.Tensor:
        """CLIP input [B, 3, 224, 224] -> image_embeds [B, D] or penultimate hidden states [B, L, D]."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
        ...

    def init_adapter(self, adapter: IPAdapter) -> None:
        """Initialise the adapter's image K/V from each cross-attention layer's to_k/to_v."""
        ...

    def attach(self, adapter: IPAdapter) -> None:
        """Install the adapter's image K/V into the UNet for `predict`."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCondition,
                ip_tokens: torch.Tensor) -> torch.Tensor:
        """Model output [B, c, h, w] for `noisy` latents, text conditioning and image tokens [B, T, C]."""
        ...

    def release(self, parts: tuple[str, ...]) -> None:
        """Free encoders no longer needed: any of "vae", "text", "image"."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        ...

