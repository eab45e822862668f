"""DiT IP-Adapter files (Flux.1 and SD3.5): one declarative row per official layout, detection and sizes.

Layouts (keys after the `.bin`'s nested dicts are flattened with dots, as the safetensors versions store them):
- InstantX FLUX.1-dev: `image_proj.proj.{0,2}.*` (MLP over SigLIP's pooled output), `image_proj.norm.*`,
  `ip_adapter.{j}.to_{k,v}_ip.weight` for j = 0..56 (19 double blocks, then 38 single blocks), no biases.
- XLabs flux-ip-adapter v1/v2: `ip_adapter_proj_model.{proj,norm}.*` (linear projection of CLIP ViT-L/14
  image_embeds, 4 or 16 tokens), `double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`, i = 0..18.
- InstantX SD3.5-Large: `image_proj.*` (time-conditioned resampler over SigLIP's penultimate hidden states,
  `time_embedding.*`), `ip_adapter.{j}.{norm_ip.linear, to_k_ip, to_v_ip, norm_q, norm_k, norm_ip_k}.*`, j = 0..37.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import AdapterFormatError
from .files import _fail, clean

SIGLIP = "SigLIP-so400m/14-384"
SIGLIP_FILE = "sigclip_vision_patch14_384.safetensors"
SIGLIP_WIDTH = 1152  # SigLIP so400m hidden size (pooled output and hidden states)
VIT_L = "ViT-L/14"
VIT_L_WIDTH = 768  # CLIP ViT-L/14 image_embeds


@dataclass(frozen=True)
class DitVariant:
    """One official DiT adapter layout: how to recognise it and what it needs."""

    format: str  # "instantx-flux" | "xlabs-flux" | "instantx-sd3"
    family: str  # "flux" | "sd3"
    encoder: str
    encoder_width: int  # width of the encoder output the projection reads
    clip_output: str  # "siglip_pooled" | "image_embeds" | "penultimate"
    requires: tuple[str, ...]  # keys that must all be present
    label: str


DIT_VARIANTS: tuple[DitVariant, ...] = (
    DitVariant("instantx-sd3", "sd3", SIGLIP, SIGLIP_WIDTH, "penultimate",
               ("image_proj.latents", "image_proj.time_embedding.linear_1.weight", "ip_adapter.0.norm_ip.linear.weight"),
               "InstantX SD3.5-Large IP-Adapter"),
    DitVariant("instantx-flux", "flux", SIGLIP, SIGLIP_WIDTH, "siglip_pooled",
               ("image_proj.proj.0.weight", "image_proj.proj.2.weight", "image_proj.norm.weight",
                "ip_adapter.0.to_k_ip.weight"),
               "InstantX FLUX.1-dev IP-Adapter"),
    DitVariant("xlabs-flux", "flux", VIT_L, VIT_L_WIDTH, "image_embeds",
               ("ip_adapter_proj_model.proj.weight", "ip_adapter_proj_model.norm.weight"),
               "XLabs flux-ip-adapter"),
)

# The base models the official files were made for: width, double (joint) and single blocks.
FLUX_DEV = ("FLUX.1", 3072, 19, 38)
SD35_LARGE = ("SD3.5-Large", 2432, 38, 0)
SD35_MEDIUM = ("SD3.5-Medium", 1536, 24, 0)


@dataclass(frozen=True)
class DitConfig:
    """Sizes of a DiT adapter, measured from its tensors."""

    format: str
    family: str
    encoder: str
    clip_output: str
    clip_embedding_dim: int  # encoder width the projection reads
    num_tokens: int
    context_dim: int  # width of the image tokens (input of the per-block K/V projections)
    hidden_size: int  # the model's width (output of the per-block K/V projections)
    double_blocks: int  # double blocks (Flux) or joint blocks (SD3) patched
    single_blocks: int  # Flux single blocks patched
    proj_hidden: int = 0  # InstantX Flux MLP width
    head_dim: int = 0  # SD3: width of the adapter's RMS norms (the model's head width)
    resampler_dim: int = 0  # SD3 resampler width
    resampler_depth: int = 0
    resampler_heads: int = 0
    timestep_in_dim: int = 0
    timestep_emb_dim: int = 0

    @property
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    @property
    def variant(self) -> str:
        return self.format

    # What training asks every adapter config: DiT adapters are never FaceID, fused or LoRA-carrying.
    is_faceid = False
    fusion = False
    lora_rank = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_variant(tensors: dict[str, torch.Tensor]) -> DitVariant | None:
    """The DiT layout these tensors are in, or None for a UNet (or unknown) layout."""
    for v in DIT_VARIANTS:
        if all(k in tensors for k in v.requires):
            return v
    return None


def _shape(tensors: dict[str, torch.Tensor], key: str, path: str, ndim: int) -> tuple[int, ...]:
    t = tensors.get(key)
    if t is None:
        raise _fail(path, f"missing key '{key}'; the file is incomplete or damaged: download it again")
    if t.ndim != ndim or t.numel() == 0:
        raise _fail(path, f"'{key}' has shape {tuple(t.shape)}; expected a non-empty {ndim}-d tensor: the file is damaged")
    if not t.is_floating_point():
        raise _fail(path, f"'{key}' holds {str(t.dtype).replace('torch.', '')} values; adapter weights are floating "
                          "point: the file is damaged or not an adapter")
    return tuple(t.shape)


def _indices(tensors: dict[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in tensors if (m := rx.match(k))})


def _contiguous(ids: list[int], path: str, what: str) -> int:
    if not ids or ids != list(range(len(ids))):
        shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
        raise _fail(path, f"{what} are numbered [{shown}]; expected 0, 1, 2, ... without gaps: the file is incomplete")
    return len(ids)


def block_keys(fmt: str, j: int) -> dict[str, str]:
    """File key of each per-block tensor of block j of a `fmt` file, by the name our modules use."""
    if fmt == "xlabs-flux":
        p = f"double_blocks.{j}.processor.ip_adapter_double_stream_"
        return {"to_k_ip.weight": p + "k_proj.weight", "to_k_ip.bias": p + "k_proj.bias",
                "to_v_ip.weight": p + "v_proj.weight", "to_v_ip.bias": p + "v_proj.bias"}
    names = ["to_k_ip.weight", "to_v_ip.weight"]
    if fmt == "instantx-sd3":
        names += ["norm_ip.linear.weight", "norm_ip.linear.bias", "norm_q.weight", "norm_k.weight", "norm_ip_k.weight"]
    return {n: f"ip_adapter.{j}.{n}" for n in names}


def image_proj_prefix(fmt: str) -> str:
    return "ip_adapter_proj_model." if fmt == "xlabs-flux" else "image_proj."


def _measure(v: DitVariant, t: dict[str, torch.Tensor], path: str) -> DitConfig:
    if v.format == "xlabs-flux":
        rows, clip_dim = _shape(t, "ip_adapter_proj_model.proj.weight", path, 2)
        (ctx,) = _shape(t, "ip_adapter_proj_model.norm.weight", path, 1)
        ids = _indices(t, r"^double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_k_proj\.weight$")
        n = _contiguous(ids, path, "the double blocks' ip_adapter_double_stream_k_proj weights")
        hidden = _shape(t, block_keys("xlabs-flux", 0)["to_k_ip.weight"], path, 2)[0]
        if rows % ctx:
            raise _fail(path, f"ip_adapter_proj_model.proj.weight has {rows} rows, not a multiple of the token width "
                              f"{ctx} (norm.weight): the file is damaged")
        return DitConfig(v.format, v.family, v.encoder, v.clip_output, clip_dim, rows // ctx, ctx, hidden, n, 0)
    ids = _indices(t, r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")
    n = _contiguous(ids, path, "the 'ip_adapter' blocks")
    hidden, ctx_in = _shape(t, "ip_adapter.0.to_k_ip.weight", path, 2)
    if v.format == "instantx-flux":
        proj_hidden, clip_dim = _shape(t, "image_proj.proj.0.weight", path, 2)
        rows = _shape(t, "image_proj.proj.2.weight", path, 2)[0]
        (ctx,) = _shape(t, "image_proj.norm.weight", path, 1)
        if rows % ctx:
            raise _fail(path, f"image_proj.proj.2.weight has {rows} rows, not a multiple of the token width {ctx} "
                              "(image_proj.norm.weight): the file is damaged")
        double = min(n, FLUX_DEV[2])
        return DitConfig(v.format, v.family, v.encoder, v.clip_output, clip_dim, rows // ctx, ctx, hidden, double,
                         n - double, proj_hidden=proj_hidden)
    _, tokens, dim = _shape(t, "image_proj.latents", path, 3)
    clip_dim = _shape(t, "image_proj.proj_in.weight", path, 2)[1]
    ctx = _shape(t, "image_proj.proj_out.weight", path, 2)[0]
    temb_dim, temb_in = _shape(t, "image_proj.time_embedding.linear_1.weight", path, 2)
    depth = _contiguous(_indices(t, r"^image_proj\.layers\.(\d+)\."), path, "the resampler's layers")
    inner = _shape(t, "image_proj.layers.0.0.to_q.weight", path, 2)[0]
    (head_dim,) = _shape(t, "ip_adapter.0.norm_q.weight", path, 1)
    return DitConfig(v.format, v.family, v.encoder, v.clip_output, clip_dim, tokens, ctx, hidden, n, 0,
                     head_dim=head_dim, resampler_dim=dim, resampler_depth=depth, resampler_heads=max(1, inner // 64),
                     timestep_in_dim=temb_in, timestep_emb_dim=temb_dim)


def _own_encoder_width(metadata: dict[str, str] | None) -> int | None:
    """The encoder width our trainer recorded in a file it wrote (`ipa_kit.dit_config`), else None."""
    import json

    try:
        return int(json.loads((metadata or {})["ipa_kit.dit_config"])["clip_embedding_dim"])
    except (KeyError, TypeError, ValueError):
        return None


def detect_dit_config(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> DitConfig:
    """Measure a DiT adapter's config; every inconsistency is one `AdapterFormatError` naming the file.

    The projection must read the official encoder's width, except in a file our trainer wrote for a smaller
    encoder (the shapes world's toy models), whose metadata records the width it was trained with."""
    path = os.fspath(path)
    v = find_variant(tensors)
    if v is None:
        raise _fail(path, "not a Flux or SD3.5 IP-Adapter layout")
    try:
        cfg = _measure(v, tensors, path)
    except AdapterFormatError:
        raise
    except (IndexError, ValueError, ZeroDivisionError) as e:
        raise _fail(path, f"the {v.label} tensors have unexpected shapes ({clean(str(e), 80)}): the file is damaged") from None
    if cfg.clip_embedding_dim not in (v.encoder_width, _own_encoder_width(metadata)):
        raise _fail(path, f"the {v.label} projection reads width {cfg.clip_embedding_dim}, but {v.encoder} gives "
                          f"{v.encoder_width}: the file is damaged or not an official {v.label}")
    if cfg.context_dim != (_block_in := _block_input_width(cfg, tensors)):
        raise _fail(path, f"the image tokens are {cfg.context_dim} wide but block 0's to_k_ip reads {_block_in}: "
                          "the file is damaged")
    _check_blocks(cfg, tensors, path)
    return cfg


def _block_input_width(cfg: DitConfig, tensors: dict[str, torch.Tensor]) -> int:
    return int(tensors[block_keys(cfg.format, 0)["to_k_ip.weight"]].shape[1])


def _expected_block_shapes(cfg: DitConfig) -> dict[str, tuple[int, ...]]:
    kv = (cfg.hidden_size, cfg.context_dim)
    shapes: dict[str, tuple[int, ...]] = {"to_k_ip.weight": kv, "to_v_ip.weight": kv}
    if cfg.format == "xlabs-flux":
        shapes.update({"to_k_ip.bias": (cfg.hidden_size,), "to_v_ip.bias": (cfg.hidden_size,)})
    if cfg.format == "instantx-sd3":
        shapes.update({"norm_ip.linear.weight": (2 * cfg.context_dim, cfg.timestep_emb_dim),
                       "norm_ip.linear.bias": (2 * cfg.context_dim,), "norm_q.weight": (cfg.head_dim,),
                       "norm_k.weight": (cfg.head_dim,), "norm_ip_k.weight": (cfg.head_dim,)})
    return shapes


def _check_blocks(cfg: DitConfig, tensors: dict[str, torch.Tensor], path: str) -> None:
    expected = _expected_block_shapes(cfg)
    for j in range(cfg.blocks):
        for name, key in block_keys(cfg.format, j).items():
            t = tensors.get(key)
            if t is None:
                raise _fail(path, f"missing key '{key}'; the file is incomplete: download it again")
            if tuple(t.shape) != expected[name] or not t.is_floating_point():
                raise _fail(path, f"'{key}' has shape {tuple(t.shape)} ({str(t.dtype).replace('torch.', '')}); "
                                  f"expected {expected[name]} floating point like block 0: the file is damaged")


def dit_info(cfg: DitConfig, tensors: dict[str, torch.Tensor], path: str | os.PathLike,
             non_finite: list[str]) -> dict[str, Any]:
    """The `inspect --json` object of a DiT adapter file."""
    return {
        "file": os.fspath(path), "variant": cfg.format, "family": cfg.family, "format": cfg.format,
        "projection": {"instantx-flux": "mlp", "xlabs-flux": "linear", "instantx-sd3": "time-resampler"}[cfg.format],
        "num_tokens": cfg.num_tokens, "clip_embedding_dim": cfg.clip_embedding_dim, "clip_output": cfg.clip_output,
        "encoder": cfg.encoder, "cross_attention_dim": cfg.context_dim, "hidden_size": cfg.hidden_size,
        "blocks": cfg.blocks, "double_blocks": cfg.double_blocks, "single_blocks": cfg.single_blocks,
        "cross_attention_layers": cfg.blocks, "parameters": sum(t.numel() for t in tensors.values()),
        "fusion": False, "source": "official", "non_finite_tensors": non_finite,
    }


# Training from scratch: the official shapes, scaled to the base model's widths

SD35_RESAMPLER_DIM = 1280  # InstantX SD3.5-Large's resampler width (timestep embedding width too)
TIMESTEP_IN_DIM = 320  # sinusoidal width the resampler's time embedding reads


def variant_row(fmt: str) -> DitVariant:
    return next(v for v in DIT_VARIANTS if v.format == fmt)


def training_config(fmt: str, num_tokens: int, context_dim: int, hidden: int, double: int, single: int,
                    clip_dim: int, head_dim: int) -> DitConfig:
    """The `DitConfig` a from-scratch run of format `fmt` trains: the official layout (InstantX Flux: MLP of width
    2 x the encoder's, every double and single block; XLabs: linear projection, double blocks only; SD3.5: a
    4-layer time resampler of width 1280 at SD3.5-Large's 2432, proportional and a multiple of 64 otherwise)."""
    v = variant_row(fmt)
    if fmt == "instantx-flux":
        return DitConfig(fmt, v.family, v.encoder, v.clip_output, clip_dim, num_tokens, context_dim, hidden, double,
                         single, proj_hidden=2 * clip_dim)
    if fmt == "xlabs-flux":
        return DitConfig(fmt, v.family, v.encoder, v.clip_output, clip_dim, num_tokens, context_dim, hidden, double, 0)
    dim = SD35_RESAMPLER_DIM if hidden == SD35_LARGE[1] else max(64, round(hidden * SD35_RESAMPLER_DIM / SD35_LARGE[1] / 64) * 64)
    return DitConfig(fmt, v.family, v.encoder, v.clip_output, clip_dim, num_tokens, hidden, hidden, double, 0,
                     head_dim=head_dim, resampler_dim=dim, resampler_depth=4, resampler_heads=dim // 64,
                     timestep_in_dim=TIMESTEP_IN_DIM, timestep_emb_dim=dim)
