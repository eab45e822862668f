"""Weight types, embeds scaling, several references and the community pack's chaining protocol in the ComfyUI
patch, checked against the formulas written out with the naive attention of the tests."""

from __future__ import annotations

import copy

import pytest
import torch

from ipa_train.adapter.attention import EMBEDS_SCALING
from ipa_train.adapter.config import AdapterConfig
from ipa_train.adapter.layout import known_sites
from ipa_train.adapter.references import COMBINE_METHODS, combine_clip, parse_weight_list, reference_weights
from ipa_train.adapter.weight_types import LayerPlan
from ipa_train.errors import IPAKitError
from ipa_train.hosts.comfy import unet
from ipa_train.hosts.comfy.unet import AdapterApplication, Attn2Replace, chain_patches, encode_embeds

from .factories import random_adapter
from .test_modules import naive_attention

HEADS, HIDDEN, C, D = 2, 16, 24, 20


@pytest.fixture
def adapter():
    cfg = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=D, cross_attention_dim=C,
                        layer_hidden_sizes=(HIDDEN,) * 3)
    return random_adapter(cfg, seed=3)


def _qkv(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, HIDDEN, generator=g) for n in (16, 7, 7)]


def _opts(cond_or_uncond, batch):
    return {"cond_or_uncond": cond_or_uncond, "n_heads": HEADS, "sigmas": torch.full((batch,), 5.0),
            "original_shape": [batch, 4, 4, 4], "transformer_index": 0, "block": ("input", 1), "block_index": 0}


def _scaled_term(q, k_ip, v_ip, w, mode, groups=1):
    """The community pack's four embeds_scaling formulas, written out (C = the layer width, here HIDDEN)."""
    if mode == "V only":
        return w * naive_attention(q, k_ip, v_ip, HEADS)
    if mode.endswith("C penalty"):
        w = w * HIDDEN / 1280.0
    if mode == "K+mean(V) w/ C penalty":
        parts = v_ip.chunk(groups, dim=1)
        v_ip = torch.cat([(p - p.mean(dim=1, keepdim=True)) + w * p.mean(dim=1, keepdim=True) for p in parts], dim=1)
        return naive_attention(q, w * k_ip, v_ip, HEADS)
    return naive_attention(q, w * k_ip, w * v_ip, HEADS)


@pytest.mark.parametrize("mode", EMBEDS_SCALING)
@pytest.mark.parametrize("route", ["ref", "neg"])
def test_scaling_and_route_match_the_formulas(adapter, mode, route):
    g = torch.Generator().manual_seed(1)
    embeds = encode_embeds(adapter, torch.randn(2, D, generator=g), torch.zeros(1, D))  # 2 references, concat
    app = AdapterApplication(adapter, embeds, [LayerPlan(0.7, route)] * 3, embeds_scaling=mode)
    q, k, v = _qkv(2)
    with torch.no_grad():
        out = Attn2Replace().add(app, 1)(q, k, v, _opts([0, 1], 2))
        layer = adapter.layers[1]
        rows = []
        for r, tokens in enumerate([embeds.cond, embeds.uncond]):  # row 0 cond, row 1 uncond
            if route == "neg":  # the reference moves to the uncond row; the cond row attends to nothing
                tokens = torch.zeros_like(embeds.cond) if r == 0 else embeds.cond
            term = _scaled_term(q[r:r + 1], layer.to_k_ip(tokens), layer.to_v_ip(tokens), 0.7, mode, groups=2)
            rows.append(naive_attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], HEADS) + term)
    torch.testing.assert_close(out, torch.cat(rows), rtol=1e-5, atol=1e-5)


def test_alt_route_uses_the_second_image(adapter):
    g = torch.Generator().manual_seed(2)
    style = encode_embeds(adapter, torch.randn(1, D, generator=g), torch.zeros(1, D))
    comp = encode_embeds(adapter, torch.randn(1, D, generator=g), torch.zeros(1, D))
    app = AdapterApplication(adapter, style, [LayerPlan(1.0), LayerPlan(0.5, "alt"), LayerPlan(0.0)], embeds_alt=comp)
    only_comp = AdapterApplication(adapter, comp, [0.0, 0.5, 0.0])
    q, k, v = _qkv(2)
    with torch.no_grad():
        torch.testing.assert_close(Attn2Replace().add(app, 1)(q, k, v, _opts([0, 1], 2)),
                                   Attn2Replace().add(only_comp, 1)(q, k, v, _opts([0, 1], 2)))


def test_zero_weight_layer_does_no_image_attention(adapter, monkeypatch):
    embeds = encode_embeds(adapter, torch.randn(1, D), torch.zeros(1, D))
    app = AdapterApplication(adapter, embeds, [LayerPlan(0.0), LayerPlan(1.0), LayerPlan(0.0, "neg")], embeds_scaling="K+V")
    assert app.kv[0][0] is None and app.kv[1][2] is None  # nothing projected for them either
    calls = []
    real = unet.add_image_attention
    monkeypatch.setattr(unet, "add_image_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(2)
    for i in range(3):
        Attn2Replace().add(app, i)(q, k, v, _opts([0, 1], 2))
    assert len(calls) == 1


@pytest.mark.parametrize("method", COMBINE_METHODS)
def test_combine_methods(method):
    e = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-1.0, 0.5]])
    expected = {
        "add": [[3.0, 2.5]], "subtract": [[0.0, -4.25]], "average": [[1.0, 2.5 / 3]],
        "max": [[3.0, 4.0]], "min": [[-1.0, -2.0]],
        # mean of each column divided by that column's norm over the references
        "norm average": [[(1 + 3 - 1) / 3 / 11 ** 0.5, (-2 + 4 + 0.5) / 3 / 20.25 ** 0.5]],
    }
    out = combine_clip(e, method)
    if method == "concat":
        assert torch.equal(out, e.unsqueeze(0))
    else:
        torch.testing.assert_close(out, torch.tensor(expected[method]))
    # per-reference weights multiply each reference before a merge
    w = torch.tensor([2.0, 0.0, 1.0])
    if method != "concat":
        torch.testing.assert_close(combine_clip(e, method, w), combine_clip(e * w[:, None], method))


def test_reference_weights(adapter):
    assert reference_weights(None, 3) is None and reference_weights([], 3) is None
    assert reference_weights([0.5], 3).tolist() == [0.5] * 3
    with pytest.raises(IPAKitError, match="2 reference weights for 3 reference images"):
        reference_weights([1.0, 2.0], 3)
    assert parse_weight_list(" 1, 0.5;2 ") == [1.0, 0.5, 2.0]
    with pytest.raises(IPAKitError, match="cannot read 'x'"):
        parse_weight_list("1, x")
    # concat: a reference's weight scales its share of the image attention; weights (1, 0) = the first image alone
    g = torch.Generator().manual_seed(4)
    clip = torch.randn(2, D, generator=g)
    both = AdapterApplication(adapter, encode_embeds(adapter, clip, torch.zeros(1, D), "concat", [1.0, 0.0]), [1.0] * 3)
    q, k, v = _qkv(2)
    with torch.no_grad():
        layer = adapter.layers[0]
        tokens = encode_embeds(adapter, clip, torch.zeros(1, D)).cond
        tw = torch.tensor([1.0] * 4 + [0.0] * 4).view(1, -1, 1)
        term = naive_attention(q[:1], layer.to_k_ip(tokens), layer.to_v_ip(tokens) * tw, HEADS)
        out = Attn2Replace().add(both, 0)(q[:1], k[:1], v[:1], _opts([0], 1))
    torch.testing.assert_close(out, naive_attention(q[:1], k[:1], v[:1], HEADS) + term, rtol=1e-5, atol=1e-5)
    # identical references merge to that reference on both sides, whatever the (unweighted) method
    one = encode_embeds(adapter, clip[:1], torch.zeros(1, D))
    for method in ("average", "max", "min"):
        merged = encode_embeds(adapter, clip[:1].expand(3, -1), torch.zeros(1, D), method)
        torch.testing.assert_close(merged.cond, one.cond)
        torch.testing.assert_close(merged.uncond, one.uncond)


def _community_callback(out, q, k, v, extra_options, weight=1.0, **kwargs):
    """Stands in for the community pack's image term: a fixed function of q."""
    return weight * torch.tanh(q)


def test_community_protocol_both_orders_and_keys(adapter):
    embeds = encode_embeds(adapter, torch.randn(1, D), torch.zeros(1, D))
    app = AdapterApplication(adapter, embeds, [0.5] * 3)
    q, k, v = _qkv(2)
    opts = _opts([0, 1], 2)
    sites = known_sites("sd15")[:3]
    ours = chain_patches({}, app, sites, Attn2Replace().text_attention)
    assert set(ours) == {("input", 1), ("input", 2), ("input", 4)}  # depth-1 SD1.5 layers: the short keys
    xl_app = AdapterApplication(random_adapter(AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=D,
                                                             cross_attention_dim=C, layer_hidden_sizes=(HIDDEN,) * 70)),
                                encode_embeds(adapter, torch.randn(1, D), torch.zeros(1, D)), [1.0] * 70)
    xl = chain_patches({}, xl_app, known_sites("sdxl"), Attn2Replace().text_attention)
    assert len(xl) == 70 and all(len(key) == 3 for key in xl)  # deeper blocks: the long keys
    with torch.no_grad():
        alone = ours[("input", 1)](q, k, v, opts)
        # the community pack chains onto our patch in place: add(callback, **kwargs); a clone keeps its own list
        key = ("input", 1)
        before = copy.deepcopy(ours[key])
        assert ours[key].add(_community_callback, weight=0.3, sigma_start=10.0, sigma_end=0.0) is None
        torch.testing.assert_close(ours[key](q, k, v, opts), alone + 0.3 * torch.tanh(q))
        assert before.community == [] and torch.equal(before(q, k, v, opts), alone)
        # outside its sigma range the community adapter is off
        ours[key].add(_community_callback, weight=5.0, sigma_start=1.0, sigma_end=0.0)
        torch.testing.assert_close(ours[key](q, k, v, opts), alone + 0.3 * torch.tanh(q))

        # the other order: a patch of another pack on the key becomes our base
        def foreign(q_, k_, v_, extra):
            return Attn2Replace().text_attention(q_, k_, v_, extra) + 0.3 * torch.tanh(q_)

        wrapped = chain_patches({key: foreign}, app, sites[:1], Attn2Replace().text_attention)
        torch.testing.assert_close(wrapped[key](q, k, v, opts), alone + 0.3 * torch.tanh(q))
        # and a 2-part foreign key is honoured by a 3-part patch of a deeper block (SDXL)
        xl_wrapped = chain_patches({("input", 4): foreign}, xl_app, known_sites("sdxl"), Attn2Replace().text_attention)
        assert xl_wrapped[("input", 4, 0)].base is foreign
