"""Animation batches and regions in the patch, host-free: per-frame embeds, weights and masks under context windows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ipa_train.adapter.config import AdapterConfig
from ipa_train.adapter.modules import multihead_attention
from ipa_train.hosts import frames, regions
from ipa_train.hosts.comfy.unet import AdapterApplication, Attn2Replace, FusionWrapper, encode_embeds

from .factories import random_adapter
from .test_comfy_unet import HEADS, _inputs, _options


@pytest.fixture(scope="module")
def adapter():
    cfg = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=20, cross_attention_dim=24,
                        layer_hidden_sizes=(16,) * 3, fusion=True)
    return random_adapter(cfg, seed=3)


def _clip(n, seed=9):
    return torch.randn(n, 20, generator=torch.Generator().manual_seed(seed))


def _per_frame(adapter, clip):
    return frames.encode_per_frame(adapter, clip.split(2), torch.zeros(1, 20))


def _single(adapter, clip_row):
    return encode_embeds(adapter, clip_row[None], torch.zeros(1, 20))


def test_encode_in_chunks_equals_one_by_one(adapter):
    clip = _clip(5)
    seen = []
    e = frames.encode_per_frame(adapter, clip.split(2), torch.zeros(1, 20), progress=seen.append)
    assert e.cond.shape == (5, 4, 24) and e.uncond.shape == (1, 4, 24) and seen == [2, 4, 5]
    for i in range(5):
        torch.testing.assert_close(e.cond[i : i + 1], _single(adapter, clip[i]).cond)


def _run(app, q, k, v, opts, index=1):
    with torch.no_grad():
        return Attn2Replace().add(app, index)(q, k, v, opts)


@pytest.mark.parametrize("cond_or_uncond", [[0, 1], [1, 0]])
def test_unfolded_row_i_equals_a_single_run_with_reference_i(adapter, cond_or_uncond):
    clip = _clip(3)
    app = AdapterApplication(adapter, _per_frame(adapter, clip), [0.8] * 3)
    q, k, v = _inputs(6)
    out = _run(app, q, k, v, _options(cond_or_uncond, 6))
    for i in range(3):
        single = AdapterApplication(adapter, _single(adapter, clip[i]), [0.8] * 3)
        rows = [i, i + 3]
        ref = _run(single, q[rows], k[rows], v[rows], _options(cond_or_uncond, 2))
        torch.testing.assert_close(out[rows], ref, rtol=1e-6, atol=1e-6)


def _window_options(kind, idx, cond_or_uncond, total):
    opts = _options(cond_or_uncond, len(idx) * len(cond_or_uncond))
    if kind == "comfy":
        opts["context_window"] = SimpleNamespace(index_list=idx, dim=0)
    else:
        opts["ad_params"] = {"full_length": total, "context_length": len(idx), "sub_idxs": idx}
    return opts


@pytest.mark.parametrize("kind", ["comfy", "animatediff"])
@pytest.mark.parametrize("mode", ["scaled", "fused"])
def test_a_window_of_frames_gets_those_frames_references_weights_and_masks(adapter, kind, mode):
    clip = _clip(6)
    masks = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(2))
    fw = [0.1 * (i + 1) for i in range(6)]
    full = AdapterApplication(adapter, _per_frame(adapter, clip), [1.0] * 3, mask=masks, frame_weights=fw,
                              mode=mode, fusion_lambda=0.5)
    idx = [4, 5, 0]  # a wrapping window
    q, k, v = _inputs(12)
    text = torch.randn(12, 7, 24, generator=torch.Generator().manual_seed(5))
    whole = _options([0, 1], 12)
    win = _window_options(kind, idx, [0, 1], 6)
    rows = idx + [i + 6 for i in idx]
    if mode == "fused":
        whole = _with_fusion(full, whole, text)
        win = _with_fusion(full, win, text[rows])
    torch.testing.assert_close(_run(full, q[rows], k[rows], v[rows], win), _run(full, q, k, v, whole)[rows],
                               rtol=1e-6, atol=1e-6)


def _with_fusion(app, opts, text):
    seen = {}
    FusionWrapper(app)(lambda *a, **kw: seen.update(a[5]), torch.zeros(text.shape[0], 4, 4, 4), None, None, text, None, opts)
    return seen


def test_frame_weights_scale_each_frame_and_repeat_the_last(adapter):
    e = _single(adapter, _clip(1)[0])
    app = AdapterApplication(adapter, e, [1.0] * 3, frame_weights=[0.0, 0.5])
    base = AdapterApplication(adapter, e, [0.5] * 3)
    q, k, v = _inputs(6)
    opts = _options([1, 0], 6)
    out, ref = _run(app, q, k, v, opts), _run(base, q, k, v, opts)
    text = multihead_attention(q, k, v, HEADS)
    assert torch.equal(out[[0, 3]], text[[0, 3]])  # frame 0 has weight 0: exactly the text attention
    torch.testing.assert_close(out[[1, 2, 4, 5]], ref[[1, 2, 4, 5]], rtol=1e-6, atol=1e-6)


def test_fewer_references_than_frames_repeat_the_last():
    assert frames.batch_rows(2, [0, 1], 8, {}) == [0, 1, 1, 1, 0, 1, 1, 1]
    assert frames.window_frames({"ad_params": {"sub_idxs": None, "full_length": 4}}, 4) == [0, 1, 2, 3]
    assert frames.window_frames({"context_window": SimpleNamespace(index_list=[3, 4], dim=2)}, 2) == [0, 1]


def test_zero_region_mask_is_the_unpatched_layer_exactly(adapter):
    app = AdapterApplication(adapter, _single(adapter, _clip(1)[0]), [1.0] * 3, mask=torch.zeros(1, 16, 16))
    q, k, v = _inputs(4)
    assert torch.equal(_run(app, q, k, v, _options([0, 1], 4)), multihead_attention(q, k, v, HEADS))


def test_mask_conditioning_copies_and_masks_every_entry():
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1
    cond = [[torch.zeros(1, 3, 4), {"pooled_output": None}], [torch.ones(1, 3, 4), {}]]
    out = regions.mask_conditioning(cond, mask, 0.7)
    assert all(torch.equal(o[1]["mask"], mask[None]) and o[1]["mask_strength"] == 0.7 for o in out)
    assert "mask" not in cond[0][1] and out[0][0] is cond[0][0]
    with pytest.raises(Exception, match="expected a MASK"):
        regions.region_mask(torch.zeros(1, 2, 3, 4))
