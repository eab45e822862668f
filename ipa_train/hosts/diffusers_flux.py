"""Flux IP-Adapters inside diffusers' `FluxTransformer2DModel`, for training: an attention processor per block
that runs the block's joint attention as diffusers' `FluxAttnProcessor` does and adds the adapter's image
attention where the references add it, with gradients to the adapter's K/V weights.

- InstantX, double block j: the image rows' attention output + SDPA(q_img, K_ip, V_ip) before `to_out`.
- InstantX, single block 19 + i: the whole (text + image) attention output + SDPA(q, K_ip, V_ip); single blocks
  have no `to_out` in the processor (their `proj_out` follows in the block).
- XLabs, double block j: SDPA(q_img, K_ip, V_ip) returned as the processor's third output, which diffusers'
  `FluxTransformerBlock` adds to the image stream after the feed-forward, outside every projection and gate.
q is the QK-normed query before RoPE in every case. The image tokens come per call in the transformer's
`joint_attention_kwargs` ("ip_tokens"), so gradient checkpointing recomputes the blocks with them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..adapter.dit_attention import flux_image_attention, flux_image_kv, merge_heads
from ..adapter.dit_modules import DitAdapter, ImageTokens


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _rope(x: torch.Tensor, freqs: Any) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=2)


class FluxTrainProcessor:
    """Joint attention of one Flux block (double or single) plus the adapter's image attention for block `j`."""

    def __init__(self, adapter: DitAdapter, j: int | None):
        self._adapter = [adapter]  # a list: the processor must not register the adapter as its own submodule
        self.j = j  # None: a block the format leaves alone (XLabs' single blocks), run exactly as diffusers does
        self.format = adapter.config.format

    def _image_attention(self, q: torch.Tensor, ip: ImageTokens | None, heads: int) -> torch.Tensor | None:
        if ip is None or self.j is None or ip.weight == 0:
            return None
        block = self._adapter[0].blocks[self.j]
        k_ip, v_ip = flux_image_kv(block, ip.tokens, heads, self.format)  # in the adapter's dtype (fp32)
        out = flux_image_attention(q, k_ip, v_ip)  # [B, L, H*D]
        return out if ip.weight == 1 else out * ip.weight

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None,
                 ip_tokens: ImageTokens | None = None) -> Any:
        d = attn.head_dim
        q = attn.norm_q(_heads(attn.to_q(hidden_states), d))  # [B, H, L, D]; the RMS norms act on D
        k = attn.norm_k(_heads(attn.to_k(hidden_states), d))
        v = _heads(attn.to_v(hidden_states), d)
        ip = self._image_attention(q, ip_tokens, q.shape[1])  # pre-RoPE query of this stream
        txt = 0
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), d))
            ek = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), d))
            ev = _heads(attn.add_v_proj(encoder_hidden_states), d)
            q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
            txt = encoder_hidden_states.shape[1]
        if image_rotary_emb is not None:
            q, k = _rope(q, image_rotary_emb), _rope(k, image_rotary_emb)
        out = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)).to(q.dtype)
        if encoder_hidden_states is None:  # single block: every row gets the InstantX term
            return out + ip if ip is not None else out
        context, image = out[:, :txt], out[:, txt:]
        if ip is not None and self.format == "instantx-flux":
            image = image + ip
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        context = attn.to_add_out(context.contiguous())
        if ip is not None and self.format == "xlabs-flux":
            return image, context, ip
        return image, context


def install_flux(transformer: Any, adapter: DitAdapter) -> dict[Any, Any]:
    """Put a `FluxTrainProcessor` on every block: block j of the adapter (double blocks, then single blocks, in the
    file's order) on the j-th, none on the rest (they take the image tokens and leave them); returns the
    processors replaced, for `restore`."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    old: dict[Any, Any] = {"_blocks": blocks}
    for j, block in enumerate(blocks):
        old[j] = block.attn.processor
        block.attn.processor = FluxTrainProcessor(adapter, j if j < adapter.config.blocks else None)
    return old


def restore(saved: dict[str, Any]) -> None:
    blocks = saved.pop("_blocks")
    for j, proc in saved.items():
        blocks[j].attn.processor = proc


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C], Flux's 2x2 patches (diffusers' `FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: [B, H/2 * W/2, 4C] -> [B, C, H, W]."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """RoPE positions of the packed image tokens [H/2 * W/2, 3]: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


def predict_flux(transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
                 pooled: torch.Tensor, guidance: torch.Tensor | None, ip: ImageTokens) -> torch.Tensor:
    """The velocity [B, C, H, W] for latents x_t [B, C, H, W] at sigmas [B] (the transformer scales by 1000)."""
    h, w = noisy.shape[-2:]
    dtype = transformer.dtype
    out = transformer(hidden_states=pack(noisy).to(dtype), encoder_hidden_states=hidden.to(dtype),
                      pooled_projections=pooled.to(dtype), timestep=sigmas.to(dtype),
                      img_ids=image_ids(h, w, noisy.device), txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device),
                      guidance=None if guidance is None else guidance.to(noisy.device, dtype),
                      joint_attention_kwargs={"ip_tokens": ip}, return_dict=False)[0]
    return unpack(out, h, w)
