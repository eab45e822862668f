"""The host-free parts of the Flux / SD3.5 patches: references, cond/uncond rows, windows, per-block weights."""

from __future__ import annotations

import pytest
import torch

from ipa_train.adapter.dit_formats import detect_dit_config
from ipa_train.adapter.dit_modules import build_dit_adapter
from ipa_train.errors import IPAKitError
from ipa_train.hosts.comfy.dit import BlockPatch, DitApplication, DitEmbeds, add_to, chunks_of, project, row_tensor

from . import dit_factories as f


def _adapter(state):
    flat = f.flat(state)
    return build_dit_adapter(detect_dit_config(flat, "x"), flat, "x").eval()


@pytest.fixture(scope="module")
def xlabs():
    return _adapter(f.xlabs_flux(hidden=32, ctx=24, tokens=4, blocks=3))


def test_concat_keeps_every_reference_and_merges_make_one(xlabs):
    feats = torch.randn(3, 768)
    tokens, temb, tw = project(xlabs, feats, "concat", None)
    assert tokens.shape == (1, 12, 24) and temb is None and tw is None
    one = xlabs.image_proj(feats[1:2])
    assert torch.allclose(tokens[:, 4:8], one, atol=1e-6)  # batch of 3 vs 1: float rounding only
    avg, _, _ = project(xlabs, feats, "average", None)
    assert torch.allclose(avg, xlabs.image_proj(feats.mean(0, keepdim=True)), atol=1e-6)
    _, _, tw = project(xlabs, feats, "concat", [1.0, 0.5, 2.0])
    assert tw.tolist() == [1.0] * 4 + [0.5] * 4 + [2.0] * 4


def test_sd3_tokens_depend_on_the_step():
    sd3 = _adapter(f.instantx_sd3(blocks=2))
    feats = torch.randn(2, 729, 1152)
    a, temb_a, _ = project(sd3, feats, "concat", None, torch.tensor([900.0]))
    b, temb_b, _ = project(sd3, feats, "concat", None, torch.tensor([100.0]))
    assert a.shape == (1, 128, 128) and temb_a.shape == (1, 128)
    assert not torch.allclose(a, b) and not torch.allclose(temb_a, temb_b)
    memo = {}  # the resampler's input projection, kept across steps: the same tokens as computing it every step
    for t, tokens, temb in ((900.0, a, temb_a), (100.0, b, temb_b)):
        kept, kept_temb, _ = project(sd3, feats, "concat", None, torch.tensor([t]), memo)
        assert torch.equal(kept, tokens) and torch.equal(kept_temb, temb)
    assert memo["proj_in"].shape == (2, 729, 128)


def test_rows_follow_cond_or_uncond():
    assert chunks_of({"cond_or_uncond": [1, 0]}, 4) == [1, 1, 0, 0]
    assert chunks_of({}, 3) == [0, 0, 0]
    with pytest.raises(IPAKitError, match="cannot be split"):
        chunks_of({"cond_or_uncond": [0, 1]}, 3)
    t = row_tensor({0: torch.zeros(1, 2), 1: torch.ones(1, 2)}, [1, 0, 0])
    assert t[:, 0].tolist() == [1.0, 0.0, 0.0]


def test_window_and_block_weights(xlabs):
    e = DitEmbeds(torch.randn(1, 768), torch.zeros(1, 768), "xlabs-flux")
    app = DitApplication(xlabs, e, 0.5, [1.0, 0.0, 2.0], sigma_start=0.8, sigma_end=0.2, heads=2)
    on, late = {"sigmas": torch.tensor([0.5])}, {"sigmas": torch.tensor([0.1])}
    assert [app.block_weight(j, on) for j in range(3)] == [0.5, 0.0, 1.0]
    assert [app.block_weight(j, late) for j in range(3)] == [0.0, 0.0, 0.0]
    k, v = app.flux_kv(0, [0, 1], torch.device("cpu"), torch.float32)
    assert k.shape == (2, 2, 4, 16) and not torch.equal(k[0], k[1])  # cond and uncond rows differ


def test_a_patch_without_active_entries_calls_the_original_block(xlabs):
    e = DitEmbeds(torch.randn(1, 768), torch.zeros(1, 768), "xlabs-flux")
    app = DitApplication(xlabs, e, 0.0, [1.0, 1.0, 1.0], heads=2)
    ran = []
    patch = add_to(None, lambda *a: ran.append("recomputed"), object(), (app, 0))
    out = patch({"img": 1, "transformer_options": {}}, {"original_block": lambda args: {"img": args["img"] + 1}})
    assert out == {"img": 2} and ran == []
    assert isinstance(add_to(patch, patch.run, patch.block, (app, 1)), BlockPatch)
    assert len(add_to(patch, patch.run, patch.block, (app, 1)).entries) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moving_the_patch_leaves_the_adapter_and_embeds_as_given(xlabs, dtype):
    """ComfyUI calls patch.to(device) and patch.to(model dtype) at every load; the adapter and embeds the patch was
    given are shared with other nodes and later prompts, so they keep their dtype, device and values; the K/V come
    in the call's dtype, equal to the fp32 ones rounded once."""
    e = DitEmbeds(torch.randn(1, 768), torch.zeros(1, 768), "xlabs-flux")
    app = DitApplication(xlabs, e, 0.5, [1.0, 1.0, 1.0], heads=2)
    given = [t.clone() for t in (*xlabs.state_dict().values(), e.cond, e.uncond)]
    cpu = torch.device("cpu")
    ref, _ = app.flux_kv(0, [0, 1], cpu, torch.float32)
    app.to(cpu).to(dtype)
    k, _ = app.flux_kv(0, [0, 1], cpu, dtype)
    app.to("meta")  # a device move drops the cached K/V of the other device
    assert not any(key[1] == cpu for key in app._kv)
    app.to(cpu)
    k_again, _ = app.flux_kv(0, [0, 1], cpu, dtype)
    assert k.dtype == dtype and torch.equal(k, ref.to(dtype)) and torch.equal(k_again, k)
    now = [*xlabs.state_dict().values(), e.cond, e.uncond]
    assert all(a.dtype == b.dtype and a.device == b.device and torch.equal(a, b) for a, b in zip(given, now))
