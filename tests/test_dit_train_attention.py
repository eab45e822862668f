"""The differentiable attention the DiT training patches run in place of ComfyUI's (its RoPE kernel has no
backward): Flux's rotary embedding in ComfyUI's `pe` layout equals diffusers' `apply_rotary_emb`, and both joint
attentions equal SDPA on the heads, with gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ipa_train.adapter.dit_attention import flux_joint_attention, mmdit_joint_attention, rope_rotate


def _angles(length: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(length, dim // 2, generator=g) * 6.0  # [L, D/2]


def _comfy_pe(angles: torch.Tensor) -> torch.Tensor:
    """ComfyUI / BFL layout [1, 1, L, D/2, 2, 2]: a rotation matrix [[cos, -sin], [sin, cos]] per channel pair."""
    c, s = angles.cos(), angles.sin()
    return torch.stack([c, -s, s, c], dim=-1).reshape(1, 1, *angles.shape, 2, 2)


def test_rope_equals_diffusers_rotary_embedding():
    from diffusers.models.embeddings import apply_rotary_emb

    angles = _angles(10, 16)
    x = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = (f(angles).repeat_interleave(2, dim=-1) for f in (torch.cos, torch.sin))  # [L, D]
    ref = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=2)
    torch.testing.assert_close(rope_rotate(x, _comfy_pe(angles)), ref, atol=1e-6, rtol=1e-6)


def test_joint_attentions_equal_sdpa_and_pass_gradients():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g, requires_grad=True) for _ in range(3))
    pe = _comfy_pe(_angles(10, 16))
    out = flux_joint_attention(q, k, v, pe)
    ref = F.scaled_dot_product_attention(rope_rotate(q, pe), rope_rotate(k, pe), v).transpose(1, 2).reshape(2, 10, 48)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(t.grad is not None and bool(t.grad.abs().sum() > 0) for t in (q, k, v))
    flat = [t.detach().transpose(1, 2).reshape(2, 10, 48) for t in (q, k, v)]  # MMDiT hands q/k/v as [B, L, H*D]
    torch.testing.assert_close(mmdit_joint_attention(*flat, heads=3),
                               F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 10, 48))
