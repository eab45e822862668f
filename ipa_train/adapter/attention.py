"""Decoupled image attention as pure functions, shared by the diffusers processors and the ComfyUI patch.

q [B, Lq, H*d] is the host layer's query; text k/v [B, S, H*d]; image k/v [B, T, H*d]. Outputs are the
attention result *before* the layer's output projection (`to_out`), which is where every host adds the
image branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .modules import multihead_attention

Weight = float | torch.Tensor
# (q, k, v, heads) -> [B, Lq, H*d]: a host's own attention kernel, so the image branch rounds as its text branch
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def image_attention(q: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor, heads: int,
                    attend: Attend | None = None) -> torch.Tensor:
    """Attn(Q, K_i, V_i) split into the host layer's heads: [B, Lq, H*d] (torch SDPA unless `attend` is given)."""
    if k_ip.shape[0] != q.shape[0]:
        if k_ip.shape[0] == 1:
            k_ip = k_ip.expand(q.shape[0], -1, -1)
            v_ip = v_ip.expand(q.shape[0], -1, -1)
        else:
            raise ValueError(f"image keys have batch {k_ip.shape[0]} but the query has batch {q.shape[0]}")
    return (attend or multihead_attention)(q, k_ip.to(q.dtype), v_ip.to(q.dtype), heads)


def is_zero(weight: Weight) -> bool:
    if isinstance(weight, torch.Tensor):
        return bool((weight == 0).all())
    return weight == 0


def add_image_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_ip: torch.Tensor,
    v_ip: torch.Tensor,
    heads: int,
    weight: Weight,
    mask: torch.Tensor | None = None,
    attend: Attend | None = None,
) -> torch.Tensor:
    """`out + weight * Attn(Q, K_i, V_i) [* mask]`; returns `out` itself when the weight is 0 (exact skip).

    Args:
        out: text attention [B, Lq, H*d].
        weight: a float, or a tensor broadcastable to [B, 1, 1] (one weight per batch row).
        mask: optional [B or 1, Lq, 1] multiplier of the image branch only (attention masks).
        attend: the attention kernel (default torch SDPA); a host passes the one its own layers use.
    """
    if is_zero(weight):
        return out
    ip = image_attention(q, k_ip, v_ip, heads, attend)  # [B, Lq, H*d]
    if isinstance(weight, torch.Tensor):
        weight = weight.to(ip.dtype).reshape(-1, 1, 1)
    ip = ip * weight
    if mask is not None:
        ip = ip * mask.to(ip.dtype)
    return out + ip


def decoupled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ip: torch.Tensor,
    v_ip: torch.Tensor,
    heads: int,
    weight: Weight = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """IP-Adapter attention: Attn(Q, K_t, V_t) + weight * Attn(Q, K_i, V_i). All [B, L, H*d]."""
    return add_image_attention(multihead_attention(q, k, v, heads), q, k_ip, v_ip, heads, weight, mask)


EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")


def scale_image_kv(k_ip: torch.Tensor, v_ip: torch.Tensor, weight: float, mode: str = "V only",
                   groups: int = 1) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The community pack's embeds_scaling: where the layer weight w enters the image attention.

    Returns (k, v, w_out) such that the image term is `w_out * Attn(Q, k, v)`:
    - "V only": k, v unchanged, w_out = w (the original IP-Adapter scale);
    - "K+V": k = w*K, v = w*V, w_out = 1 (w also acts as an inverse softmax temperature);
    - "K+V w/ C penalty": the same with w' = w * C / 1280, C = the layer's inner width (damps the shallow layers);
    - "K+mean(V) w/ C penalty": k = w'*K, v = (V - mean(V)) + w' * mean(V), w_out = 1: only the token mean of V
      is scaled. The mean is over each reference's own tokens (`groups` equal runs of the T tokens), as the
      community pack takes it per image of its batch.

    Args:
        k_ip, v_ip: image keys/values [B, T, C].
    """
    if mode == "V only":
        return k_ip, v_ip, weight
    if mode not in EMBEDS_SCALING:
        raise ValueError(f"unknown embeds_scaling {mode!r}; expected one of {EMBEDS_SCALING}")
    w = weight * (k_ip.shape[-1] / 1280.0) if mode.endswith("C penalty") else weight
    if mode == "K+mean(V) w/ C penalty":
        b, t, c = v_ip.shape
        grouped = v_ip.reshape(b, groups, t // groups, c)
        mean = grouped.mean(dim=2, keepdim=True)
        return k_ip * w, ((grouped - mean) + mean * w).reshape(b, t, c), 1.0
    return k_ip * w, v_ip * w, 1.0


def token_grid(latent_hw: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """Height and width of a layer's token grid, given the latent size and the layer's sequence length.

    UNet blocks halve the grid with stride-2 convolutions (ceil division), so find the downscale factor
    2^n whose grid has `seq_len` tokens.
    """
    h, w = latent_hw
    for n in range(8):
        f = 2**n
        gh, gw = math.ceil(h / f), math.ceil(w / f)
        if gh * gw == seq_len:
            return gh, gw
    # Unusual aspect: keep the latent's aspect ratio.
    gh = max(1, round(math.sqrt(seq_len * h / w)))
    return gh, max(1, seq_len // gh)


def mask_for_layer(mask: torch.Tensor, latent_hw: tuple[int, int], seq_len: int) -> torch.Tensor:
    """Resize a [M, H, W] (or [H, W]) mask in 0..1 to a layer's tokens: [M, seq_len, 1].

    Bilinear resize to the token grid, then pad with ones or crop when rounding leaves a few tokens over.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    gh, gw = token_grid(latent_hw, seq_len)
    m = F.interpolate(mask.unsqueeze(1).float(), size=(gh, gw), mode="bilinear", align_corners=False)
    m = m.flatten(1)  # [M, gh*gw]
    if m.shape[1] < seq_len:
        m = F.pad(m, (0, seq_len - m.shape[1]), value=1.0)
    return m[:, :seq_len].unsqueeze(-1)
