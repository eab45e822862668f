"""Tiny random models and fake weight files in the official layouts, built offline from configs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
from ipa_train.adapter.layout import known_sites
from ipa_train.adapter.modules import IPAdapter

# --------------------------------------------------------------------------------------------------------
# diffusers UNets


def tiny_unet(kind: str = "sd15", seed: int = 0, cross_attention_dim: int | None = None):
    """A diffusers UNet2DConditionModel with SD1.5's (16) or SDXL's (70) cross-attention layout, tiny widths
    (text width 24 / 32 unless given: a perceiver projection needs 64-wide heads, so 128)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if kind == "sd15":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim or 24,
            attention_head_dim=2,
            norm_num_groups=4,
        )
    elif kind == "sdxl":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16, 16),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=cross_attention_dim or 32,
            attention_head_dim=(2, 2, 4),
            norm_num_groups=4,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=32 + 6 * 4,
            use_linear_projection=True,
        )
    else:
        raise ValueError(kind)
    return unet.eval()


def unet_inputs(unet, batch: int = 2, seed: int = 1, text_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    c = unet.config.cross_attention_dim
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    text = torch.randn(batch, text_len, c, generator=g)
    t = torch.tensor([500] * batch)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return sample, t, text, added


def adapter_for_unet(unet, projection: str = "plain", clip_dim: int = 20, tokens: int = 4, fusion: bool = False, seed: int = 0):
    from ipa_train.hosts.diffusers_unet import unet_layer_hidden_sizes

    c = unet.config.cross_attention_dim
    cfg = AdapterConfig(
        projection=projection,
        num_tokens=tokens,
        clip_embedding_dim=clip_dim,
        cross_attention_dim=c,
        layer_hidden_sizes=tuple(unet_layer_hidden_sizes(unet)),
        clip_output="image_embeds" if projection == "plain" else "penultimate",
        fusion=fusion,
        resampler=ResamplerConfig(dim=16, depth=4, heads=2, dim_head=64, ff_mult=4) if projection == "plus" else None,
    )
    return random_adapter(cfg, seed)


def random_adapter(cfg: AdapterConfig, seed: int = 0) -> IPAdapter:
    torch.manual_seed(seed)
    adapter = IPAdapter(cfg)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return adapter.eval()


# --------------------------------------------------------------------------------------------------------
# Official-layout fakes


@dataclass(frozen=True)
class Official:
    """An official h94 file: its projection, CLIP width, family and what the loader must report."""

    name: str
    projection: str
    clip_dim: int
    family: str
    encoder: str
    tokens: int


OFFICIAL = (
    Official("ip-adapter_sd15", "plain", 1024, "sd15", "ViT-H/14", 4),
    Official("ip-adapter_sd15_light", "plain", 1024, "sd15", "ViT-H/14", 4),
    Official("ip-adapter_sd15_vit-G", "plain", 1280, "sd15", "ViT-bigG/14", 4),
    Official("ip-adapter-plus_sd15", "plus", 1280, "sd15", "ViT-H/14", 16),
    Official("ip-adapter-plus-face_sd15", "plus", 1280, "sd15", "ViT-H/14", 16),
    Official("ip-adapter-full-face_sd15", "full", 1280, "sd15", "ViT-H/14", 257),
    Official("ip-adapter_sdxl", "plain", 1280, "sdxl", "ViT-bigG/14", 4),
    Official("ip-adapter_sdxl_vit-h", "plain", 1024, "sdxl", "ViT-H/14", 4),
    Official("ip-adapter-plus_sdxl_vit-h", "plus", 1280, "sdxl", "ViT-H/14", 16),
    # trained with CLIP ViT-L/14 (e.g. by this kit's users)
    Official("ip-adapter_sd15_vit-l", "plain", 768, "sd15", "ViT-L/14", 4),
    Official("ip-adapter-plus_sd15_vit-l", "plus", 1024, "sd15", "ViT-L/14", 16),
)

CROSS = {"sd15": 768, "sdxl": 2048}


def official_config(o: Official, real_size: bool = False) -> AdapterConfig:
    """Config of an official file. `real_size=False` shrinks what detection does not read (layer widths,
    resampler internals) so that fakes stay small; the key layout and detected fields are unchanged."""
    sites = known_sites(o.family)
    hidden = tuple(s.hidden for s in sites) if real_size else tuple(8 for _ in sites)
    c = CROSS[o.family]
    res = None
    if o.projection == "plus":
        if real_size:
            res = ResamplerConfig(dim=c if o.family == "sd15" else 1280, depth=4, heads=12 if o.family == "sd15" else 20, dim_head=64, ff_mult=4)
        else:
            res = ResamplerConfig(dim=64, depth=4, heads=1, dim_head=64, ff_mult=1)
    return AdapterConfig(
        projection=o.projection,  # type: ignore[arg-type]
        num_tokens=o.tokens,
        clip_embedding_dim=o.clip_dim,
        cross_attention_dim=c,
        layer_hidden_sizes=hidden,
        clip_output="image_embeds" if o.projection == "plain" else "penultimate",
        resampler=res,
    )


def official_groups(o: Official, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """`{"image_proj": {...}, "ip_adapter": {...}}` with the official key names, fp16 like the h94 files."""
    adapter = random_adapter(official_config(o), seed)
    sd = adapter.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        group, rest = k.split(".", 1)
        groups[group][rest] = v.half().clone()
    return groups


def write_official(o: Official, path, container: str, seed: int = 0):
    """Write a fake official file: `.bin` (two nested groups, torch.save) or flat `.safetensors`."""
    from safetensors.torch import save_file

    groups = official_groups(o, seed)
    if container == "bin":
        torch.save(groups, path)
    else:
        flat = {f"{g}.{k}": v for g, d in groups.items() for k, v in d.items()}
        save_file(flat, str(path))
    return groups


def load_into_diffusers(unet, adapter: IPAdapter, weight: float) -> None:
    """diffusers' own IP-Adapter processors and projection on `unet`, from `adapter`'s official-layout weights."""
    sd = adapter.state_dict()
    groups = {g: {k[len(g) + 1 :]: v for k, v in sd.items() if k.startswith(g + ".")} for g in ("image_proj", "ip_adapter")}
    unet._load_ip_adapter_weights([groups], low_cpu_mem_usage=False)
    for p in unet.attn_processors.values():
        if hasattr(p, "scale"):
            p.scale = [weight]
