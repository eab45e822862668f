"""Image attention of the Flux and SD3.5 IP-Adapters as pure functions over the host block's tensors.

Shapes: queries/keys/values per head are [B, H, L, D]; image tokens [B, T, C]; every image-attention result is
returned merged, [B, L, H*D], and the host adds it where the reference does (see `hosts/comfy/flux.py`,
`hosts/comfy/mmdit.py`). Nothing here knows the host: the same functions serve ComfyUI and the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dit_modules import DitBlock

INSTANTX_FLUX_K_EPS = 1e-5  # InstantX Flux: RMSNorm(128, eps=1e-5, elementwise_affine=False) on the image keys


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last axis without a learned scale, computed in float32."""
    return (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def flux_image_kv(block: DitBlock, tokens: torch.Tensor, heads: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Image keys and values of one Flux block: [B, H, T, D] each.

    InstantX RMS-normalises the keys (not the values, as the published processor); XLabs projects with biases
    and normalises neither.
    """
    k = split_heads(block.to_k_ip(tokens), heads)
    v = split_heads(block.to_v_ip(tokens), heads)
    if fmt == "instantx-flux":
        k = rms_norm(k, INSTANTX_FLUX_K_EPS)
    return k, v


def flux_image_attention(q: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor) -> torch.Tensor:
    """SDPA(q, K_ip, V_ip) with q the block's QK-normed query before RoPE [B, H, L, D] -> [B, L, H*D]."""
    if k_ip.shape[0] != q.shape[0]:
        k_ip, v_ip = k_ip.expand(q.shape[0], -1, -1, -1), v_ip.expand(q.shape[0], -1, -1, -1)
    return merge_heads(F.scaled_dot_product_attention(q, k_ip.to(q.dtype), v_ip.to(q.dtype)))


def sd3_image_kv(block: DitBlock, tokens: torch.Tensor, temb: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3.5 image keys/values of one joint block [B, H, T, D]: time-conditioned LayerNorm of the resampler's
    tokens, the block's K/V projections, the adapter's RMS norm on K."""
    normed = block.norm_ip(tokens, temb)
    k = block.norm_ip_k(split_heads(block.to_k_ip(normed), heads))
    v = split_heads(block.to_v_ip(normed), heads)
    return k, v


def sd3_image_attention(block: DitBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_ip: torch.Tensor, v_ip: torch.Tensor) -> torch.Tensor:
    """The SD3.5 image branch: the image rows attend to themselves and to the image tokens.

    Args:
        q, k, v: the block's image-stream projections [B, H, L, D], q and k raw (before the model's ln_q/ln_k:
            the adapter applies its own norm_q / norm_k), v as the model uses it.
        k_ip, v_ip: from `sd3_image_kv` [B, H, T, D].
    Returns:
        [B, L, H*D], added (times the weight) to the image rows of the joint attention before `proj`.
    """
    q = block.norm_q(q)
    k = torch.cat([block.norm_k(k), k_ip.to(k.dtype)], dim=2)
    v = torch.cat([v, v_ip.to(v.dtype)], dim=2)
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


def rope_rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding of queries or keys [B, H, L, D] by the model's `pe` [B, 1, L, D/2, 2, 2] (a 2x2
    rotation per channel pair), in plain differentiable PyTorch ops, in the rotation's dtype."""
    pairs = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)  # [B, H, L, D/2, 1, 2]
    out = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]  # [B, H, L, D/2, 2]
    return out.reshape(*x.shape).type_as(x)


def flux_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor | None,
                         mask: torch.Tensor | None = None, transformer_options: dict | None = None) -> torch.Tensor:
    """A Flux block's joint attention, differentiable: RoPE on q/k [B, H, L, D], then SDPA -> [B, L, H*D]."""
    if pe is not None:
        q, k = rope_rotate(q, pe), rope_rotate(k, pe)
    if mask is not None and mask.dim() == 3:
        mask = mask.unsqueeze(1)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def mmdit_joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          transformer_options: dict | None = None, **_: object) -> torch.Tensor:
    """An MMDiT block's joint attention, differentiable: q/k [B, L, H*D], v [B, L, H*D] or [B, L, H, D] -> [B, L, H*D]."""
    b = q.shape[0]
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return merge_heads(F.scaled_dot_product_attention(q, k, v))
