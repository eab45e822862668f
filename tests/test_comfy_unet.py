"""The ComfyUI patch callables driven with the host's real `extra_options` contract, against the core math."""

from __future__ import annotations

import copy

import pytest
import torch

from ipa_train.adapter.attention import mask_for_layer
from ipa_train.adapter.config import AdapterConfig
from ipa_train.adapter.layout import known_sites
from ipa_train.adapter.modules import multihead_attention
from ipa_train.hosts.comfy.unet import (
    CALL_KV_KEY,
    AdapterApplication,
    Attn2Replace,
    FusionWrapper,
    chain_patches,
    encode_embeds,
)

from .factories import random_adapter
from .test_modules import naive_attention

HEADS, HIDDEN, C = 2, 16, 24


@pytest.fixture
def adapter():
    cfg = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=20, cross_attention_dim=C,
                        layer_hidden_sizes=(HIDDEN,) * 3, fusion=True)
    a = random_adapter(cfg, seed=3)
    return a


def _embeds(adapter):
    g = torch.Generator().manual_seed(9)
    return encode_embeds(adapter, torch.randn(1, 20, generator=g), torch.zeros(1, 20))


def _inputs(batch, seed=0, lq=16, s=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, HIDDEN, generator=g), torch.randn(batch, s, HIDDEN, generator=g),
            torch.randn(batch, s, HIDDEN, generator=g))


def _options(cond_or_uncond, batch, sigma=5.0):
    return {"cond_or_uncond": cond_or_uncond, "n_heads": HEADS, "sigmas": torch.full((batch,), sigma),
            "original_shape": [batch, 4, 4, 4], "transformer_index": 0, "block": ("input", 1), "block_index": 0}


def _expected(adapter, embeds, idx, q, k, v, cond_or_uncond, weight, mask=None, cond_tokens=None):
    per_chunk = q.shape[0] // len(cond_or_uncond)
    layer = adapter.layers[idx]
    rows = []
    for r in range(q.shape[0]):
        c = cond_or_uncond[r // per_chunk]
        tokens = embeds.uncond if c == 1 else (embeds.cond if cond_tokens is None else cond_tokens[r : r + 1])
        k_ip, v_ip = layer.to_k_ip(tokens), layer.to_v_ip(tokens)
        term = weight * naive_attention(q[r : r + 1], k_ip, v_ip, HEADS)
        if mask is not None:
            term = term * mask
        rows.append(naive_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1], HEADS) + term)
    return torch.cat(rows)


@pytest.mark.parametrize("cond_or_uncond", [[0, 1], [1, 0], [0], [1]])
@pytest.mark.parametrize("per_chunk", [1, 2])
def test_patch_follows_chunk_order(adapter, cond_or_uncond, per_chunk):
    embeds = _embeds(adapter)
    app = AdapterApplication(adapter, embeds, [0.7, 0.3, 0.0])
    patch = Attn2Replace().add(app, 1)
    b = per_chunk * len(cond_or_uncond)
    q, k, v = _inputs(b)
    with torch.no_grad():
        out = patch(q, k, v, _options(cond_or_uncond, b))
        ref = _expected(adapter, embeds, 1, q, k, v, cond_or_uncond, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_zero_weight_layer_and_sigma_gate_return_text_attention_exactly(adapter):
    embeds = _embeds(adapter)
    app = AdapterApplication(adapter, embeds, [0.7, 0.3, 0.0], sigma_start=10.0, sigma_end=2.0)
    q, k, v = _inputs(2)
    text = multihead_attention(q, k, v, HEADS)
    with torch.no_grad():
        assert torch.equal(Attn2Replace().add(app, 2)(q, k, v, _options([0, 1], 2)), text)  # layer weight 0
        assert torch.equal(Attn2Replace().add(app, 0)(q, k, v, _options([0, 1], 2, sigma=1.0)), text)  # after end
        assert torch.equal(Attn2Replace().add(app, 0)(q, k, v, _options([0, 1], 2, sigma=11.0)), text)  # before start
        assert not torch.equal(Attn2Replace().add(app, 0)(q, k, v, _options([0, 1], 2, sigma=5.0)), text)


def test_mask_limits_image_branch(adapter):
    embeds = _embeds(adapter)
    mask = torch.zeros(1, 32, 32)
    mask[:, :16] = 1.0  # top half
    app = AdapterApplication(adapter, embeds, [1.0, 1.0, 1.0], mask=mask)
    q, k, v = _inputs(4)
    with torch.no_grad():
        out = Attn2Replace().add(app, 0)(q, k, v, _options([1, 0], 4))
        layer_mask = mask_for_layer(mask, (4, 4), 16)
        ref = _expected(adapter, embeds, 0, q, k, v, [1, 0], 1.0, mask=layer_mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    text = multihead_attention(q, k, v, HEADS)
    torch.testing.assert_close(out[:, 8:], text[:, 8:])  # bottom half of the 4x4 grid: text only


def test_fused_mode_fuses_cond_rows_once_per_call(adapter):
    embeds = _embeds(adapter)
    app = AdapterApplication(adapter, embeds, [1.0, 1.0, 1.0], mode="fused", fusion_lambda=0.5)
    wrapper = FusionWrapper(app)
    b = 4
    text = torch.randn(b, 7, C)
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        seen.update(transformer_options)
        return x

    wrapper(executor, torch.zeros(b, 4, 4, 4), torch.zeros(b), None, text, None, {"cond_or_uncond": [1, 0]})
    assert app.uid in seen[CALL_KV_KEY]
    q, k, v = _inputs(b)
    opts = {**_options([1, 0], b), CALL_KV_KEY: seen[CALL_KV_KEY]}
    with torch.no_grad():
        out = Attn2Replace().add(app, 1)(q, k, v, opts)
        fused = adapter.fuse(embeds.cond.expand(b, -1, -1), text, 0.5)
        ref = _expected(adapter, embeds, 1, q, k, v, [1, 0], 1.0, cond_tokens=fused)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fused_lambda_one_is_scaled(adapter):
    embeds = _embeds(adapter)
    app = AdapterApplication(adapter, embeds, [1.0] * 3, mode="fused", fusion_lambda=1.0)
    assert not app.fused and app.adapter is None  # no per-call work at all


def test_chained_adapters_add_up_and_copies_share_tensors(adapter):
    embeds = _embeds(adapter)
    a1 = AdapterApplication(adapter, embeds, [0.5] * 3)
    a2 = AdapterApplication(adapter, embeds, [0.25] * 3)
    sites = known_sites("sd15")[:3]
    first = chain_patches({}, a1, sites, Attn2Replace().text_attention)
    second = chain_patches(first, a2, sites, Attn2Replace().text_attention)
    patch = second[sites[0].key[:2]]
    assert [e[0] for e in patch.entries] == [a1, a2]
    assert [e[0] for e in first[sites[0].key[:2]].entries] == [a1]  # the earlier model's patch is untouched
    q, k, v = _inputs(2)
    with torch.no_grad():
        out = patch(q, k, v, _options([0, 1], 2))
        ref = _expected(adapter, embeds, 0, q, k, v, [0, 1], 0.75)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy({"attn2": second})
    assert clone["attn2"][sites[0].key[:2]].entries[0][0] is a1
    assert clone["attn2"][sites[0].key[:2]].entries[0][0].kv[0][0][0] is a1.kv[0][0][0]


def _snapshot(*tensors):
    return [(t.dtype, t.device, t.clone()) for t in tensors]


def _unchanged(snapshot, tensors):
    return all(d == t.dtype and dev == t.device and torch.equal(v, t) for (d, dev, v), t in zip(snapshot, tensors))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moving_the_patch_never_moves_what_it_was_given(adapter, dtype):
    """ComfyUI loads a model with `patch.to(device)` then `patch.to(model dtype)`; the adapter, embeds, mask and
    weights a patch was given stay as they were (other nodes and later prompts hold them), the patch computes in
    the query's dtype, and its own copies are made once per device and dtype, not per call."""
    from ipa_train.hosts.placement import adapter_on

    embeds = _embeds(adapter)
    mask = torch.ones(1, 4, 4)
    mask[:, 2:] = 0
    app = AdapterApplication(adapter, embeds, [1.0, 0.5, 1.0], mode="fused", fusion_lambda=0.5, mask=mask,
                             frame_weights=[1.0, 0.5])
    given = [*adapter.state_dict().values(), embeds.cond, embeds.uncond, mask]
    before = _snapshot(*given)
    patch = Attn2Replace().add(app, 1)
    b = 4
    text = torch.randn(b, 7, C)

    def executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw):
        q, k, v = (x.to(dtype) for x in _inputs(b))
        return patch(q, k, v, {**_options([1, 0], b), **transformer_options})

    for _ in range(2):  # two sampling runs, each loading the model again
        assert patch.to(torch.device("cpu")).to(dtype) is patch
        outs = [FusionWrapper(app)(executor, None, None, None, text.to(dtype), None, {"cond_or_uncond": [1, 0]})
                for _ in range(2)]
        assert all(o.dtype == dtype and torch.isfinite(o).all() for o in outs)
        assert torch.equal(outs[0], outs[1])
        copies = len(app._copies)
    assert _unchanged(before, given)
    assert copies == len(app._copies) > 0
    # the model moved away (another device): the copies for this one are dropped; nothing given moved
    patch.to(torch.device("meta"))
    assert len(app._copies) == 0 and _unchanged(before, given)
    moved = adapter_on(adapter, "meta")
    assert moved is not adapter and next(moved.parameters()).device.type == "meta"
    assert adapter_on(adapter, "meta") is moved and adapter_on(adapter, "cpu") is adapter
    assert _unchanged(before, given)


def test_encode_takes_inputs_in_any_dtype(adapter):
    """CLIP vision in fp16 (or an adapter another dtype): inputs are brought to the adapter, never the reverse."""
    g = torch.Generator().manual_seed(9)
    clip = torch.randn(1, 20, generator=g)
    ref = encode_embeds(adapter, clip, torch.zeros(1, 20))
    half = encode_embeds(adapter, clip.half(), torch.zeros(1, 20, dtype=torch.bfloat16))
    assert half.cond.dtype == torch.float32
    torch.testing.assert_close(half.cond, ref.cond, rtol=0, atol=2e-2)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())


def test_per_call_copies_are_capped_but_per_apply_ones_kept():
    from ipa_train.hosts.placement import DeviceCopies

    copies = DeviceCopies(limit=3)
    cpu = torch.device("cpu")
    kept = copies.get((cpu, None, "kv"), lambda: "kv")
    for i in range(7):
        copies.get((cpu, None, "batched", i), lambda: i, bounded=True)
    assert len(copies) <= 4 and copies.get((cpu, None, "kv"), lambda: "new") is kept
    copies.keep_only("meta")
    assert len(copies) == 0
