"""The toy Flux base model of the shapes world: components, one-file save/load, and the `DitBackbone` over it.

Components (by the names `DitBackbone(components=...)` takes):
    * transformer: a diffusers `FluxTransformer2DModel` (double and single stream blocks, RoPE, no guidance
      input: classifier-free guidance by batch) on the VAE's 16x16 latents, packed 2x2 into 64 tokens
      (pretrained with flow matching by `ipa_train.toy.pretrain_flux`);
    * vae: a small learned convolutional autoencoder (`autoencoder.ConvAutoencoder`, 16x16x2 latents, tokens of
      8; trained first; why: its docstring), or with `vae="pixel"` the UNet toy's exact pixel-unshuffle
      (`model.PixelUnshuffleVAE`, patch 2: 16x16x12 latents, tokens of 48);
    * text_encoder (CLIP, pooled) and text_encoder_2 (T5, per-token), random, over the world's word-level
      tokenizer (tokenizer, tokenizer_2);
    * image encoders, trained briefly to tell the world's colours, shapes and backgrounds apart
      (`ipa_train.toy.encoder`): `clip_vision` (CLIP with ViT-L/14's 768-wide `image_embeds`, what XLabs'
      projection reads) and `siglip` (a small SigLIP whose pooled output InstantX's projection reads). A backbone
      takes the one its adapter format reads as `image_encoder` (`toy_flux_backbone(fmt)`).

The shipped file `shapes_flux.safetensors` holds every weight under `<component>.` prefixes and the component
configs as JSON in its metadata, so it loads with no other file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import IPAKitError
from .model import _SPECIALS, MAX_TOKENS, PixelUnshuffleVAE, build_tokenizer, load_weights, read_model_file
from .world import vocabulary

SHIPPED_FLUX = Path(__file__).resolve().parent / "shapes_flux.safetensors"
FLUX_FORMAT = "ipakit-toy-shapes-flux-v1"
REBUILD = "python scripts/build_toy_model.py --family flux"
TEXT_WIDTH = 64
PATCH = 2  # pixel-unshuffle factor: 32x32x3 images <-> 16x16x12 latents <-> 8x8 tokens of 48
AE_CHANNELS = 2  # the learned autoencoder's: 32x32x3 images <-> 16x16x2 latents <-> 8x8 tokens of 8
VAES = {"pixel": {"patch": PATCH}, "autoencoder": {"latent_channels": AE_CHANNELS, "width": 32}}
WEIGHTED = ("transformer", "text_encoder", "text_encoder_2", "clip_vision", "siglip")  # and "vae" when learned
ENCODER_FOR_FORMAT = {"xlabs-flux": "clip_vision", "instantx-flux": "siglip"}


def default_flux_configs(vae: str = "autoencoder") -> dict[str, dict[str, Any]]:
    """The component configs of the toy Flux model with the VAE `vae` ("autoencoder" | "pixel"; JSON-able, stored
    in the weight file's metadata)."""
    if vae not in VAES:
        raise IPAKitError(f"toy Flux VAE {vae!r} is not one of {', '.join(VAES)}")
    channels = 3 * PATCH * PATCH if vae == "pixel" else AE_CHANNELS
    vocab = len(_SPECIALS) + len(vocabulary())
    # Heads of 32 give each image axis 12 rotary dims (6 frequencies); with 16 only one frequency varies
    # usefully over the 8 token positions of a side.
    return {
        "transformer": {"patch_size": 1, "in_channels": channels * 4, "num_layers": 3, "num_single_layers": 3,
                        "attention_head_dim": 32, "num_attention_heads": 3, "joint_attention_dim": TEXT_WIDTH,
                        "pooled_projection_dim": TEXT_WIDTH, "guidance_embeds": False, "axes_dims_rope": [8, 12, 12]},
        "vae": dict(VAES[vae]),
        "text_encoder": {"vocab_size": vocab, "hidden_size": TEXT_WIDTH, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS,
                         "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3},
        "text_encoder_2": {"vocab_size": vocab, "d_model": TEXT_WIDTH, "d_kv": 16, "d_ff": 128, "num_layers": 2,
                           "num_heads": 4, "pad_token_id": 0, "eos_token_id": 3, "decoder_start_token_id": 0},
        "clip_vision": {"image_size": 224, "patch_size": 32, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 768},
        "siglip": {"image_size": 224, "patch_size": 32, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 2, "num_attention_heads": 4},
    }


def build_flux_components(configs: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every component, randomly initialised from `configs` (default: `default_flux_configs()`) and `seed`."""
    from diffusers import FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    cfg = configs or default_flux_configs()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**cfg["transformer"])
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
    torch.manual_seed(seed + 3)
    clip_vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["clip_vision"]))
    torch.manual_seed(seed + 4)
    siglip = SiglipVisionModel(SiglipVisionConfig(**cfg["siglip"]))
    tokenizer = build_tokenizer()
    return {"transformer": transformer, "vae": build_vae(cfg["vae"], seed + 5), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "text_encoder_2": t5, "tokenizer_2": tokenizer, "clip_vision": clip_vision,
            "siglip": siglip}


def build_vae(config: dict[str, Any], seed: int = 0) -> Any:
    """The VAE a config describes: `{"latent_channels", "width"}` the learned autoencoder, `{"patch"}` the exact
    pixel-unshuffle (`--vae pixel`)."""
    from .autoencoder import ConvAutoencoder

    if "patch" in config:
        return PixelUnshuffleVAE(int(config["patch"]))
    torch.manual_seed(seed)
    return ConvAutoencoder(int(config["latent_channels"]), int(config["width"]))


def weighted(configs: dict[str, dict[str, Any]]) -> tuple[str, ...]:
    """The components whose weights a file with these configs holds (the learned VAE's among them)."""
    return WEIGHTED if "patch" in configs["vae"] else (*WEIGHTED, "vae")


def load_flux_components(path: str | os.PathLike = SHIPPED_FLUX) -> dict[str, Any]:
    """Components from a file written by `save_components(..., weighted(configs), FLUX_FORMAT)` (default: the
    shipped one)."""
    configs, tensors = read_model_file(path, FLUX_FORMAT, REBUILD)
    components = build_flux_components(configs)
    load_weights(components, tensors, weighted(configs))
    return components


def flux_configs(path: str | os.PathLike = SHIPPED_FLUX) -> dict[str, dict[str, Any]]:
    """The component configs stored in a toy Flux file (ComfyUI's own Flux model is built from them)."""
    return read_model_file(path, FLUX_FORMAT, REBUILD)[0]


def toy_flux_backbone(fmt: str = "xlabs-flux", path: str | os.PathLike = SHIPPED_FLUX,
                      components: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> Any:
    """The toy Flux model as a training/sampling `DitBackbone` whose image encoder is the one `fmt` reads."""
    from ..hosts.backbone_dit import DitBackbone

    if fmt not in ENCODER_FOR_FORMAT:
        raise IPAKitError(f"the toy Flux model trains {', '.join(ENCODER_FOR_FORMAT)} adapters; got format {fmt!r}")
    parts = dict(components if components is not None else load_flux_components(path))
    parts["image_encoder"] = parts[ENCODER_FOR_FORMAT[fmt]]
    keep = {k: v for k, v in parts.items() if k not in ENCODER_FOR_FORMAT.values()}
    return DitBackbone(components=keep, device=device, keep_encoders=True, max_sequence_length=MAX_TOKENS,
                       family="flux")
