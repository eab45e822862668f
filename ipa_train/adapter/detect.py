"""Splitting a file's tensors into the adapter's groups, detecting the variant and measuring its config."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AdapterFormatError
from .config import CONFIG_METADATA_KEY, AdapterConfig, ResamplerConfig
from .faceid import FACE_MEASURE, face_fields
from .faceid_lora import check_lora, is_lora_key
from .files import _fail, clean, read_tensors, state_mismatch
from .modules import IPAdapter, layer_key

CLIP_TOKENS = 257  # ViT/14 at 224 px: 16*16 patches + CLS

@dataclass
class AdapterState:
    """The three groups of tensors of an adapter file, with their official key names (no prefix)."""

    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]
    fusion: dict[str, torch.Tensor]
    metadata: dict[str, str]
    source: str  # "official" | "kit" | "training-checkpoint" | "training-checkpoint-deduplicated"
    path: str
    lora: dict[str, torch.Tensor] = field(default_factory=dict)  # FaceID: `{i}.to_X_lora.*` from 'ip_adapter'


# --------------------------------------------------------------------------------------------------------
# Splitting into groups

_GROUP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("image_proj.", "image_proj"),
    ("image_proj_model.", "image_proj"),
    ("ip_adapter.", "ip_adapter"),
    ("adapter_modules.", "ip_adapter"),
    ("fusion.", "fusion"),
    # The fusion layers of the original fused-mode training script sit at the top level.
    ("query.", "fusion"),
    ("key.", "fusion"),
    ("value.", "fusion"),
)

# diffusers attention-processor weights, as saved from a UNet in a training checkpoint.
_UNET_IP_KEY = re.compile(
    r"^(?:unet\.)?(?:module\.)?(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?attentions\.(\d+)\."
    r"transformer_blocks\.(\d+)\.attn2\.processor\.(to_k_ip|to_v_ip)(?:\.0)?\.weight$"
)
_SECTION_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def _remap_unet_processor_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`unet.<block>.attentions.j.transformer_blocks.t.attn2.processor.to_k_ip.weight` -> `{2k+1}.to_k_ip.weight`.

    k counts the cross-attention layers in diffusers processor order: down_blocks, up_blocks, mid_block.
    """
    found: dict[tuple[int, int, int, int], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _UNET_IP_KEY.match(name)
        if m:
            section, block, attn, tb, proj = m.groups()
            pos = (_SECTION_ORDER[section], int(block or 0), int(attn), int(tb))
            found.setdefault(pos, {})[proj] = t
    out: dict[str, torch.Tensor] = {}
    for k, pos in enumerate(sorted(found)):
        for proj, t in found[pos].items():
            out[f"{layer_key(k)}.{proj}.weight"] = t
    return out


def _looks_like(tensors: dict[str, torch.Tensor]) -> str | None:
    keys = list(tensors)
    if any("lora_down" in k or "lora_up" in k or k.startswith("lora_unet_") or ".lora_A." in k for k in keys):
        return (
            "this is a LoRA file, not an IP-Adapter. Put it in ComfyUI/models/loras and load it with a LoRA loader; "
            "IP-Adapter files have 'image_proj' and 'ip_adapter' weights"
        )
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "this is a Stable Diffusion checkpoint, not an IP-Adapter. Put it in ComfyUI/models/checkpoints"
    if any(k.startswith("vision_model.") for k in keys):
        return "this is a CLIP vision model, not an IP-Adapter. Put it in ComfyUI/models/clip_vision"
    return None


def split_groups(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> AdapterState:
    groups: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}, "fusion": {}}
    raw = False
    for name, t in tensors.items():
        for prefix, group in _GROUP_PREFIXES:
            if name.startswith(prefix):
                if prefix in ("query.", "key.", "value."):
                    groups[group][name] = t  # keep "query.weight" etc.
                else:
                    groups[group][name[len(prefix) :]] = t
                raw = raw or prefix in ("image_proj_model.", "adapter_modules.")
                break
    source = "kit" if CONFIG_METADATA_KEY in metadata else ("training-checkpoint" if raw else "official")
    if not groups["ip_adapter"]:
        remapped = _remap_unet_processor_keys(tensors)
        if remapped:
            groups["ip_adapter"] = remapped
            source = "training-checkpoint-deduplicated"
    if not groups["image_proj"] and not groups["ip_adapter"]:
        hint = _looks_like(tensors)
        sample = ", ".join(sorted(tensors)[:4])
        raise _fail(
            path,
            (hint + ". ") if hint else
            f"not an IP-Adapter: expected keys starting with 'image_proj.' and 'ip_adapter.' "
            f"(or a training checkpoint's 'image_proj_model.' / 'adapter_modules.'), found {len(tensors)} keys "
            f"such as {sample or 'none'}",
        )
    if not groups["image_proj"]:
        raise _fail(path, "has 'ip_adapter' weights but no 'image_proj' (projection model) weights; the file is incomplete")
    if not groups["ip_adapter"]:
        raise _fail(
            path,
            "has projection weights but no 'ip_adapter' (image key/value) weights. A training checkpoint saved "
            "with safetensors de-duplication drops them from 'adapter_modules'; point the loader (or "
            "`python -m ipa_train convert`) at the checkpoint's model.safetensors that still holds the "
            "'unet.*.attn2.processor.to_k_ip' weights, or save the checkpoint with safe_serialization=False",
        )
    lora = {k: t for k, t in groups["ip_adapter"].items() if is_lora_key(k)}
    groups["ip_adapter"] = {k: t for k, t in groups["ip_adapter"].items() if not is_lora_key(k)}
    for group, tensors_of_group in (*groups.items(), ("ip_adapter", lora)):
        _check_tensors(path, group, tensors_of_group)
    return AdapterState(groups["image_proj"], groups["ip_adapter"], groups["fusion"], metadata, source, path, lora)


def _check_tensors(path: str, group: str, tensors: dict[str, torch.Tensor]) -> None:
    """Adapter weights are non-empty floating-point tensors of rank 1 to 3."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise _fail(path, f"'{group}.{name}' holds {str(t.dtype).replace('torch.', '')} values; adapter weights "
                              "are floating point (float32/float16/bfloat16): the file is damaged or not an adapter")
        if t.numel() == 0 or not 1 <= t.ndim <= 3:
            raise _fail(path, f"'{group}.{name}' has shape {tuple(t.shape)}; adapter weights are non-empty tensors "
                              "with 1 to 3 dimensions: the file is damaged or not an adapter")


def non_finite(state: AdapterState) -> list[str]:
    """Names of the adapter tensors holding NaN or infinite values."""
    return [f"{g}.{k}" for g in ("image_proj", "ip_adapter", "fusion") for k, t in getattr(state, g).items()
            if not bool(torch.isfinite(t).all())]


def read_adapter_state(path: str | os.PathLike) -> AdapterState:
    tensors, metadata, real = read_tensors(path)
    return split_groups(tensors, metadata, os.fspath(real))


# --------------------------------------------------------------------------------------------------------
# Variant detection: a declarative table, first matching row wins.


@dataclass(frozen=True)
class Variant:
    name: str
    projection: str  # "plain" | "plus" | "full" | "" for refused variants
    clip_output: str
    requires: tuple[str, ...]  # image_proj keys that must be present
    forbids: tuple[str, ...] = ()  # image_proj keys that must be absent
    ip_requires_any: tuple[str, ...] = ()  # substrings, one of which some ip_adapter key must contain
    refuse: str = ""  # non-empty: recognised but unsupported, with this explanation
    description: str = ""
    # What the keys cannot say: a substring the file name must contain (the default; `variant=` overrides it).
    name_has: str = ""
    lora: bool | None = None  # True: the file must carry a LoRA, False: must not, None: either


_FACE_MLP = ("proj.0.weight", "proj.2.weight", "norm.weight")
_FACE_PLUS = ("proj.0.weight", "proj.2.weight", "norm.weight", "perceiver_resampler.proj_in.weight")
_RESAMPLER = ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight")

VARIANTS: tuple[Variant, ...] = (
    Variant("faceid-plusv2", "faceid-plusv2", "penultimate", _FACE_PLUS, name_has="plusv2",
            description="FaceID-Plus v2: face ID tokens + s x perceiver over the face crop's CLIP states"),
    Variant("faceid-plus", "faceid-plus", "penultimate", _FACE_PLUS,
            description="FaceID-Plus: perceiver over the face crop's CLIP states, queried by the face ID tokens"),
    Variant("faceid", "faceid", "none", _FACE_MLP, forbids=("proj.3.weight",), lora=True,
            description="FaceID: MLP projection of the face embedding (4 tokens) and a LoRA on every attention layer"),
    Variant("faceid-portrait", "faceid-portrait", "none", _FACE_MLP, forbids=("proj.3.weight",), lora=False,
            description="FaceID portrait: 16 tokens per face, no LoRA"),
    Variant("faceid-portrait-unnorm", "faceid-portrait-unnorm", "none", _RESAMPLER, name_has="unnorm",
            description="FaceID portrait (unnormalised): resampler over the raw face embedding"),
    Variant("full", "full", "penultimate", ("proj.0.weight", "proj.2.weight", "proj.3.weight"),
            description="MLP projection, one token per CLIP token (full-face)"),
    Variant("plus", "plus", "penultimate", ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"),
            description="perceiver resampler over the CLIP hidden states (plus, plus-face)"),
    Variant("plain", "plain", "image_embeds", ("proj.weight", "norm.weight"), forbids=("proj.0.weight",),
            description="linear projection of the CLIP image embedding (plain, light, vit-G)"),
)


def _keys_match(v: Variant, state: AdapterState) -> bool:
    if any(k not in state.image_proj for k in v.requires) or any(k in state.image_proj for k in v.forbids):
        return False
    if v.ip_requires_any and not any(s in k for k in state.ip_adapter for s in v.ip_requires_any):
        return False
    if v.lora is not None and bool(state.lora) != v.lora:
        return False
    return bool(v.requires or v.ip_requires_any)


def detect_variant(state: AdapterState, variant: str | None = None) -> Variant:
    """The first row whose keys (and file-name fact) match; `variant` names a row to use instead of the file name."""
    if variant:
        row = next((v for v in VARIANTS if v.name == variant), None)
        fits = [v.name for v in VARIANTS if _keys_match(v, state) and not v.refuse]
        if row is None or not _keys_match(row, state):
            raise _fail(state.path, f"cannot be read as a {variant} adapter: its keys fit {', '.join(fits) or 'no variant'}; "
                                    "choose one of these (or 'auto')")
        return row
    name = os.path.basename(state.path).lower()
    for v in VARIANTS:
        if not _keys_match(v, state) or (v.name_has and v.name_has not in name):
            continue
        if v.refuse:
            raise _fail(state.path, v.refuse)
        return v
    keys = ", ".join(sorted(state.image_proj)[:6])
    raise _fail(
        state.path,
        f"unknown projection model: 'image_proj' has keys {keys}; expected the plain (proj, norm), plus "
        "(latents, proj_in, layers, proj_out, norm_out) or full (proj.0, proj.2, proj.3) layout",
    )


def _shape(state: AdapterState, group: str, key: str) -> tuple[int, ...]:
    t = getattr(state, group).get(key)
    if t is None:
        raise _fail(state.path, f"missing key '{group}.{key}'; the file is incomplete or not an IP-Adapter")
    return tuple(t.shape)


def _resampler_config(state: AdapterState) -> ResamplerConfig:
    _, _, dim = _shape(state, "image_proj", "latents")
    depth = 1 + max(int(k.split(".")[1]) for k in state.image_proj if k.startswith("layers."))
    inner = _shape(state, "image_proj", "layers.0.0.to_q.weight")[0]
    dim_head = 64 if inner % 64 == 0 else inner  # official files use 64-wide heads
    ff_inner = _shape(state, "image_proj", "layers.0.1.1.weight")[0]
    return ResamplerConfig(dim=dim, depth=depth, heads=inner // dim_head, dim_head=dim_head, ff_mult=ff_inner // dim)


_MEASURE: dict[str, Callable[[AdapterState], tuple[int, int, int]]] = {
    # projection -> (clip_embedding_dim, cross_attention_dim, num_tokens)
    "plain": lambda s: (
        _shape(s, "image_proj", "proj.weight")[1],
        _shape(s, "image_proj", "norm.weight")[0],
        _shape(s, "image_proj", "proj.weight")[0] // _shape(s, "image_proj", "norm.weight")[0],
    ),
    "full": lambda s: (
        _shape(s, "image_proj", "proj.0.weight")[1],
        _shape(s, "image_proj", "proj.2.weight")[0],
        CLIP_TOKENS,
    ),
    "plus": lambda s: (
        _shape(s, "image_proj", "proj_in.weight")[1],
        _shape(s, "image_proj", "proj_out.weight")[0],
        _shape(s, "image_proj", "latents")[1],
    ),
    **{name: (lambda s, f=f: f(s.image_proj)) for name, f in FACE_MEASURE.items()},
}


def _layer_hidden_sizes(state: AdapterState, cross_dim: int) -> tuple[int, ...]:
    ids = sorted({int(k.split(".")[0]) for k in state.ip_adapter if k.split(".")[0].isdigit()})
    expected = [2 * i + 1 for i in range(len(ids))]
    if not ids:
        raise _fail(state.path, "'ip_adapter' has no numbered layers; expected keys '1.to_k_ip.weight', "
                                "'1.to_v_ip.weight', '3.to_k_ip.weight', ... of the official layout")
    if ids != expected:
        raise _fail(
            state.path,
            f"'ip_adapter' layer numbers are {ids[:6]}{'...' if len(ids) > 6 else ''}; expected the odd numbers "
            f"1, 3, ..., {2 * len(ids) - 1} of the official layout",
        )
    hidden = []
    for n in ids:
        k = _shape(state, "ip_adapter", f"{n}.to_k_ip.weight")
        v = _shape(state, "ip_adapter", f"{n}.to_v_ip.weight")
        if k != v or len(k) != 2 or k[1] != cross_dim:
            raise _fail(
                state.path,
                f"layer {n}: to_k_ip {k} and to_v_ip {v} must both be [hidden, {cross_dim}] "
                f"(the projection's output width {cross_dim})",
            )
        hidden.append(k[0])
    return tuple(hidden)


_EXPECTED_SHAPES = {
    "plain": "image_proj.proj.weight [tokens x width, CLIP width] and image_proj.norm.weight [width]",
    "full": "image_proj.proj.0.weight [hidden, CLIP width] and image_proj.proj.2.weight [width, hidden]",
    "plus": "image_proj.latents [1, tokens, dim], proj_in.weight [dim, CLIP width], proj_out.weight [width, dim]",
}
_SIZE_FIELDS = ("num_tokens", "clip_embedding_dim", "cross_attention_dim")
_MAX_SIZE = 1 << 20


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_SIZE


def config_from_metadata(state: AdapterState) -> AdapterConfig:
    """The config stored in our metadata, every size checked: positive integers, at least one layer."""
    def bad(what: str) -> AdapterFormatError:
        return _fail(state.path, f"its '{CONFIG_METADATA_KEY}' metadata is not a valid config ({what}); expected "
                                 "positive integer sizes as this kit writes them: the file was edited or damaged")

    try:
        d = json.loads(state.metadata[CONFIG_METADATA_KEY])
    except (ValueError, RecursionError) as e:
        raise bad(f"not JSON: {clean(str(e), 80)}") from None
    if not isinstance(d, dict):
        raise bad(f"a JSON {type(d).__name__}, not an object")
    for key in _SIZE_FIELDS:
        if not _positive_int(d.get(key)):
            raise bad(f"{key} is {clean(repr(d.get(key)), 40)}")
    layers = d.get("layer_hidden_sizes")
    if not isinstance(layers, list) or not layers or not all(_positive_int(h) for h in layers):
        raise bad(f"layer_hidden_sizes is {clean(repr(layers), 60)}")
    resampler = d.get("resampler")
    if resampler is not None and (not isinstance(resampler, dict) or
                                  not all(_positive_int(v) for v in resampler.values())):
        raise bad(f"resampler is {clean(repr(resampler), 60)}")
    try:
        return AdapterConfig.from_dict(d)
    except (ValueError, TypeError, KeyError) as e:
        raise bad(clean(str(e), 80)) from None


def detect_config(state: AdapterState, variant_name: str | None = None) -> AdapterConfig:
    """The adapter's config: from the kit's metadata when present, else measured from the tensors.

    `variant_name` overrides what the file name says (FaceID plus vs plusv2, portrait unnorm).
    """
    if CONFIG_METADATA_KEY in state.metadata and not variant_name:
        return config_from_metadata(state).replace(fusion=bool(state.fusion))
    variant = detect_variant(state, variant_name)
    extra: dict[str, Any] = {}
    try:
        clip_dim, cross_dim, tokens = _MEASURE[variant.projection](state)
        resampler = _resampler_config(state) if variant.projection in ("plus", "faceid-portrait-unnorm") else None
        hidden = _layer_hidden_sizes(state, cross_dim)
        if variant.projection.startswith("faceid"):
            extra = face_fields(variant.projection, state.image_proj)
            extra["lora_rank"] = check_lora(state.path, state.lora, len(hidden))
            resampler = extra.pop("resampler", resampler)
    except AdapterFormatError:
        raise
    except (IndexError, KeyError, ValueError, ZeroDivisionError) as e:
        expected = _EXPECTED_SHAPES.get(variant.projection, "the official FaceID layout")
        raise _fail(state.path, f"the {variant.name} projection's tensors have unexpected shapes ({clean(str(e), 80)}); "
                                f"expected {expected}: the file is damaged") from None
    if not all(_positive_int(x) for x in (clip_dim, cross_dim, tokens)):
        raise _fail(state.path, f"the {variant.name} projection measures {tokens} tokens of width {cross_dim} from "
                                f"CLIP width {clip_dim}; expected positive sizes: the file is damaged")
    return AdapterConfig(
        projection=variant.projection,  # type: ignore[arg-type]
        num_tokens=tokens,
        clip_embedding_dim=clip_dim,
        cross_attention_dim=cross_dim,
        layer_hidden_sizes=hidden,
        clip_output=extra.pop("clip_output", variant.clip_output),  # type: ignore[arg-type]
        fusion=bool(state.fusion),
        variant=variant.name,
        resampler=resampler,
        **extra,
    )


def _fusion_state(fusion: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k if k.startswith("fusion.") else f"fusion.{k}": v for k, v in fusion.items()}


def state_to_module_dict(state: AdapterState) -> dict[str, torch.Tensor]:
    sd = {f"image_proj.{k}": v for k, v in state.image_proj.items()}
    sd.update({f"ip_adapter.{k}": v for k, v in state.ip_adapter.items()})
    sd.update(_fusion_state(state.fusion))
    return sd


def build_adapter(state: AdapterState, config: AdapterConfig | None = None) -> IPAdapter:
    config = config or detect_config(state)
    try:
        with torch.device("meta"):
            adapter = IPAdapter(config)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as e:
        raise _fail(state.path, f"its sizes do not make a {config.variant} adapter ({clean(str(e), 80)}); the file "
                                "is damaged or not an adapter") from None
    sd = state_to_module_dict(state)
    mismatch = state_mismatch(adapter.state_dict(), sd, show=4)
    if mismatch:
        raise _fail(state.path, f"does not match a {config.variant} adapter: " + mismatch + ". The file is incomplete or damaged.")
    adapter.load_state_dict(sd, strict=True, assign=True)
    adapter.lora = dict(state.lora)
    return adapter

