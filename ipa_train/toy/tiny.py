"""A tiny, randomly initialised Stable-Diffusion-architecture backbone, built offline from configs.

Used by the demo and the tests to run the whole pipeline (data, training, export, sampling) in seconds on a
CPU. Random weights check the plumbing, not image quality. The tokenizer is a real `CLIPTokenizer` whose
vocabulary (the 256 byte symbols, their end-of-word forms, a few merges) is written here, so nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TEXT_WIDTH = 32  # text hidden size = UNet cross-attention width
CLIP_HIDDEN = 32  # vision hidden size (penultimate width)
CLIP_PROJECTION = 24  # vision image_embeds width
MAX_TOKENS = 32
_MERGES = ("t h", "th e</w>", "o f</w>", "i n", "o n</w>", "a n", "an d</w>", "e r</w>", "a t</w>")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer(folder: str | os.PathLike, max_length: int = MAX_TOKENS) -> Path:
    """Write a small CLIP BPE vocabulary (vocab.json, merges.txt) and save it as a `CLIPTokenizer` folder."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m.split()) for m in _MERGES]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "unk_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))  # checks the files, adds the rest
    return folder


def tiny_unet(seed: int = 0) -> Any:
    """SD1.5 block layout (16 cross-attention layers) with tiny widths; latents 4 channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=8,
    )


def tiny_vae(seed: int = 0) -> Any:
    """AutoencoderKL with a 4x downscale (3 blocks) and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        sample_size=64,
    )


def tiny_text_encoder(vocab_size: int, seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg)


def tiny_image_encoder(seed: int = 0) -> Any:
    """CLIP vision model at the real 224 px input (patch 32: 50 tokens), tiny widths."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=CLIP_HIDDEN, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, projection_dim=CLIP_PROJECTION)
    return CLIPVisionModelWithProjection(cfg)


def tiny_scheduler(prediction_type: str = "epsilon") -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=prediction_type, clip_sample=False)


def tiny_components(tokenizer_dir: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """Every component of a tiny SD backbone, by the names `DiffusersBackbone(components=...)` takes."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tokenizer_dir)))
    return {
        "unet": tiny_unet(seed),
        "vae": tiny_vae(seed + 1),
        "text_encoder": tiny_text_encoder(len(tokenizer), seed + 2),
        "tokenizer": tokenizer,
        "scheduler": tiny_scheduler(prediction_type),
        "image_encoder": tiny_image_encoder(seed + 3),
    }


def write_tiny_models(folder: str | os.PathLike, seed: int = 0, prediction_type: str = "epsilon") -> tuple[Path, Path]:
    """Save a tiny base model (diffusers layout) and image encoder with `save_pretrained`.

    Returns:
        (base model folder, image encoder folder), loadable by `DiffusersBackbone(base, encoder)`.
    """
    folder = Path(folder)
    base, encoder = folder / "base", folder / "image_encoder"
    parts = tiny_components(base / "tokenizer", seed, prediction_type)
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        parts[name].save_pretrained(str(base / name))
    parts["image_encoder"].save_pretrained(str(encoder))
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
    }))
    return base, encoder


def write_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random full `CLIPModel` (text + vision towers) and its offline tokenizer in one folder.

    The folder loads like a hub CLIP checkpoint (`CLIPModel.from_pretrained`, `CLIPTokenizer.from_pretrained`),
    so evaluation runs offline in tests and in the tiny sweep. Its scores check the plumbing, not image quality.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(folder)))
    vocab = len(tokenizer)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=CLIP_PROJECTION,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=CLIP_HIDDEN, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=CLIP_PROJECTION)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=CLIP_PROJECTION))
    model.save_pretrained(str(folder))
    return folder


def tiny_adapter(unet: Any, seed: int = 0) -> Any:
    """A plain `IPAdapter` fitting `unet` and the tiny image encoder, image K/V initialised from the UNet."""
    from ..adapter.config import AdapterConfig
    from ..adapter.modules import IPAdapter
    from ..hosts.diffusers_unet import init_from_unet, unet_layer_hidden_sizes

    torch.manual_seed(seed)
    config = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=CLIP_PROJECTION,
                           cross_attention_dim=int(unet.config.cross_attention_dim),
                           layer_hidden_sizes=tuple(unet_layer_hidden_sizes(unet)), variant="tiny-random")
    adapter = IPAdapter(config)
    init_from_unet(adapter, unet)
    return adapter.eval()
