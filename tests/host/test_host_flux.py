"""Flux IP-Adapters in a real ComfyUI: a tiny random Flux in ComfyUI's own classes, patched through `dit` block
patches, against diffusers' FluxTransformer2DModel with the same weights (fp32 CPU, CFG batch cond + uncond).

XLabs: diffusers' `FluxIPAdapterAttnProcessor` + `ImageProjection`. InstantX (no diffusers class exists): a
plain-PyTorch transcription of the published InstantX processor, installed as the attention processor of every
diffusers double and single block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipa_train.adapter.dit_formats import detect_dit_config
from ipa_train.adapter.dit_modules import build_dit_adapter
from ipa_train.hosts.comfy.dit import BlockPatch, DitEmbeds
from ipa_train.hosts.comfy.dit_apply import apply_dit

from .. import dit_factories as fac
from .dit_models import FLUX, flux_ids, pack, tiny_flux, unpack

TOL = 1e-4
H = W = 8
TXT = 5


@pytest.fixture(scope="module")
def flux(comfy):
    return tiny_flux(comfy)


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 16, H, W, generator=g), ctx=torch.randn(2, TXT, FLUX["context"], generator=g),
                y=torch.randn(2, FLUX["pooled"], generator=g), sigma=0.62, guidance=3.5)


def comfy_out(patcher, x, ctx, y, sigma, guidance, spy=None):
    """The diffusion model's output with the patcher's transformer_options, as a sampler's CFG call passes them."""
    to = dict(patcher.model_options.get("transformer_options", {}))
    to["cond_or_uncond"], to["sigmas"] = [0, 1], torch.full((2,), sigma)
    if spy is not None:
        to["patches_replace"] = {"dit": {k: spy(k, p) for k, p in to.get("patches_replace", {}).get("dit", {}).items()}}
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.full((2,), sigma), ctx, y=y, guidance=torch.full((2,), guidance),
                                             transformer_options=to)


def ref_out(ref, x, ctx, y, sigma, guidance, **kwargs):
    img_ids, txt_ids = flux_ids(H, W, TXT)
    with torch.no_grad():
        out = ref(hidden_states=pack(x), encoder_hidden_states=ctx, pooled_projections=y,
                  timestep=torch.full((2,), sigma), img_ids=img_ids, txt_ids=txt_ids,
                  guidance=torch.full((2,), guidance), joint_attention_kwargs=kwargs or None).sample
    return unpack(out, H, W)


def _adapter(state):
    flat = fac.flat(state)
    return build_dit_adapter(detect_dit_config(flat, "t"), flat, "t").eval()


def _counting(calls):
    def spy(key, patch):
        def run(block, active, args, extra):
            calls.append(key)
            return patch.run(block, active, args, extra)
        return BlockPatch(run, patch.block, patch.entries, patch.base)
    return spy


def test_unpatched_comfy_flux_equals_diffusers(flux):
    ref, patcher = flux
    inp = _inputs()
    assert (comfy_out(patcher, **inp) - ref_out(ref, **inp)).abs().max() < TOL


# --------------------------------------------------------------------------------------------------------
# XLabs vs diffusers


def _install_xlabs(ref, state, tokens, weight):
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    procs = {}
    for name, proc in ref.attn_processors.items():
        if name.startswith("transformer_blocks."):
            i = int(name.split(".")[1])
            p = FluxIPAdapterAttnProcessor(FLUX["hidden"], FLUX["context"], num_tokens=(tokens,), scale=weight)
            pre = f"double_blocks.{i}.processor.ip_adapter_double_stream_"
            p.load_state_dict({f"to_{kv}_ip.0.{w}": state[f"{pre}{kv}_proj.{w}"] for kv in "kv" for w in ("weight", "bias")})
            procs[name] = p
        else:
            procs[name] = proc
    ref.set_attn_processor(procs)
    proj = ImageProjection(image_embed_dim=768, cross_attention_dim=FLUX["context"], num_image_text_embeds=tokens)
    proj.load_state_dict({k.replace("ip_adapter_proj_model.proj", "image_embeds").replace("ip_adapter_proj_model.", ""): v
                          for k, v in state.items() if k.startswith("ip_adapter_proj_model.")})
    ref.encoder_hid_proj = MultiIPAdapterImageProjection([proj])


def _restore(ref):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    ref.set_attn_processor(FluxAttnProcessor())
    ref.encoder_hid_proj = None


@pytest.mark.parametrize("tokens", [4, 16])
def test_xlabs_matches_diffusers(flux, tokens):
    ref, patcher = flux
    state = fac.xlabs_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=tokens, blocks=FLUX["depth"], seed=4)
    adapter = _adapter(state)
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 768, generator=g), torch.randn(1, 768, generator=g)
    inp = _inputs()
    m = apply_dit(patcher, adapter, DitEmbeds(cond, uncond, "xlabs-flux"), weight=0.8)
    calls = []
    ours = comfy_out(m, **inp, spy=_counting(calls))
    try:
        _install_xlabs(ref, state, tokens, 0.8)
        theirs = ref_out(ref, **inp, ip_adapter_image_embeds=[torch.cat([cond, uncond]).unsqueeze(1)])
    finally:
        _restore(ref)
    base = comfy_out(patcher, **inp)
    diff = (ours - theirs).abs().max().item()
    print(f"XLabs {tokens} tokens vs diffusers: max |diff| {diff:.2e}, adapter effect {(ours - base).abs().max():.2e}")
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the prediction
    assert diff < TOL
    assert sorted(calls) == [("double_block", i) for i in range(FLUX["depth"])]


# --------------------------------------------------------------------------------------------------------
# InstantX vs the published processor math


class InstantXReference(torch.nn.Module):
    """InstantX's `IPAFluxAttnProcessor2_0`, spelled out on diffusers' Flux attention.

    The image query is the block's QK-normed query before RoPE (image rows in double blocks, text + image rows in
    single blocks); K = RMSNorm_noaffine(heads(to_k_ip(tokens)), eps 1e-5), V = heads(to_v_ip(tokens)) un-normed;
    `hidden += scale * softmax(q K^T / sqrt(D)) V` before `to_out` (double) or as the returned attention
    (single, before proj_out).
    """

    def __init__(self, wk, wv, tokens, scale):
        super().__init__()
        self.wk, self.wv, self.tokens, self.scale = wk, wv, tokens, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))  # [B, L, H, D]

        q = attn.norm_q(heads(attn.to_q(hidden_states)))
        k = attn.norm_k(heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        ip_q = q.transpose(1, 2)
        if encoder_hidden_states is not None:
            q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), q], dim=1)
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), k], dim=1)
            v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), v], dim=1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        b = self.tokens.shape[0]
        ik = (self.tokens @ self.wk.T).view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)
        iv = (self.tokens @ self.wv.T).view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)
        ik = ik / torch.sqrt(ik.pow(2).mean(-1, keepdim=True) + 1e-5)
        w = torch.softmax(ip_q @ ik.transpose(-1, -2) / attn.head_dim ** 0.5, dim=-1)
        ip = (w @ iv).transpose(1, 2).flatten(2)
        if encoder_hidden_states is None:
            return out + self.scale * ip
        s = encoder_hidden_states.shape[1]
        txt, img = out[:, :s], out[:, s:] + self.scale * ip
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


def _instantx_tokens(state, feats):
    p = state["image_proj"]
    h = F.gelu(feats @ p["proj.0.weight"].T + p["proj.0.bias"])
    t = (h @ p["proj.2.weight"].T + p["proj.2.bias"]).reshape(feats.shape[0], -1, p["norm.weight"].shape[0])
    return F.layer_norm(t, t.shape[-1:], p["norm.weight"], p["norm.bias"], 1e-5)


def _install_instantx(ref, state, tokens, scale):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    procs, ip = {}, state["ip_adapter"]
    for name in ref.attn_processors:
        i = int(name.split(".")[1])
        j = i if name.startswith("transformer_blocks.") else FLUX["depth"] + i
        procs[name] = InstantXReference(ip[f"{j}.to_k_ip.weight"], ip[f"{j}.to_v_ip.weight"], tokens, scale)
    ref.set_attn_processor(procs)
    return FluxAttnProcessor


def test_instantx_matches_the_published_math(flux):
    ref, patcher = flux
    blocks = FLUX["depth"] + FLUX["single"]
    state = fac.instantx_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=16, blocks=blocks, seed=6)
    adapter = _adapter(state)
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(1, 1152, generator=g), torch.zeros(1, 1152)
    inp = _inputs()
    m = apply_dit(patcher, adapter, DitEmbeds(cond, uncond, "instantx-flux"), weight=0.9)
    calls = []
    ours = comfy_out(m, **inp, spy=_counting(calls))
    try:
        _install_instantx(ref, state, _instantx_tokens(state, torch.cat([cond, uncond])), 0.9)
        theirs = ref_out(ref, **inp)
    finally:
        _restore(ref)
    base = comfy_out(patcher, **inp)
    diff = (ours - theirs).abs().max().item()
    print(f"InstantX vs the published math: max |diff| {diff:.2e}, adapter effect {(ours - base).abs().max():.2e}")
    assert (ours - base).abs().max() > 1e-2
    assert diff < TOL
    assert sorted(calls) == sorted([("double_block", i) for i in range(FLUX["depth"])] +
                                   [("single_block", i) for i in range(FLUX["single"])])


# --------------------------------------------------------------------------------------------------------
# weight 0, windows, block weights, chaining


@pytest.fixture(scope="module")
def instantx(flux):
    blocks = FLUX["depth"] + FLUX["single"]
    adapter = _adapter(fac.instantx_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=16, blocks=blocks, seed=6))
    g = torch.Generator().manual_seed(7)
    return adapter, DitEmbeds(torch.randn(1, 1152, generator=g), torch.zeros(1, 1152), "instantx-flux")


@pytest.mark.parametrize("kwargs", [dict(weight=0.0), dict(weight=1.0, start_at=0.7), dict(weight=1.0, end_at=0.1),
                                    dict(weight=1.0, block_weights=[0.0] * 4)])
def test_off_is_the_unpatched_model_bit_for_bit(flux, instantx, kwargs):
    _, patcher = flux
    inp = _inputs()
    m = apply_dit(patcher, *instantx, **kwargs)
    assert torch.equal(comfy_out(m, **inp), comfy_out(patcher, **inp))


def test_block_weights_and_chaining(flux, instantx):
    _, patcher = flux
    inp = _inputs()
    base = comfy_out(patcher, **inp)
    only_first = comfy_out(apply_dit(patcher, *instantx, weight=1.0, block_weights=[1, 0, 0, 0]), **inp)
    full = comfy_out(apply_dit(patcher, *instantx, weight=1.0), **inp)
    assert (only_first - base).abs().max() > 1e-3 and (only_first - full).abs().max() > 1e-3
    # two applies of half the weight on one model: one recomputation holding both terms, as one apply of weight 1
    twice = apply_dit(apply_dit(patcher, *instantx, weight=0.5), *instantx, weight=0.5)
    assert len(twice.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)].entries) == 2
    assert (comfy_out(twice, **inp) - full).abs().max() < 1e-5


def test_chains_with_a_foreign_patch_at_the_same_point(flux, instantx):
    _, patcher = flux
    inp = _inputs()
    seen = []

    def foreign(args, extra):  # another pack's patch: scales the block's image update
        seen.append(1)
        img_in = args["img"].clone()
        out = extra["original_block"](args)
        return {"img": img_in + 0.5 * (out["img"] - img_in), "txt": out["txt"]}

    m = patcher.clone()
    m.set_model_patch_replace(foreign, "dit", "double_block", 1)
    alone = comfy_out(m, **inp)
    both = comfy_out(apply_dit(m, *instantx, weight=1.0), **inp)
    assert seen and (both - alone).abs().max() > 1e-3
    off = comfy_out(apply_dit(m, *instantx, weight=0.0), **inp)
    assert torch.equal(off, alone)
