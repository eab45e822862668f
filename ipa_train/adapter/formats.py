"""Reading, detecting and writing IP-Adapter weight files.

Containers read: the official `.bin` (`{"image_proj": {...}, "ip_adapter": {...}}`), the official flat
`.safetensors` (`image_proj.*` / `ip_adapter.*`), files written by this kit (same layout plus `fusion.*` and
the config in the metadata), and raw training checkpoints (`image_proj_model.*` + `adapter_modules.*`, or
only `unet.<...>.attn2.processor.to_{k,v}_ip.weight` when accelerate de-duplicated the shared tensors).
Pickles are only ever read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import AdapterFormatError
from .config import (
    CONFIG_METADATA_KEY,
    FORMAT_METADATA_KEY,
    FORMAT_VERSION,
    AdapterConfig,
    ResamplerConfig,
)
from .modules import IPAdapter, layer_key

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CHECKPOINT_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "ip_adapter.safetensors", "ip_adapter.bin")
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


# --------------------------------------------------------------------------------------------------------
# Reading containers


def _fail(path: str | os.PathLike, what: str) -> AdapterFormatError:
    return AdapterFormatError(f"{os.fspath(path)}: {what}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise _fail(
            path,
            f"cannot read it as safetensors ({e}). The file is truncated or not a safetensors file: "
            "download it again (a git-lfs pointer or an interrupted download looks like this).",
        ) from None
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _fail(
            path,
            "refused: this pickle contains objects other than tensors, and loading it could run code "
            f"({str(e).splitlines()[0]}). Nothing of it was executed. Use a .safetensors file, or convert "
            "the file in a trusted environment.",
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise _fail(path, f"cannot read it as a PyTorch file ({e}); it is probably truncated: download it again.") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            flat[prefix + str(k)] = v
        elif isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
    return flat


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Read every tensor of a weight file (or of a training checkpoint folder) as one flat dict."""
    p = Path(path)
    if p.is_dir():
        for name in CHECKPOINT_DIR_FILES:
            if (p / name).is_file():
                p = p / name
                break
        else:
            found = sorted(x.name for x in p.iterdir())[:10]
            raise _fail(path, f"is a folder without a weight file; expected one of {list(CHECKPOINT_DIR_FILES)}, found {found}")
    if not p.is_file():
        raise _fail(path, "no such file")
    if p.stat().st_size == 0:
        raise _fail(path, "the file is empty (0 bytes): download it again")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = _read_safetensors(p)
    elif suffix in PICKLE_SUFFIXES:
        obj = _read_pickle(p)
        for wrapper in ("state_dict", "module", "model"):
            if set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        tensors, metadata = _flatten(obj), {}
    else:
        raise _fail(path, f"unsupported extension {suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}")
    return tensors, metadata, p


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
    return AdapterState(groups["image_proj"], groups["ip_adapter"], groups["fusion"], metadata, source, path)


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


_FACEID_REFUSAL = (
    "this is a FaceID adapter (InsightFace face embeddings plus LoRA weights); this kit does not support FaceID. "
    "Use it with cubiq's IPAdapterFaceID nodes, or pick a non-FaceID adapter (plain, plus, plus-face, full-face)"
)

VARIANTS: tuple[Variant, ...] = (
    Variant("faceid-lora", "", "", (), ip_requires_any=("_lora.",), refuse=_FACEID_REFUSAL),
    Variant("faceid-plus", "", "", ("perceiver_resampler.proj_in.weight",), refuse=_FACEID_REFUSAL),
    Variant("faceid-portrait", "", "", ("proj.0.weight", "proj.2.weight", "norm.weight"), forbids=("proj.3.weight",), refuse=_FACEID_REFUSAL),
    Variant("full", "full", "penultimate", ("proj.0.weight", "proj.2.weight", "proj.3.weight"),
            description="MLP projection, one token per CLIP token (full-face)"),
    Variant("plus", "plus", "penultimate", ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"),
            description="perceiver resampler over the CLIP hidden states (plus, plus-face)"),
    Variant("plain", "plain", "image_embeds", ("proj.weight", "norm.weight"), forbids=("proj.0.weight",),
            description="linear projection of the CLIP image embedding (plain, light, vit-G)"),
)


def detect_variant(state: AdapterState) -> Variant:
    for v in VARIANTS:
        if any(k not in state.image_proj for k in v.requires):
            continue
        if any(k in state.image_proj for k in v.forbids):
            continue
        if v.ip_requires_any and not any(s in k for k in state.ip_adapter for s in v.ip_requires_any):
            continue
        if not v.requires and not v.ip_requires_any:
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
}


def _layer_hidden_sizes(state: AdapterState, cross_dim: int) -> tuple[int, ...]:
    ids = sorted({int(k.split(".")[0]) for k in state.ip_adapter if k.split(".")[0].isdigit()})
    expected = [2 * i + 1 for i in range(len(ids))]
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
        if k != v or k[1] != cross_dim:
            raise _fail(
                state.path,
                f"layer {n}: to_k_ip {k} and to_v_ip {v} must both be [hidden, {cross_dim}] "
                f"(the projection's output width {cross_dim})",
            )
        hidden.append(k[0])
    return tuple(hidden)


def detect_config(state: AdapterState) -> AdapterConfig:
    """The adapter's config: from the kit's metadata when present, else measured from the tensors."""
    if CONFIG_METADATA_KEY in state.metadata:
        try:
            cfg = AdapterConfig.from_json(state.metadata[CONFIG_METADATA_KEY])
        except (ValueError, TypeError, KeyError) as e:
            raise _fail(state.path, f"its '{CONFIG_METADATA_KEY}' metadata is not a valid config ({e})") from None
        return cfg.replace(fusion=bool(state.fusion))
    variant = detect_variant(state)
    clip_dim, cross_dim, tokens = _MEASURE[variant.projection](state)
    return AdapterConfig(
        projection=variant.projection,  # type: ignore[arg-type]
        num_tokens=tokens,
        clip_embedding_dim=clip_dim,
        cross_attention_dim=cross_dim,
        layer_hidden_sizes=_layer_hidden_sizes(state, cross_dim),
        clip_output=variant.clip_output,  # type: ignore[arg-type]
        fusion=bool(state.fusion),
        variant=variant.name,
        resampler=_resampler_config(state) if variant.projection == "plus" else None,
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
    with torch.device("meta"):
        adapter = IPAdapter(config)
    sd = state_to_module_dict(state)
    expected = adapter.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:4])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} keys with the wrong shape ({k}: {tuple(sd[k].shape)}, expected {tuple(expected[k].shape)})")
        raise _fail(state.path, f"does not match a {config.variant} adapter: " + "; ".join(parts) + ". The file is incomplete or damaged.")
    adapter.load_state_dict(sd, strict=True, assign=True)
    return adapter


def load_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> IPAdapter:
    """Load any supported IP-Adapter file (or training checkpoint) into an `IPAdapter`.

    Args:
        path: `.safetensors`, `.bin`/`.pt`/`.pth`/`.ckpt`, or an accelerate checkpoint folder.
        dtype: dtype of the returned module's parameters.
    """
    state = read_adapter_state(path)
    adapter = build_adapter(state)
    logger.info("loaded %s adapter from %s (%s)", adapter.config.variant, state.path, state.source)
    return adapter.to(dtype).eval()


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """Summary used by `python -m ipa_train inspect` and the loader node."""
    state = read_adapter_state(path)
    cfg = detect_config(state)
    adapter = build_adapter(state, cfg)
    return {
        "file": os.fspath(path),
        "variant": cfg.variant,
        "family": cfg.family,
        "projection": cfg.projection,
        "num_tokens": cfg.num_tokens,
        "clip_embedding_dim": cfg.clip_embedding_dim,
        "clip_output": cfg.clip_output,
        "encoder": cfg.encoder,
        "cross_attention_dim": cfg.cross_attention_dim,
        "cross_attention_layers": cfg.cross_attention_layers,
        "parameters": adapter.num_parameters(),
        "fusion": cfg.fusion,
        "source": state.source,
    }


# --------------------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file in the target folder, fsync it, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions of a normal write
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_adapter(adapter: IPAdapter, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter as safetensors in the official flat layout, the config JSON in the metadata.

    Fusion weights go under `fusion.*`, which diffusers' and cubiq's loaders ignore, so the file still loads
    there as a plain/plus/full adapter.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise AdapterFormatError(f"{path}: adapters are written as .safetensors only; change the extension")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    metadata = {CONFIG_METADATA_KEY: adapter.config.to_json(), FORMAT_METADATA_KEY: FORMAT_VERSION}
    if extra_metadata:
        metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra_metadata.items()})
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    return path


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> AdapterConfig:
    """Turn a reference/accelerate training checkpoint (or any readable adapter) into the official layout."""
    state = read_adapter_state(src)
    adapter = build_adapter(state)
    save_adapter(adapter, dst, {"ipa_kit.converted_from": os.path.basename(os.fspath(src))})
    return adapter.config
