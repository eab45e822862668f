"""Host-free parts of the Flux / SD3.5 apply controls: masks over the image tokens, Kontext rows, fused mode,
several references, and the per-call wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from ipa_train.adapter.dit_attention import flux_image_attention, flux_image_kv
from ipa_train.adapter.dit_formats import detect_dit_config
from ipa_train.adapter.dit_modules import build_dit_adapter
from ipa_train.errors import EncoderMismatchError, IPAKitError
from ipa_train.hosts.comfy.dit import DitApplication, DitEmbeds
from ipa_train.hosts.comfy.dit_call import CALL_KEY, CallInfo, DitCallWrapper, check_mask, fuse_rows, row_factor

from . import dit_factories as f

CPU, F32 = torch.device("cpu"), torch.float32


def _adapter(state):
    flat = f.flat(state)
    return build_dit_adapter(detect_dit_config(flat, "x"), flat, "x").eval()


@pytest.fixture(scope="module")
def instantx():
    return _adapter(f.instantx_flux(hidden=32, ctx=24, tokens=4, blocks=3, seed=1))


def _feats(n, seed=0):
    return torch.randn(n, 1152, generator=torch.Generator().manual_seed(seed))


def test_mask_rows_follow_the_packed_token_grid():
    mask = torch.zeros(1, 64, 48)
    mask[:, :, :24] = 1.0  # left half of the picture
    factor = row_factor(mask, CallInfo((4, 3), 5), rows=12, lead=0, batch=2, device=CPU, dtype=F32)
    # tokens are row-major over the (h, w) grid, as Flux packs its 2x2 latent patches
    expect = torch.nn.functional.interpolate(mask[None], size=(4, 3), mode="bilinear", align_corners=False).flatten()
    assert factor.shape == (2, 12, 1) and torch.equal(factor[0, :, 0], expect)
    assert factor[0, 0, 0] == 1 and factor[0, 2, 0] == 0  # first column white, last black


def test_single_block_prompt_rows_get_the_mask_mean_and_reference_latents_zero():
    mask = torch.rand(1, 32, 32)
    info = CallInfo((2, 2), 3)
    factor = row_factor(mask, info, rows=3 + 4 + 6, lead=3, batch=1, device=CPU, dtype=F32)[0, :, 0]
    image = row_factor(mask, info, rows=4, lead=0, batch=1, device=CPU, dtype=F32)[0, :, 0]
    assert torch.allclose(factor[:3], image.mean().expand(3)) and torch.equal(factor[3:7], image)
    assert torch.equal(factor[7:], torch.zeros(6))
    # no mask: only appended reference latents change anything
    assert row_factor(None, info, rows=3 + 4, lead=3, batch=1, device=CPU, dtype=F32) is None
    kontext = row_factor(None, info, rows=4 + 6, lead=0, batch=1, device=CPU, dtype=F32)[0, :, 0]
    assert kontext.tolist() == [1.0] * 4 + [0.0] * 6
    assert torch.equal(row_factor(torch.ones(1, 8, 8), info, rows=4, lead=0, batch=1, device=CPU, dtype=F32),
                       torch.ones(1, 4, 1))


def test_a_mask_batch_is_refused_naming_the_family():
    assert check_mask(torch.ones(8, 8), "Flux").shape == (1, 8, 8)
    with pytest.raises(IPAKitError, match="Flux models take one mask") as e:
        check_mask(torch.ones(3, 8, 8), "Flux")
    assert "\n" not in str(e.value)


def test_parameter_free_fusion_at_lambda_0_and_1():
    g = torch.Generator().manual_seed(2)
    tokens, text = torch.randn(2, 4, 24, generator=g), torch.randn(2, 7, 24, generator=g)
    labels = [0, 1]
    assert torch.equal(fuse_rows(tokens, text, labels, 1.0), tokens)
    zero = fuse_rows(tokens, text, labels, 0.0)
    w = torch.softmax(tokens[0] @ text[0].T / math.sqrt(24), dim=-1)
    assert torch.allclose(zero[0], w @ text[0], atol=1e-6)  # cond row: its attention over its own prompt
    assert torch.equal(zero[1], tokens[1])  # uncond row unchanged
    with pytest.raises(EncoderMismatchError, match="prompt tokens are 16 wide") as e:
        fuse_rows(tokens, text[..., :16], labels, 0.5)
    assert "\n" not in str(e.value)


def test_fused_kv_of_a_call_are_the_kv_of_the_fused_tokens(instantx):
    embeds = DitEmbeds(_feats(1), torch.zeros(1, 1152), "instantx-flux")
    app = DitApplication(instantx, embeds, 1.0, [1.0] * 3, heads=2, mode="fused", fusion_lambda=0.3)
    scaled = DitApplication(instantx, embeds, 1.0, [1.0] * 3, heads=2, mode="fused", fusion_lambda=1.0)
    assert app.fused and not scaled.fused
    text = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(3))
    opts = {"cond_or_uncond": [0, 1]}
    info = CallInfo((2, 2), 6, {app.uid: app.fused_tokens(text, opts)})
    k, v = app.flux_kv(1, [0, 1], CPU, F32, info)
    with torch.no_grad():
        tokens = instantx.image_proj(embeds.cond)
        plain = instantx.image_proj(embeds.uncond)
        from ipa_train.adapter.modules import TextImageFusion

        fused = TextImageFusion(24, trainable=False)(tokens, text[:1], 0.3)
        k_ref, v_ref = flux_image_kv(instantx.blocks[1], torch.cat([fused, plain]), 2, "instantx-flux")
    assert torch.allclose(k, k_ref, atol=1e-6) and torch.allclose(v, v_ref, atol=1e-6)
    k_s, _ = scaled.flux_kv(1, [0, 1], CPU, F32, info)  # another application's fused tokens are not its own
    assert torch.allclose(k_s[1], k_ref[1], atol=1e-6) and not torch.allclose(k_s[0], k_ref[0], atol=1e-3)


def test_a_mask_of_zeros_turns_every_block_off(instantx):
    embeds = DitEmbeds(_feats(1), torch.zeros(1, 1152), "instantx-flux")
    app = DitApplication(instantx, embeds, 1.0, [1.0] * 3, heads=2, mask=torch.zeros(1, 8, 8))
    assert [app.block_weight(j, {}) for j in range(3)] == [0.0] * 3


def test_several_references_under_cfg(instantx):
    """Concat of N references against the one uncond row: both sides get N * T tokens, so a CFG batch (cond and
    uncond rows together) runs; two identical references attend as one (duplicated keys leave softmax unchanged)."""
    one, two = _feats(1, 4), _feats(1, 4).expand(2, -1)
    q = torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(5))
    out = {}
    for name, cond, method in (("one", one, "concat"), ("two", two, "concat"), ("avg", two, "average")):
        app = DitApplication(instantx, DitEmbeds(cond, torch.zeros(1, 1152), "instantx-flux", method), 1.0, [1.0] * 3,
                             heads=2)
        k, v = app.flux_kv(0, [0, 1], CPU, F32)
        assert k.shape[2] == (8 if name == "two" else 4)
        out[name] = flux_image_attention(q, k, v)
    assert torch.allclose(out["two"], out["one"], atol=1e-5)
    assert torch.allclose(out["avg"], out["one"], atol=1e-6)


def test_the_call_wrapper_records_grid_prompt_and_fused_tokens(instantx):
    embeds = DitEmbeds(_feats(1), torch.zeros(1, 1152), "instantx-flux")
    app = DitApplication(instantx, embeds, 1.0, [1.0] * 3, heads=2, mode="fused", fusion_lambda=0.5)
    seen = {}

    def executor(x, t, c_concat, c_crossattn, control, opts, **kwargs):
        seen.update(opts=opts, kwargs=kwargs)
        return x

    given = {"cond_or_uncond": [0, 1]}
    x, text = torch.zeros(2, 16, 7, 10), torch.randn(2, 6, 24)
    DitCallWrapper(app, 2)(executor, x, torch.ones(2), None, text, None, given, ref_latents=[1])
    info = seen["opts"][CALL_KEY]
    assert info.grid == (4, 5) and info.text_len == 6 and seen["kwargs"] == {"ref_latents": [1]}
    assert info.fused[app.uid].shape == (2, 4, 24) and CALL_KEY not in given


def test_flux2_and_chroma_modulation_are_refused_by_name():
    from types import SimpleNamespace

    from ipa_train.errors import BaseModelMismatchError
    from ipa_train.hosts.comfy.flux import check_flux_model, run_double

    block = SimpleNamespace(hidden_size=32, modulation=False)
    dm = SimpleNamespace(double_blocks=[block], single_blocks=[], params=SimpleNamespace(global_modulation=True))
    with pytest.raises(BaseModelMismatchError, match="Flux.2 / Chroma") as e:
        check_flux_model("xlabs-flux", 32, 1, dm, "ip_adapter.safetensors")
    assert "\n" not in str(e.value) and "ip_adapter.safetensors" in str(e.value)
    # a modulation tuple reaching a block patch (the model changed after the apply): one line, not a traceback
    with pytest.raises(IPAKitError, match="shared tuple \\(Flux.2 / Chroma\\)"):
        run_double(block, [], {"img": None, "txt": None, "vec": (torch.zeros(1), torch.zeros(1)), "pe": None}, {})


def _app(instantx, weight=1.0):
    return DitApplication(instantx, DitEmbeds(_feats(1), torch.zeros(1, 1152), "instantx-flux"), weight, [1.0] * 3,
                          heads=2)


def test_a_base_patch_that_ignores_the_block_it_is_given_still_gets_ours(instantx):
    from ipa_train.hosts.comfy.dit import add_to

    def plain(args):  # ComfyUI's Flux blocks add into their inputs in place
        return {"img": args["img"].mul_(2)}

    def ours_run(block, active, args, extra):
        return {"img": args["img"] ** 2 * 2 + 10 * sum(w for _, _, w in active)}

    def peer(args, extra):  # recomputes the block itself, as the InstantX SD3 pack does, in place
        return {"img": args["img"].mul_(2).add_(1)}

    args = {"img": torch.ones(1, 2), "transformer_options": {}}
    patch = add_to(peer, ours_run, object(), (_app(instantx, 0.5), 0))
    # the peer's 3, plus ours' change to the block on the block's own input (2 + 5 against 2)
    assert torch.equal(patch(args, {"original_block": plain})["img"], torch.full((1, 2), 3.0 + 5))
    args = {"img": torch.ones(1, 2), "transformer_options": {}}
    off = add_to(peer, ours_run, object(), (_app(instantx, 0.0), 0))
    assert torch.equal(off(args, {"original_block": plain})["img"], torch.full((1, 2), 3.0))


def test_ours_are_put_back_over_a_patch_registered_after_them(instantx):
    from ipa_train.hosts.comfy.dit import BlockPatch, add_to, restorer

    app = _app(instantx)
    block = object()
    ours = {("double_block", 0): add_to(None, "run", block, (app, 0))}
    restore = restorer(app, ours)
    assert restore(dict(ours)) is None  # all there: nothing to do
    peer = object()
    fixed = restore({("double_block", 0): peer, ("double_block", 1): "other"})
    patch = fixed[("double_block", 0)]
    assert isinstance(patch, BlockPatch) and patch.base is peer and patch.holds(app)
    assert fixed[("double_block", 1)] == "other"


def test_one_adapter_block_runs_once_per_call(instantx):
    """A pack that wraps our patch inside its own, with ours put back over it, must not apply ours twice."""
    from ipa_train.hosts.comfy.dit import add_to

    runs = []
    inner = add_to(None, lambda block, active, args, extra: runs.append(1) or {"img": args["img"] + 1}, object(),
                   (_app(instantx), 0))

    def peer(args, extra):  # calls the patch it found (ours) and the block it is given
        return extra["original_block"]({**args, **inner(args, extra)})

    outer = add_to(peer, inner.run, inner.block, inner.entries[0])
    args = {"img": torch.zeros(1), "transformer_options": {CALL_KEY: CallInfo((1, 1), 0)}}
    out = outer(args, {"original_block": lambda a: {"img": a["img"]}})
    assert runs == [1] and out["img"].item() == 1.0
