"""Fake Flux / SD3.5 IP-Adapter files in the official key layouts (../shared/reference/dit-adapters.md §1a, §2a,
§4a): the official block counts, token counts and encoder widths, tiny model widths."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SIGLIP_WIDTH = 1152
VIT_L_WIDTH = 768


def _r(g: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def instantx_flux(hidden: int = 32, ctx: int = 24, tokens: int = 128, blocks: int = 57, proj_hidden: int = 16,
                  seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """`{"image_proj": {...}, "ip_adapter": {...}}` as InstantX's `ip-adapter.bin` nests it."""
    g = torch.Generator().manual_seed(seed)
    proj = {
        "proj.0.weight": _r(g, proj_hidden, SIGLIP_WIDTH, scale=0.05), "proj.0.bias": _r(g, proj_hidden),
        "proj.2.weight": _r(g, ctx * tokens, proj_hidden), "proj.2.bias": _r(g, ctx * tokens),
        "norm.weight": 1 + _r(g, ctx), "norm.bias": _r(g, ctx),
    }
    ip = {}
    for j in range(blocks):
        ip[f"{j}.to_k_ip.weight"] = _r(g, hidden, ctx)
        ip[f"{j}.to_v_ip.weight"] = _r(g, hidden, ctx)
    return {"image_proj": proj, "ip_adapter": ip}


def xlabs_flux(hidden: int = 32, ctx: int = 24, tokens: int = 4, blocks: int = 19, seed: int = 0) -> dict[str, torch.Tensor]:
    """The flat XLabs safetensors layout (v1: 4 tokens, v2: 16)."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "ip_adapter_proj_model.proj.weight": _r(g, ctx * tokens, VIT_L_WIDTH, scale=0.05),
        "ip_adapter_proj_model.proj.bias": _r(g, ctx * tokens),
        "ip_adapter_proj_model.norm.weight": 1 + _r(g, ctx), "ip_adapter_proj_model.norm.bias": _r(g, ctx),
    }
    for i in range(blocks):
        p = f"double_blocks.{i}.processor.ip_adapter_double_stream_"
        for kv in "kv":
            sd[f"{p}{kv}_proj.weight"] = _r(g, hidden, ctx)
            sd[f"{p}{kv}_proj.bias"] = _r(g, hidden)
    return sd


def instantx_sd3(hidden: int = 128, head_dim: int = 64, tokens: int = 64, blocks: int = 38, dim: int = 128,
                 depth: int = 4, temb_in: int = 32, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """InstantX SD3.5's nested `.bin` layout; the image tokens are as wide as the model (`hidden`)."""
    g = torch.Generator().manual_seed(seed)
    heads = dim // 64
    proj = {
        "latents": _r(g, 1, tokens, dim, scale=1.0), "proj_in.weight": _r(g, dim, SIGLIP_WIDTH, scale=0.05),
        "proj_in.bias": _r(g, dim), "time_embedding.linear_1.weight": _r(g, dim, temb_in),
        "time_embedding.linear_1.bias": _r(g, dim), "time_embedding.linear_2.weight": _r(g, dim, dim),
        "time_embedding.linear_2.bias": _r(g, dim), "proj_out.weight": _r(g, hidden, dim),
        "proj_out.bias": _r(g, hidden), "norm_out.weight": 1 + _r(g, hidden), "norm_out.bias": _r(g, hidden),
    }
    for ln in range(depth):
        p = f"layers.{ln}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            proj[f"{p}{n}.weight"] = 1 + _r(g, dim)
            proj[f"{p}{n}.bias"] = _r(g, dim)
        proj[p + "0.to_q.weight"] = _r(g, heads * 64, dim)
        proj[p + "0.to_kv.weight"] = _r(g, 2 * heads * 64, dim)
        proj[p + "0.to_out.weight"] = _r(g, dim, heads * 64)
        proj[p + "1.1.weight"] = _r(g, 4 * dim, dim)
        proj[p + "1.3.weight"] = _r(g, dim, 4 * dim)
        proj[p + "2.1.weight"] = _r(g, 4 * dim, dim)
        proj[p + "2.1.bias"] = _r(g, 4 * dim)
    ip = {}
    for j in range(blocks):
        ip[f"{j}.norm_ip.linear.weight"] = _r(g, 2 * hidden, dim)
        ip[f"{j}.norm_ip.linear.bias"] = _r(g, 2 * hidden)
        ip[f"{j}.to_k_ip.weight"] = _r(g, hidden, hidden, scale=0.1)
        ip[f"{j}.to_v_ip.weight"] = _r(g, hidden, hidden, scale=0.1)
        for n in ("norm_q", "norm_k", "norm_ip_k"):
            ip[f"{j}.{n}.weight"] = 1 + _r(g, head_dim)
    return {"image_proj": proj, "ip_adapter": ip}


def flat(nested: dict) -> dict[str, torch.Tensor]:
    if all(isinstance(v, torch.Tensor) for v in nested.values()):
        return dict(nested)
    return {f"{g}.{k}": v for g, d in nested.items() for k, v in d.items()}


def write(state: dict, path: Path) -> Path:
    """`.bin`: torch.save of the (nested) state dict, as the official pickles; `.safetensors`: flat keys."""
    path = Path(path)
    if path.suffix == ".bin":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in flat(state).items()}, str(path))
    return path


FILES = {
    # name -> (builder, official file name, suffix, format, family, num_tokens, encoder, blocks)
    "instantx-flux-bin": (instantx_flux, "ip-adapter.bin", "instantx-flux", "flux", 128, "SigLIP-so400m/14-384", 57),
    "instantx-flux-safetensors": (instantx_flux, "ip-adapter.safetensors", "instantx-flux", "flux", 128,
                                  "SigLIP-so400m/14-384", 57),
    "xlabs-v1": (xlabs_flux, "ip_adapter.safetensors", "xlabs-flux", "flux", 4, "ViT-L/14", 19),
    "xlabs-v2": (lambda: xlabs_flux(tokens=16), "ip_adapter_v2.safetensors", "xlabs-flux", "flux", 16, "ViT-L/14", 19),
    "instantx-sd3-bin": (instantx_sd3, "ip-adapter.bin", "instantx-sd3", "sd3", 64, "SigLIP-so400m/14-384", 38),
}
