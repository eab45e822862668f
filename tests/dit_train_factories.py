"""Tiny random Flux / SD3 training stacks for `DitBackbone(components=...)` or `(factories=...)`: transformer,
4-channel VAE (4x downscale), CLIP text encoders, a T5 encoder (the CLIP BPE tokenizer serves it: only token ids
matter), and the image encoders at the official output widths (SigLIP 1152, CLIP ViT-L projection 768), so the
exported files pass the loaders' width checks."""

from __future__ import annotations

from pathlib import Path

import torch

from ipa_train.toy.tiny import tiny_vae, write_tokenizer

T5_WIDTH = 32


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer(folder)))


def clip_text(vocab: int, width: int, seed: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=projection or width)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def t5(vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2))


def siglip(seed: int = 5):
    """SigLIP vision tower with so400m's width (1152) and its attention-pooling head, 28 px, one layer."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=28, patch_size=14)).eval()


def clip_vit(seed: int = 6):
    """CLIP vision tower with ViT-L/14's projection width (768) at 224 px (patch 32), tiny otherwise."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=32,
                                                          intermediate_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, projection_dim=768)).eval()


def flux_transformer(seed: int = 0, guidance: bool = True, double: int = 2, single: int = 2):
    """Flux layout: 2 heads x 16, T5 width 32, CLIP pooled 32; 4 latent channels packed 2x2 -> 16 inputs."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=double, num_single_layers=single,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                  pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval()


def sd3_transformer(seed: int = 0, blocks: int = 2):
    """SD3.5-Large layout (qk RMS norms), width 128 = 2 heads x 64, T5 width 32, pooled 16."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=blocks, attention_head_dim=64,
                                 num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=128,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                 qk_norm="rms_norm").eval()


def _vae(seed: int, shift: float, scale: float):
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae


def flux_factories(folder: Path, fmt: str = "xlabs-flux", seed: int = 0, guidance: bool = True) -> dict:
    """Zero-argument builders of each component (the meta-device builds of `DitBackbone(factories=...)` read
    sizes from them); the one tokenizer is written and read now."""
    tok = _tokenizer(Path(folder) / "tokenizer")
    n = len(tok)
    return {"transformer": lambda: flux_transformer(seed, guidance), "vae": lambda: _vae(seed + 1, 0.1159, 0.3611),
            "text_encoder": lambda: clip_text(n, 32, seed + 2), "tokenizer": lambda: tok,
            "text_encoder_2": lambda: t5(n, seed + 3), "tokenizer_2": lambda: tok,
            "image_encoder": lambda: clip_vit(seed + 4) if fmt == "xlabs-flux" else siglip(seed + 4)}


def sd3_factories(folder: Path, seed: int = 0) -> dict:
    tok = _tokenizer(Path(folder) / "tokenizer")
    n = len(tok)
    return {"transformer": lambda: sd3_transformer(seed), "vae": lambda: _vae(seed + 1, 0.0609, 1.5305),
            "text_encoder": lambda: clip_text(n, 8, seed + 2, projection=8), "tokenizer": lambda: tok,
            "text_encoder_2": lambda: clip_text(n, 16, seed + 3, projection=8), "tokenizer_2": lambda: tok,
            "text_encoder_3": lambda: t5(n, seed + 4), "tokenizer_3": lambda: tok, "image_encoder": lambda: siglip(seed + 5)}


def factories(folder: Path, fmt: str, seed: int = 0) -> dict:
    return sd3_factories(folder, seed) if fmt == "instantx-sd3" else flux_factories(folder, fmt, seed)


def components(folder: Path, fmt: str, seed: int = 0) -> dict:
    """Every component built now (for `DitBackbone(components=...)`)."""
    return {name: build() for name, build in factories(folder, fmt, seed).items()}


def write_folder(folder: Path, fmt: str, seed: int = 0) -> tuple[Path, Path]:
    """A diffusers-style base-model folder (transformer/, vae/, text_encoder*/, tokenizer*/) and an image-encoder
    folder, as the command line reads them."""
    folder = Path(folder)
    parts = components(folder / "tmp", fmt, seed)
    encoder = folder / "image_encoder"
    parts.pop("image_encoder").save_pretrained(str(encoder))
    base = folder / "base"
    for name, module in parts.items():
        module.save_pretrained(str(base / name))
    return base, encoder
