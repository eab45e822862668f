"""The LoRA a FaceID file carries, and its keys renamed to what ComfyUI's LoRA key map accepts.

A FaceID file's `ip_adapter` group numbers *every* attention processor of the UNet in diffusers order (down blocks,
up blocks, mid block; attn1 before attn2): processor i = 2k is the self-attention and 2k+1 the cross-attention of
cross-attention site k. Each holds `{i}.to_{q,k,v,out}_lora.{down,up}.weight`, down [r, in] and up [out, r], no alpha
(scale 1). Merging `W + up @ down` into the UNet's own to_q/k/v/out is exactly tencent's LoRA processors (every LoRA
term is linear in the same input as its base layer).

ComfyUI maps `unet.<diffusers attention>.processor.to_q` (and `.processor.to_out` for `to_out.0`) to its UNet
weights, and reads `<that>_lora.up.weight` / `_lora.down.weight` as a LoRA: the names diffusers gives these keys.
"""

from __future__ import annotations

import re

import torch

from ..errors import AdapterFormatError
from .layout import Site

LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")
PROJS = ("q", "k", "v", "out")


def is_lora_key(name: str) -> bool:
    return "_lora." in name


def lora_rank(lora: dict[str, torch.Tensor]) -> int:
    """The LoRA's rank (rows of its down matrices), 0 when there is none."""
    for name, t in lora.items():
        if name.endswith(".down.weight") and t.ndim == 2:
            return int(t.shape[0])
    return 0


def check_lora(path: str, lora: dict[str, torch.Tensor], num_sites: int) -> int:
    """Every key `{i}.to_X_lora.{down,up}.weight` with i < 2 * sites, down [r, in] and up [out, r] of one rank r."""
    if not lora:
        return 0
    rank = lora_rank(lora)
    for name, t in lora.items():
        m = LORA_KEY.match(name)
        if not m:
            raise AdapterFormatError(f"{path}: 'ip_adapter.{name}' is not a FaceID LoRA key; expected "
                                     "'{i}.to_{q,k,v,out}_lora.{down,up}.weight': the file is damaged")
        i, _, part = m.groups()
        if int(i) >= 2 * num_sites:
            raise AdapterFormatError(f"{path}: 'ip_adapter.{name}' names attention processor {i}, but the file has "
                                     f"{num_sites} cross-attention layers (processors 0..{2 * num_sites - 1})")
        r = t.shape[0] if part == "down" else t.shape[-1]
        if t.ndim != 2 or r != rank:
            raise AdapterFormatError(f"{path}: 'ip_adapter.{name}' has shape {tuple(t.shape)}; every FaceID LoRA matrix "
                                     f"has rank {rank} (down [{rank}, in], up [out, {rank}]): the file is damaged")
    return rank


def diffusers_attention_name(site: Site, attn: int, layers_per_block: int = 2) -> str:
    """Diffusers name of attention `attn` (1 or 2) at a site, from ComfyUI's block numbering.

    ComfyUI input block n >= 1 is diffusers down block (n-1) // (lpb+1), attention (n-1) % (lpb+1) (every lpb+1-th
    input block is a downsampler); output block n is up block n // (lpb+1), attention n % (lpb+1).
    """
    per = layers_per_block + 1
    if site.section == "input":
        block = f"down_blocks.{(site.block_id - 1) // per}.attentions.{(site.block_id - 1) % per}"
    elif site.section == "output":
        block = f"up_blocks.{site.block_id // per}.attentions.{site.block_id % per}"
    else:
        block = "mid_block.attentions.0"
    return f"{block}.transformer_blocks.{site.block_index}.attn{attn}"


def comfy_lora_state(lora: dict[str, torch.Tensor], sites: list[Site], layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """`{i}.to_q_lora.down.weight` -> `unet.<attention>.processor.to_q_lora.down.weight` (ComfyUI's key map names).

    `sites` are the model's cross-attention sites in adapter order; processor i is attention 1 + i % 2 of site i // 2.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in lora.items():
        m = LORA_KEY.match(name)
        if m is None:
            continue
        i, proj, part = int(m.group(1)), m.group(2), m.group(3)
        if i // 2 >= len(sites):
            raise AdapterFormatError(f"the FaceID LoRA names attention processor {i}, but this model has "
                                     f"{len(sites)} cross-attention layers; the adapter is for another base model")
        attention = diffusers_attention_name(sites[i // 2], 1 + i % 2, layers_per_block)
        out[f"unet.{attention}.processor.to_{proj}_lora.{part}.weight"] = t
    return out
