"""What training needs from a base model: the `Backbone` protocol and the text conditioning it returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..adapter.config import ClipOutput
from ..adapter.dit_modules import ImageTokens
from ..adapter.modules import IPAdapter
from ..errors import IPAKitError

__all__ = ["CLIP_INPUT", "SIGLIP_INPUT", "Backbone", "BackboneSizes", "ImageInput", "ImageTokens", "TextCondition"]

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
class ImageInput:
    """How the image encoder's input is prepared: bicubic resize of the short side to `size`, centre crop,
    (x - mean) / std. CLIP: 224 and OpenAI's mean/std; SigLIP so400m-384: 384 and 0.5 / 0.5."""

    size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


CLIP_INPUT = ImageInput()
SIGLIP_INPUT = ImageInput(384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class BackboneSizes:
    """The widths an adapter is built from: the denoiser's text width and the inner width of every layer that
    gets image K/V, and the image encoder's output widths.

    DiT families (`family` "flux" | "sd3"): `cross_attention_dim` is the width of the adapter's image tokens
    (Flux: the T5 width the official files use, the transformer's `joint_attention_dim`, 4096; SD3.5: the
    transformer's width, 2432), `layer_hidden_sizes` the transformer's width once per patchable block (Flux: the
    double blocks, then the single blocks; SD3: the joint blocks), `double_blocks` / `single_blocks` their
    counts, `head_dim` the attention head width; `clip_dims` names "image_embeds" (CLIP ViT-L/14 projection,
    768), "siglip_pooled" (SigLIP's attention-pooled output, 1152) and "penultimate" (SigLIP hidden_states[-2]).
    """

    cross_attention_dim: int  # C: text tokens [B, S, C], image tokens [B, T, C]
    layer_hidden_sizes: tuple[int, ...]  # per cross-attention layer, in diffusers processor order
    clip_dims: Mapping[str, int]  # {"image_embeds": D of [B, D], "penultimate": D of [B, L, D]}
    family: str = "unet"  # "unet" | "flux" | "sd3"
    double_blocks: int = 0
    single_blocks: int = 0
    head_dim: int = 0

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

    Optional `denoiser`: the loaded denoiser module, read once after `attach` (training picks the CPU convolution
    kernel from its conv sizes; without it, the memory-saving one).

    SDXL: a backbone with `size_conditioning = True` (optional attribute, False when absent) gets in
    `text.extra` its `encode_text`'s pooled `text_embeds` [B, P] plus `time_ids` [B, 6] = (original height,
    original width, crop top, crop left, target height, target width) of each sample, as the dataset prepared it.

    DiT (Flux, SD3.5) backbones add optional attributes, read with getattr (UNet backbones have none of them):
    - `schedule`: a `training.schedules.FlowMatchSchedule` with the family's defaults (SD3: logit-normal, shift
      3.0; Flux: logit-normal, resolution-dependent shift). `train` applies the run's options to it; with it,
      `add_noise` / `target` / `num_train_timesteps` / `prediction_type` are not used.
    - `guidance_input = True` (Flux dev: a guidance-distilled transformer): every batch's `text.extra["guidance"]`
      [B] holds the run's `guidance` option.
    - `image_input`: an `ImageInput` (SigLIP: 384 px, mean/std 0.5) for the encoder's pixels; CLIP 224 if absent.
    Then `predict(noisy, timesteps, text, ip_tokens)` gets the scaled latents x_t [B, c, h, w] (c = 16, the VAE's
    channels: the backbone packs Flux's 2x2 patches itself), `timesteps` = the sigmas [B] in (0, 1) (float; the
    backbone converts to its model's units: Flux takes sigma, SD3 sigma * 1000), `text.hidden` (Flux: T5 states
    [B, S, 4096]; SD3: CLIP-L/G penultimate states zero-padded to the T5 width, then T5's, [B, 77 + S, 4096]),
    `text.extra["pooled"]` (Flux: CLIP-L pooled [B, 768]; SD3: CLIP-L and CLIP-G projected pooled side by side,
    [B, 2048]) and `ip_tokens`, an `ImageTokens` from the adapter (`DitAdapter.image_tokens(embeds, sigmas)`);
    it returns the velocity prediction [B, c, h, w] (unpacked). `init_adapter` may do nothing (a DiT adapter
    initialises itself, `adapter.dit_modules.init_for_training`); `attach(adapter)` installs the block patches
    that read `adapter.blocks[j]` (K/V through `adapter.dit_attention.flux_image_kv` / `sd3_image_kv`) with
    gradients.
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

