"""The Flux / SD3.5 image attention and projections against the references, without a host (fp32 CPU).

XLabs: diffusers' `ImageProjection` + `FluxIPAdapterAttnProcessor`; SD3.5: diffusers' own loader of the InstantX
file into a tiny `SD3Transformer2DModel` (`IPAdapterTimeImageProjection` + `SD3IPAdapterJointAttnProcessor2_0`);
InstantX Flux: a plain-PyTorch transcription of the published processor (no diffusers class exists).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ipa_train.adapter.dit_attention import (
    flux_image_attention,
    flux_image_kv,
    sd3_image_attention,
    sd3_image_kv,
    split_heads,
)
from ipa_train.adapter.dit_formats import detect_dit_config
from ipa_train.adapter.dit_modules import build_dit_adapter

from . import dit_factories as f

TOL = 1e-5


def _adapter(state):
    flat = f.flat(state)
    return build_dit_adapter(detect_dit_config(flat, "test"), flat, "test").eval()


# --------------------------------------------------------------------------------------------------------
# XLabs


def _flux_attention(dim=32, heads=2, seed=0):
    from diffusers.models.transformers.transformer_flux import FluxAttention

    torch.manual_seed(seed)
    return FluxAttention(query_dim=dim, heads=heads, dim_head=dim // heads, added_kv_proj_dim=dim, bias=True,
                         eps=1e-6).eval()


def _rope(txt_len, img_len, head_dim):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([torch.zeros(txt_len, 3), torch.stack([torch.zeros(img_len), torch.arange(img_len) // 4,
                                                         torch.arange(img_len) % 4], dim=1)])
    axes = [head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]
    return FluxPosEmbed(10000, axes)(ids)


@pytest.mark.parametrize("tokens", [4, 16])
def test_xlabs_matches_diffusers_flux_ip_adapter_processor(tokens):
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    state = f.xlabs_flux(hidden=32, ctx=24, tokens=tokens, blocks=19)
    ours = _adapter(state)
    embeds = torch.randn(2, 768)
    ref_proj = ImageProjection(image_embed_dim=768, cross_attention_dim=24, num_image_text_embeds=tokens)
    ref_proj.load_state_dict({k.replace("ip_adapter_proj_model.proj", "image_embeds").replace(
        "ip_adapter_proj_model.", ""): v for k, v in state.items() if k.startswith("ip_adapter_proj_model.")})
    tok = ours.image_proj(embeds)
    assert (tok - ref_proj(embeds)).abs().max() < TOL

    attn = _flux_attention()
    j, scale = 5, 0.7
    proc = FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=24, num_tokens=(tokens,), scale=scale)
    p = f"double_blocks.{j}.processor.ip_adapter_double_stream_"
    proc.load_state_dict({f"to_{kv}_ip.0.{w}": state[f"{p}{kv}_proj.{w}"] for kv in "kv" for w in ("weight", "bias")})
    hs, ehs = torch.randn(2, 16, 32), torch.randn(2, 5, 32)
    _, _, ref_ip = proc(attn, hs, ehs, image_rotary_emb=_rope(5, 16, 16), ip_hidden_states=[tok])

    q = attn.norm_q(attn.to_q(hs).unflatten(-1, (2, -1))).transpose(1, 2)  # QK-normed, before RoPE
    ip = scale * flux_image_attention(q, *flux_image_kv(ours.blocks[j], tok, 2, "xlabs-flux"))
    assert ref_ip.abs().max() > 1e-2  # the branch is not trivially zero
    assert (ip - ref_ip).abs().max() < TOL


# --------------------------------------------------------------------------------------------------------
# InstantX Flux: the published processor, transcribed


def _reference_instantx_flux(embeds, state, j, q, heads):
    """InstantX's `MLPProjModel` and `IPAFluxAttnProcessor2_0` image branch, spelled out.

    tokens = LN(Linear(GELU(Linear(e)))).view(B, N, C); K = RMSNorm_noaffine(heads(to_k_ip(tokens))), eps 1e-5;
    V = heads(to_v_ip(tokens)) (the V norm is commented out in the published file); softmax(q K^T / sqrt(D)) V.
    """
    p, ip = state["image_proj"], state["ip_adapter"]
    h = torch.nn.functional.gelu(embeds @ p["proj.0.weight"].T + p["proj.0.bias"])
    t = (h @ p["proj.2.weight"].T + p["proj.2.bias"]).reshape(embeds.shape[0], -1, p["norm.weight"].shape[0])
    mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    tokens = (t - mu) / torch.sqrt(var + 1e-5) * p["norm.weight"] + p["norm.bias"]
    b, n, _ = tokens.shape
    k = (tokens @ ip[f"{j}.to_k_ip.weight"].T).view(b, n, heads, -1).transpose(1, 2)
    v = (tokens @ ip[f"{j}.to_v_ip.weight"].T).view(b, n, heads, -1).transpose(1, 2)
    k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return tokens, (w @ v).transpose(1, 2).reshape(b, q.shape[2], -1)


@pytest.mark.parametrize("j", [0, 18, 19, 56])  # double blocks 0 and 18, single blocks 0 and 37
def test_instantx_flux_matches_the_published_math(j):
    state = f.instantx_flux(hidden=32, ctx=24, tokens=128, blocks=57)
    ours = _adapter(state)
    embeds = torch.randn(2, 1152)
    q = torch.randn(2, 2, 21, 16)  # [B, H, L, D]: image rows (double) or text+image rows (single)
    ref_tokens, ref_ip = _reference_instantx_flux(embeds, state, j, q, 2)
    tokens = ours.image_proj(embeds)
    assert (tokens - ref_tokens).abs().max() < TOL
    ip = flux_image_attention(q, *flux_image_kv(ours.blocks[j], tokens, 2, "instantx-flux"))
    assert (ip - ref_ip).abs().max() < TOL
    # the keys are normalised, the values are not
    k, v = flux_image_kv(ours.blocks[j], tokens, 2, "instantx-flux")
    assert torch.allclose(k.pow(2).mean(-1), torch.ones(()), atol=1e-3)
    assert not torch.allclose(v.pow(2).mean(-1), torch.ones(()), atol=1e-1)


# --------------------------------------------------------------------------------------------------------
# InstantX SD3.5 through diffusers' own loader


def _tiny_sd3(blocks=2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=blocks, attention_head_dim=64,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                 qk_norm="rms_norm").eval()


def test_sd3_resampler_and_joint_attention_match_diffusers():
    state = f.instantx_sd3(hidden=128, head_dim=64, tokens=64, blocks=2, dim=128, depth=4, temb_in=32)
    ours = _adapter(state)
    ref = _tiny_sd3(blocks=2)
    ref._load_ip_adapter_weights(state, low_cpu_mem_usage=False)

    feats, t = torch.randn(2, 729, 1152), torch.tensor([980.0, 35.5])
    tok, temb = ours.image_proj(feats, t)
    ref_tok, ref_temb = ref.image_proj(feats, t)
    assert (tok - ref_tok).abs().max() < TOL and (temb - ref_temb).abs().max() < TOL

    hs, ehs = torch.randn(2, 16, 128), torch.randn(2, 7, 128)
    for j, block in enumerate(ref.transformer_blocks):
        attn, proc = block.attn, block.attn.processor
        attn.to_out[0] = nn.Identity()  # read the attention before `proj`, where the branch is added
        outs = []
        for scale in (0.0, 0.6):
            proc.scale = scale
            out = proc(attn, hs, ehs, ip_hidden_states=ref_tok, temb=ref_temb)
            outs.append(out[0] if isinstance(out, tuple) else out)
        ref_ip = outs[1] - outs[0]
        q, k, v = (split_heads(m(hs), 2) for m in (attn.to_q, attn.to_k, attn.to_v))  # raw: before ln_q / ln_k
        ip = 0.6 * sd3_image_attention(ours.blocks[j], q, k, v, *sd3_image_kv(ours.blocks[j], tok, temb, 2))
        assert ref_ip.abs().max() > 1e-2
        assert (ip - ref_ip).abs().max() < TOL, j
