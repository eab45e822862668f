"""Pure attention math, the fusion module, and encoder checks, against plain reference formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ipa_train.adapter.attention import add_image_attention, decoupled_attention, mask_for_layer, token_grid
from ipa_train.adapter.layout import known_sites, layer_multipliers, parse_layer_weights
from ipa_train.adapter.modules import TextImageFusion
from ipa_train.errors import EncoderMismatchError, IPAKitError

from .factories import OFFICIAL, official_config, random_adapter


def naive_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head, written out with explicit loops over heads."""
    b, lq, inner = q.shape
    d = inner // heads
    outs = []
    for h in range(heads):
        qh, kh, vh = (x[..., h * d : (h + 1) * d] for x in (q, k, v))
        w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
        outs.append(w @ vh)
    return torch.cat(outs, dim=-1)


def test_decoupled_attention_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 10, 16, generator=g, dtype=torch.float64) for _ in range(3))
    k_ip, v_ip = (torch.randn(3, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    for heads in (1, 2, 4):
        ours = decoupled_attention(q, k, v, k_ip, v_ip, heads, weight=0.6)
        ref = naive_attention(q, k, v, heads) + 0.6 * naive_attention(q, k_ip, v_ip, heads)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)  # float64: only rounding differs


def test_weight_zero_skips_branch_and_per_row_weights():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 8, generator=g)
    out = torch.randn(2, 6, 8, generator=g)
    k_ip, v_ip = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    assert add_image_attention(out, q, k_ip, v_ip, 2, 0.0) is out
    per_row = add_image_attention(out, q, k_ip, v_ip, 2, torch.tensor([0.0, 1.0]))
    assert torch.equal(per_row[0], out[0])
    torch.testing.assert_close(per_row[1], add_image_attention(out, q, k_ip, v_ip, 2, 1.0)[1])


def test_fusion_formula_and_parameter_free_form():
    g = torch.Generator().manual_seed(2)
    ip, text = torch.randn(2, 4, 12, generator=g), torch.randn(2, 7, 12, generator=g)
    fusion = TextImageFusion(12)
    with torch.no_grad():
        for lin in (fusion.query, fusion.key, fusion.value):
            lin.weight.normal_(generator=g)
            lin.bias.normal_(generator=g)
    lam = 0.3
    q, k, v = fusion.query(ip), fusion.key(text), fusion.value(text)
    ref = lam * ip + (1 - lam) * torch.softmax(q @ k.transpose(1, 2) / math.sqrt(12), dim=-1) @ v
    torch.testing.assert_close(fusion(ip, text, lam), ref, rtol=1e-5, atol=1e-6)
    free = TextImageFusion(12, trainable=False)
    assert list(free.parameters()) == []
    ref_free = lam * ip + (1 - lam) * torch.softmax(ip @ text.transpose(1, 2) / math.sqrt(12), dim=-1) @ text
    torch.testing.assert_close(free(ip, text, lam), ref_free, rtol=1e-5, atol=1e-6)
    assert torch.equal(fusion(ip, text, 1.0), ip)
    # freshly built fusion layers start as the parameter-free form
    torch.testing.assert_close(TextImageFusion(12)(ip, text, lam), ref_free, rtol=1e-5, atol=1e-6)
    with pytest.raises(EncoderMismatchError, match="width 12"):
        fusion(ip, torch.randn(2, 7, 8), lam)


def _official(name):
    o = next(o for o in OFFICIAL if o.name == name)
    return random_adapter(official_config(o))


def test_vit_l_embeddings_into_vit_h_adapter():
    adapter = _official("ip-adapter_sd15")
    with pytest.raises(EncoderMismatchError, match=r"needs ViT-H/14.*ViT-L/14.*CLIP-ViT-H-14-laion2B-s32B-b79K"):
        adapter.project(torch.randn(1, 768))
    plus = _official("ip-adapter-plus_sd15")
    with pytest.raises(EncoderMismatchError, match=r"needs ViT-H/14.*ViT-L/14"):
        plus.project(torch.randn(1, 257, 1024))
    with pytest.raises(EncoderMismatchError, match="penultimate hidden states"):
        plus.project(torch.randn(1, 1280))  # image_embeds given to a plus adapter


def test_project_several_references_concatenates_tokens():
    adapter = _official("ip-adapter_sd15")
    one = adapter.project(torch.randn(2, 1024))
    assert one.shape == (2, 4, 768)
    many = adapter.project(torch.randn(2, 3, 1024))
    assert many.shape == (2, 12, 768)


def test_mask_resized_to_layer_tokens():
    assert token_grid((64, 64), 64 * 64) == (64, 64)
    assert token_grid((64, 48), 32 * 24) == (32, 24)
    assert token_grid((13, 13), 7 * 7) == (7, 7)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half
    m = mask_for_layer(mask, (8, 8), 16)  # 4x4 tokens
    assert m.shape == (1, 16, 1)
    grid = m.view(4, 4)
    assert torch.equal(grid[:, :2], torch.ones(4, 2)) and torch.equal(grid[:, 2:], torch.zeros(4, 2))


def test_layer_presets_and_custom_string():
    sdxl = known_sites("sdxl")
    assert len(sdxl) == 70
    style = layer_multipliers(sdxl, "sdxl", "style")
    # style layer: up_blocks.0.attentions.1 = official keys 69..87 (reference notes section 9)
    assert [2 * s.index + 1 for s, m in zip(sdxl, style) if m] == list(range(69, 88, 2))
    comp = layer_multipliers(sdxl, "sdxl", "composition")
    assert [2 * s.index + 1 for s, m in zip(sdxl, comp) if m] == list(range(29, 48, 2))
    sd15 = known_sites("sd15")
    assert [s.key for s in sd15][-1] == ("middle", 0, 0)  # key 31 is the middle block, patched under ("middle", 0)
    assert parse_layer_weights("0:1.0, 6: 0.5") == {0: 1.0, 6: 0.5}
    custom = layer_multipliers(sd15, "sd15", "custom", "6:0.5")
    assert custom[-1] == 0.5 and sum(custom) == 0.5
    with pytest.raises(IPAKitError, match="cannot read 'x'"):
        parse_layer_weights("0:1, x")
    with pytest.raises(IPAKitError, match="do not exist"):
        layer_multipliers(sd15, "sd15", "custom", "16:1")
    with pytest.raises(IPAKitError, match="SD1.5 and SDXL"):
        layer_multipliers(sd15, "unknown", "style")
