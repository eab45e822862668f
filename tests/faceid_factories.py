"""Fake h94 FaceID files in their official layouts (faceid.md section 1b), random weights, small where detection
does not look (layer widths, MLP hidden width, perceiver internals), real where it does (face width 512,
cross-attention width, token count, CLIP width, layer count, LoRA key layout)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
from ipa_train.adapter.layout import known_sites
from tests.factories import CROSS, random_adapter


@dataclass(frozen=True)
class FaceOfficial:
    name: str
    projection: str
    family: str
    tokens: int
    lora: bool
    encoder: str  # what inspect must report


FACE_OFFICIAL = (
    FaceOfficial("ip-adapter-faceid_sd15", "faceid", "sd15", 4, True, "none"),
    FaceOfficial("ip-adapter-faceid_sdxl", "faceid", "sdxl", 4, True, "none"),
    FaceOfficial("ip-adapter-faceid-plus_sd15", "faceid-plus", "sd15", 4, True, "ViT-H/14"),
    FaceOfficial("ip-adapter-faceid-plusv2_sd15", "faceid-plusv2", "sd15", 4, True, "ViT-H/14"),
    FaceOfficial("ip-adapter-faceid-plusv2_sdxl", "faceid-plusv2", "sdxl", 4, True, "ViT-H/14"),
    FaceOfficial("ip-adapter-faceid-portrait_sd15", "faceid-portrait", "sd15", 16, False, "none"),
    FaceOfficial("ip-adapter-faceid-portrait-v11_sd15", "faceid-portrait", "sd15", 16, False, "none"),
    FaceOfficial("ip-adapter-faceid-portrait_sdxl", "faceid-portrait", "sdxl", 16, False, "none"),
    FaceOfficial("ip-adapter-faceid-portrait_sdxl_unnorm", "faceid-portrait-unnorm", "sdxl", 16, False, "none"),
)


def face_config(o: FaceOfficial, hidden: tuple[int, ...] | None = None, cross: int | None = None,
                mlp_hidden: int = 8) -> AdapterConfig:
    c = cross or CROSS[o.family]
    layers = hidden or tuple(8 for _ in known_sites(o.family))
    res = None
    clip_dim, clip_output = 512, "none"
    if o.projection in ("faceid-plus", "faceid-plusv2"):
        res = ResamplerConfig(dim=c, depth=1, heads=1, dim_head=64, ff_mult=1)
        clip_dim, clip_output = 1280, "penultimate"
    elif o.projection == "faceid-portrait-unnorm":
        res = ResamplerConfig(dim=64, depth=1, heads=1, dim_head=64, ff_mult=1)
    return AdapterConfig(
        projection=o.projection,  # type: ignore[arg-type]
        num_tokens=o.tokens,
        clip_embedding_dim=clip_dim,
        cross_attention_dim=c,
        layer_hidden_sizes=layers,
        clip_output=clip_output,  # type: ignore[arg-type]
        resampler=res,
        face_embedding_dim=512,
        face_hidden_dim=0 if o.projection == "faceid-portrait-unnorm" else mlp_hidden,
    )


def random_lora(hidden: tuple[int, ...], cross: int, rank: int, seed: int = 0, scale: float = 0.05,
                relative: bool = False) -> dict[str, torch.Tensor]:
    """`{i}.to_{q,k,v,out}_lora.{down,up}.weight` for every processor: attn1 (i = 2k) and attn2 (i = 2k + 1).

    scale: the std of every entry; or, when `relative`, the size of each `up @ down` relative to a fan-in
    initialised weight of its layer (Frobenius; down ~ N(0, 1/in), up ~ N(0, scale^2/rank)). A trained LoRA is a
    correction of its layers; entries of a fixed std make the text K/V delta grow with the text width (40x the
    weight at SDXL's 2048), which turns a deep tiny UNet chaotic: fp32 rounding then moves eps by O(1)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k, h in enumerate(hidden):
        for i in (2 * k, 2 * k + 1):
            for proj in ("q", "k", "v", "out"):
                inp = cross if (i % 2 and proj in ("k", "v")) else h
                down_std, up_std = (inp**-0.5, scale * rank**-0.5) if relative else (scale, scale)
                out[f"{i}.to_{proj}_lora.down.weight"] = torch.randn(rank, inp, generator=g) * down_std
                out[f"{i}.to_{proj}_lora.up.weight"] = torch.randn(h, rank, generator=g) * up_std
    return out


def lora_rank_for(o: FaceOfficial) -> int:
    """The official files' rank is 128; all fakes but faceid_sd15 use 4 to stay small."""
    return 128 if o.name == "ip-adapter-faceid_sd15" else 4


def face_groups(o: FaceOfficial, seed: int = 0, **config_kw) -> dict[str, dict[str, torch.Tensor]]:
    cfg = face_config(o, **config_kw)
    adapter = random_adapter(cfg, seed)
    groups: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in adapter.state_dict().items():
        group, rest = k.split(".", 1)
        groups[group][rest] = v.half().clone()
    if o.lora:
        lora = random_lora(cfg.layer_hidden_sizes, cfg.cross_attention_dim, lora_rank_for(o), seed)
        groups["ip_adapter"].update({k: v.half() for k, v in lora.items()})
    return groups


def write_face(o: FaceOfficial, path, container: str, seed: int = 0, **config_kw):
    from safetensors.torch import save_file

    groups = face_groups(o, seed, **config_kw)
    if container == "bin":
        torch.save(groups, path)
    else:
        save_file({f"{g}.{k}": v for g, d in groups.items() for k, v in d.items()}, str(path))
    return groups
