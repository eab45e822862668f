"""What training needs from a base model: the `Backbone` protocol and the text conditioning it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..adapter.config import ClipOutput
from ..adapter.modules import IPAdapter

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


class Backbone(Protocol):
    """What training needs from a base model. `ipa_train.hosts.backbone_diffusers.DiffusersBackbone` implements it
    for diffusers folders; a host (ComfyUI) can implement it over its own model objects.

    Encoders are frozen and run without gradients; `predict` runs the frozen UNet with the installed adapter
    and must let gradients reach `ip_tokens` (and the adapter's image K/V weights).
    """

    device: torch.device
    prediction_type: str  # "epsilon" | "v_prediction"
    num_train_timesteps: int
    cross_attention_dim: int

    def clip_embedding_dim(self, output: ClipOutput) -> int:
        """Width of the image encoder's `image_embeds` or penultimate hidden states."""
        ...

    def layer_hidden_sizes(self) -> list[int]:
        """Inner width of every cross-attention layer, in diffusers processor order."""
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

