"""Encoded image tokens on disk: our safetensors embeds files, and the community pack's `.ipadpt` files.

Ours hold the *projected* tokens ("cond", "uncond", [N, T, C] each; N > 1 only for per-frame embeds) with the
adapter they were made for in the metadata, so loading them for another adapter is refused by name. The
community's `.ipadpt` is `torch.save` of one CLIP output tensor (pooled [N, P] or hidden states [N, L, D]), before
the projection; it is read with `torch.load(weights_only=True)`, which never runs pickled code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import IPAKitError
from .config import AdapterConfig
from .formats import atomic_write

EMBEDS_FORMAT = "ipakit_embeds"
EMBEDS_VERSION = "1"
EMBEDS_EXTENSIONS = (".safetensors", ".ipadpt")


@dataclass
class EmbedsFile:
    """What an embeds file holds. Ours: projected `cond`/`uncond` tokens. Community: one CLIP output in `clip`."""

    path: Path
    kind: str  # "kit" or "community"
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    metadata: dict[str, str] | None = None


def adapter_signature(config: AdapterConfig) -> dict[str, str]:
    """The metadata that ties tokens to an adapter: variant name, family, token count and width."""
    return {"variant": config.variant, "family": config.family, "num_tokens": str(config.num_tokens),
            "cross_attention_dim": str(config.cross_attention_dim)}


def write_embeds(path: str | os.PathLike, cond: torch.Tensor, uncond: torch.Tensor, config: AdapterConfig,
                 num_images: int = 1) -> Path:
    """Write projected tokens [N, T, C] as safetensors (atomic: a failed write never leaves half a file)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise IPAKitError(f"{path}: embeds are written as .safetensors only; change the extension")
    tensors = {"cond": cond.detach().float().cpu().contiguous(), "uncond": uncond.detach().float().cpu().contiguous()}
    metadata = {"format": EMBEDS_FORMAT, "format_version": EMBEDS_VERSION, "num_images": str(num_images),
                **adapter_signature(config)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _read_kit(path: Path) -> EmbedsFile:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise IPAKitError(f"{path}: cannot read it as safetensors ({e}); the file is truncated or not an embeds file") from None
    if metadata.get("format") != EMBEDS_FORMAT or "cond" not in tensors or "uncond" not in tensors:
        raise IPAKitError(f"{path}: not an IP-Adapter Kit embeds file (no 'cond'/'uncond' tensors with format "
                          f"{EMBEDS_FORMAT!r} metadata); save embeds with IPAKitSaveEmbeds")
    return EmbedsFile(path, "kit", cond=tensors["cond"], uncond=tensors["uncond"], metadata=metadata)


def _read_community(path: Path) -> EmbedsFile:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise IPAKitError(f"{path}: refused: this pickle holds objects other than tensors and loading it could run "
                          f"code ({str(e).splitlines()[0]}); nothing of it was executed") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise IPAKitError(f"{path}: cannot read it as a PyTorch file ({e}); it is probably truncated") from None
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (2, 3):
        found = type(obj).__name__ if not isinstance(obj, torch.Tensor) else f"a tensor of shape {tuple(obj.shape)}"
        raise IPAKitError(f"{path}: expected one CLIP output tensor [N, P] or [N, L, D] (the community pack's "
                          f"IPAdapterSaveEmbeds), found {found}")
    return EmbedsFile(path, "community", clip=obj.float())


def read_embeds(path: str | os.PathLike) -> EmbedsFile:
    """Read an embeds file by extension: `.safetensors` (ours) or `.ipadpt` (the community pack's)."""
    path = Path(path)
    if not path.is_file():
        raise IPAKitError(f"{path}: embeds file not found; put it in ComfyUI's input folder")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_kit(path)
    if suffix == ".ipadpt":
        return _read_community(path)
    raise IPAKitError(f"{path}: unknown embeds file type {suffix!r}; expected one of {', '.join(EMBEDS_EXTENSIONS)}")


def check_embeds_for(embeds: EmbedsFile, config: AdapterConfig) -> None:
    """Refuse kit embeds made for another adapter, naming both (tokens of another variant do not fit its K/V)."""
    if embeds.kind != "kit":
        return
    meta = embeds.metadata or {}
    theirs, ours = {k: meta.get(k, "?") for k in adapter_signature(config)}, adapter_signature(config)
    if theirs != ours:
        raise IPAKitError(
            f"{embeds.path.name}: made for a '{theirs['variant']}' adapter ({theirs['family']}, {theirs['num_tokens']} "
            f"tokens of {theirs['cross_attention_dim']}), but the connected adapter is '{ours['variant']}' "
            f"({ours['family']}, {ours['num_tokens']} tokens of {ours['cross_attention_dim']}); encode the reference "
            "again with this adapter, or connect the adapter the embeds were made with")
