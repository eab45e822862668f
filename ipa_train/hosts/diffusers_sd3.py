"""SD3.5 IP-Adapters inside diffusers' `SD3Transformer2DModel`, for training: an attention processor per joint
block that runs the joint attention as diffusers' `JointAttnProcessor2_0` does and adds the InstantX image branch
(the image rows attend to themselves and to the adapter's time-normed tokens, with the adapter's own RMS norms
on the raw q/k) to the image rows before `to_out`, with gradients to the adapter. The tokens and the resampler's
temb come per call in `joint_attention_kwargs` ("ip_tokens").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..adapter.dit_attention import merge_heads, sd3_image_attention, sd3_image_kv, split_heads
from ..adapter.dit_modules import DitAdapter, ImageTokens


class SD3TrainProcessor:
    """Joint attention of SD3 block `j` plus the InstantX SD3.5 image branch of the adapter's block `j`."""

    def __init__(self, adapter: DitAdapter, j: int):
        self._adapter = [adapter]  # not a submodule of the processor
        self.j = j

    def _image_branch(self, q, k, v, ip: ImageTokens | None, heads: int) -> torch.Tensor | None:
        if ip is None or ip.weight == 0:
            return None
        block = self._adapter[0].blocks[self.j]
        own = next(block.parameters()).dtype
        k_ip, v_ip = sd3_image_kv(block, ip.tokens, ip.temb, heads)
        out = sd3_image_attention(block, q.to(own), k.to(own), v.to(own), k_ip, v_ip).to(q.dtype)
        return out if ip.weight == 1 else out * ip.weight

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, ip_tokens: ImageTokens | None = None) -> Any:
        h = attn.heads
        q_raw, k_raw, v = (split_heads(m(hidden_states), h) for m in (attn.to_q, attn.to_k, attn.to_v))  # [B, H, L, D]
        q = attn.norm_q(q_raw) if attn.norm_q is not None else q_raw
        k = attn.norm_k(k_raw) if attn.norm_k is not None else k_raw
        n = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            eq, ek, ev = (split_heads(m(encoder_hidden_states), h) for m in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            eq = attn.norm_added_q(eq) if attn.norm_added_q is not None else eq
            ek = attn.norm_added_k(ek) if attn.norm_added_k is not None else ek
            q, k, v_all = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        else:
            v_all = v
        out = merge_heads(F.scaled_dot_product_attention(q, k, v_all)).to(q.dtype)
        image, context = out[:, :n], out[:, n:]
        ip = self._image_branch(q_raw, k_raw, v, ip_tokens, h)
        if ip is not None:
            image = image + ip
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


def install_sd3(transformer: Any, adapter: DitAdapter) -> dict[int, Any]:
    """Put an `SD3TrainProcessor` on every joint block's attention; returns the processors replaced."""
    old = {}
    for j, block in enumerate(list(transformer.transformer_blocks)[: adapter.config.blocks]):
        old[j] = block.attn.processor
        block.attn.processor = SD3TrainProcessor(adapter, j)
    return old


def restore_sd3(transformer: Any, saved: dict[int, Any]) -> None:
    for j, proc in saved.items():
        transformer.transformer_blocks[j].attn.processor = proc


def predict_sd3(transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
                pooled: torch.Tensor, ip: ImageTokens) -> torch.Tensor:
    """The velocity [B, C, H, W] for latents x_t at sigmas [B]; SD3's transformer takes t = sigma * 1000."""
    dtype = transformer.dtype
    return transformer(hidden_states=noisy.to(dtype), encoder_hidden_states=hidden.to(dtype),
                       pooled_projections=pooled.to(dtype), timestep=(sigmas * 1000).to(dtype),
                       joint_attention_kwargs={"ip_tokens": ip}, return_dict=False)[0]
