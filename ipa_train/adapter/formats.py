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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import AdapterFormatError
from ..outputs import atomic_write
from .config import CONFIG_METADATA_KEY, FORMAT_METADATA_KEY, FORMAT_VERSION, AdapterConfig
from .detect import (
    AdapterState,
    build_adapter,
    detect_config,
    detect_variant,
    non_finite,
    read_adapter_state,
    split_groups,
)
from .dit_formats import find_variant
from .dit_modules import DitAdapter, file_state, load_dit
from .files import CHECKPOINT_DIR_FILES, PICKLE_SUFFIXES, read_tensors
from .modules import IPAdapter

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_DIR_FILES", "PICKLE_SUFFIXES", "AdapterState", "atomic_write", "build_adapter", "convert_checkpoint",
    "detect_config", "detect_variant", "inspect_file", "load_adapter", "read_adapter_state", "read_tensors",
    "save_adapter", "split_groups",
]


def load_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 variant: str | None = None) -> IPAdapter | DitAdapter:
    """Load any supported IP-Adapter file (or training checkpoint) into an `IPAdapter` (UNet families) or a
    `DitAdapter` (Flux and SD3.5 adapters: InstantX, XLabs).

    Args:
        path: `.safetensors`, `.bin`/`.pt`/`.pth`/`.ckpt`, or an accelerate checkpoint folder.
        dtype: dtype of the returned module's parameters (and of a FaceID file's LoRA).
        variant: a variant name overriding what the file name says (FaceID: faceid-plus / faceid-plusv2,
            faceid-portrait-unnorm); None or "auto" detects it.
    """
    tensors, metadata, real = read_tensors(path)
    if find_variant(tensors) is not None:
        dit, info = load_dit(tensors, os.fspath(real), metadata)
        logger.info("loaded %s adapter from %s", info["format"], real)
        return dit.to(dtype).eval()
    state = split_groups(tensors, metadata, os.fspath(real))
    adapter = build_adapter(state, detect_config(state, None if variant in (None, "auto") else variant))
    adapter.lora = {k: t.to(dtype) for k, t in adapter.lora.items()}
    logger.info("loaded %s adapter from %s (%s)", adapter.config.variant, state.path, state.source)
    return adapter.to(dtype).eval()


def inspect_file(path: str | os.PathLike, variant: str | None = None) -> dict[str, Any]:
    """Summary used by `python -m ipa_train inspect` and the loader node."""
    tensors, metadata, real = read_tensors(path)
    if find_variant(tensors) is not None:
        return {**load_dit(tensors, os.fspath(real), metadata)[1], "file": os.fspath(path)}
    state = split_groups(tensors, metadata, os.fspath(real))
    cfg = detect_config(state, variant)
    adapter = build_adapter(state, cfg)
    bad = warn_non_finite(state)
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
        "parameters": adapter.num_parameters() + sum(t.numel() for t in state.lora.values()),
        "face_embedding_dim": cfg.face_embedding_dim or None,
        "lora_rank": cfg.lora_rank or None,
        "fusion": cfg.fusion,
        "source": state.source,
        "non_finite_tensors": bad,
    }


def warn_non_finite(state: AdapterState) -> list[str]:
    """Log one warning when adapter tensors hold NaN or infinity (such an adapter turns images into NaN)."""
    bad = non_finite(state)
    if bad:
        logger.warning("%s: %d tensor(s) hold NaN or infinite values (%s%s); this adapter will produce black or NaN "
                       "images: train it again (lower --lr) or download it again", state.path, len(bad),
                       ", ".join(bad[:3]), ", ..." if len(bad) > 3 else "")
    return bad


# --------------------------------------------------------------------------------------------------------
# Writing


def save_adapter(adapter: IPAdapter, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write the adapter in its official layout: `.safetensors` (flat keys, the config JSON in the metadata) or
    `.bin` (see `_save_bin`).

    UNet fusion weights go under `fusion.*`, which diffusers' and cubiq's loaders ignore, so the file still loads
    there as a plain/plus/full adapter. Flux / SD3.5 adapters keep their official keys (XLabs:
    `ip_adapter_proj_model.*`, `double_blocks.{i}.processor.*`; InstantX: `image_proj.*`, `ip_adapter.{j}.*`)
    and their sizes in the metadata.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".bin"):
        raise AdapterFormatError(f"{path}: adapters are written as .safetensors (or .bin, the torch layout of the "
                                 f"tencent / InstantX releases); change the extension")
    if isinstance(adapter, DitAdapter):
        sd = file_state(adapter)
        metadata = {DIT_CONFIG_METADATA_KEY: json.dumps(adapter.config.to_dict())}
    else:
        sd = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
        sd.update({f"ip_adapter.{k}": v.detach().to("cpu").contiguous() for k, v in adapter.lora.items()})
        metadata = {CONFIG_METADATA_KEY: adapter.config.to_json()}
    if suffix == ".bin":
        return _save_bin(sd, path)
    metadata[FORMAT_METADATA_KEY] = FORMAT_VERSION
    if extra_metadata:
        metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra_metadata.items()})
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))
    return path


DIT_CONFIG_METADATA_KEY = "ipa_kit.dit_config"
BIN_GROUPS = ("image_proj", "ip_adapter")


def _save_bin(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """The `.bin` of the tencent and InstantX releases: `torch.save({"image_proj": {...}, "ip_adapter": {...}})`
    of plain tensors (so `torch.load(weights_only=True)` reads it), for packs that read only that file
    (ComfyUI-IPAdapter-Flux). It has no metadata: loaders tell the variant from the shapes, as for the official
    files. Layouts with other groups (XLabs, fused UNet adapters) have no such file."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        group, _, rest = key.partition(".")
        if group not in BIN_GROUPS:
            raise AdapterFormatError(f"{path}: this adapter has {key!r}; only adapters made of image_proj.* and "
                                     f"ip_adapter.* keys (tencent, InstantX) have an official .bin; write it as "
                                     f".safetensors")
        nested.setdefault(group, {})[rest] = value
    atomic_write(path, lambda tmp: torch.save(nested, tmp))
    return path


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> AdapterConfig:
    """Turn a reference/accelerate training checkpoint (or any readable adapter) into the official layout."""
    tensors, metadata, real = read_tensors(src)
    if find_variant(tensors) is not None:  # a Flux / SD3.5 adapter (or our checkpoint of one): its own layout
        dit, _ = load_dit(tensors, os.fspath(real), metadata)
        save_adapter(dit, dst, {"ipa_kit.converted_from": os.path.basename(os.fspath(src))})
        return dit.config
    state = read_adapter_state(src)
    adapter = build_adapter(state)
    warn_non_finite(state)
    save_adapter(adapter, dst, {"ipa_kit.converted_from": os.path.basename(os.fspath(src))})
    return adapter.config
