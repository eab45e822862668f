"""Our apply node against the community pack's (cubiq/ComfyUI_IPAdapter_plus, run in-process as an oracle from
IPADAPTER_PLUS_PATH): same adapter file, same CLIP outputs, same noise prediction for every weight type and every
embeds_scaling mode; and the two packs' adapters on one model, in either order.

The community pack registers its middle block under ("middle", 1), a key ComfyUI never calls (its issues #806,
#810); these tests correct that key in memory to ("middle", 0) so that its middle layer acts like ours.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ipa_train import save_adapter
from ipa_train.adapter.attention import EMBEDS_SCALING
from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
from ipa_train.adapter.weight_types import WEIGHT_TYPES
from ipa_train.hosts.comfy_patch import Attn2Replace, encode_embeds

from ..factories import random_adapter
from .conftest import tiny_comfy_model
from .test_host_patch import _eps

# fp32 on both sides; the two packs order the same float operations differently (our K/V are projected once per
# apply, theirs per call; the weight enters before or after the attention), which moved eps (magnitude ~1) by at
# most 4.1e-6 over all cases here. A wrong layer multiplier or route moves it by > 1e-3 (every case is checked to
# differ from the unpatched model by more than that).
ATOL = 2e-5
WEIGHT, SECOND = 0.8, 0.6


@pytest.fixture
def middle_fixed(cubiq):
    """The community pack's middle-block key corrected in memory to the one ComfyUI calls."""
    _, plus = cubiq
    original = plus.set_model_patch_replace

    def fixed(model, patch_kwargs, key):
        if key[0] == "middle":
            key = ("middle", 0, *key[2:])
        return original(model, patch_kwargs, key)

    plus.set_model_patch_replace = fixed
    yield plus
    plus.set_model_patch_replace = original


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_comfy_model(comfy, "sd15")


def _layer_hidden(patcher):
    from ipa_train.adapter.layout import groups_from_blocks, sites_from_groups

    unet = patcher.get_model_object("diffusion_model")
    return tuple(s.hidden for s in sites_from_groups(groups_from_blocks(unet.input_blocks, unet.middle_block, unet.output_blocks)))


def _case(patcher, projection, tmp_path, cubiq, seed=1, context=768):
    """Our adapter, the same file loaded by the community pack, and CLIP outputs (cond, uncond)."""
    utils, _ = cubiq
    cfg = AdapterConfig(projection=projection, num_tokens=4 if projection == "plain" else 16,
                        clip_embedding_dim=1024 if projection == "plain" else 1280, cross_attention_dim=context,
                        layer_hidden_sizes=_layer_hidden(patcher),
                        clip_output="image_embeds" if projection == "plain" else "penultimate",
                        resampler=ResamplerConfig(context if context == 768 else 1280, 4, 12 if context == 768 else 20, 64, 4)
                        if projection == "plus" else None)
    ours = random_adapter(cfg, seed=seed)
    theirs = utils.ipadapter_model_loader(str(save_adapter(ours, tmp_path / f"a{seed}-{projection}.safetensors")))
    g = torch.Generator().manual_seed(seed + 10)
    shape = (1, 1024) if projection == "plain" else (1, 257, 1280)
    return ours, theirs, torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def _inputs(context=768, seed=3):
    g = torch.Generator().manual_seed(seed)
    # CFG batch of 4: two uncond rows, then two cond rows
    return torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 77, context, generator=g), torch.tensor([400, 400, 400, 400])


def _theirs(plus, patcher, adapter_dict, cond, uncond, weight_type="linear", scaling="V only", weight=WEIGHT, **kw):
    return plus.ipadapter_execute(patcher.clone(), adapter_dict, None, pos_embed=cond, neg_embed=uncond, weight=weight,
                                  weight_composition=SECOND, weight_type=weight_type, embeds_scaling=scaling, **kw)[0]


def _ours(apply_mod, patcher, adapter, cond, uncond, weight_type="linear", scaling="V only", weight=WEIGHT, second=None):
    if second is None and weight_type in ("style and composition", "strong style and composition"):
        second = SECOND
    embeds = encode_embeds(adapter, cond, uncond)
    return apply_mod.apply(patcher, adapter, embeds, "scaled", weight, weight_type=weight_type, embeds_scaling=scaling,
                           second=second)


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_every_weight_type_and_scaling_matches_community_pack(sd15, kit, middle_fixed, cubiq, tmp_path, projection):
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    plus = middle_fixed
    ours_adapter, theirs_dict, cond, uncond = _case(sd15, projection, tmp_path, cubiq)
    x, ctx, t = _inputs()
    base = _eps(sd15, x, t, ctx, [1, 0])
    cases = [(wt, sc, {}) for wt in WEIGHT_TYPES for sc in EMBEDS_SCALING]
    # the precise types with an explicit boost (the community pack's precise nodes)
    cases += [("style transfer precise", "V only", {"style_boost": 2.0}), ("composition precise", "K+V", {"composition_boost": 0.5})]
    worst = 0.0
    for weight_type, scaling, boost in cases:
        theirs = _eps(_theirs(plus, sd15, theirs_dict, cond, uncond, weight_type, scaling, **boost), x, t, ctx, [1, 0])
        second = next(iter(boost.values()), None)
        ours = _eps(_ours(apply_mod, sd15, ours_adapter, cond, uncond, weight_type, scaling, second=second), x, t, ctx, [1, 0])
        gap = (ours - theirs).abs().max().item()
        worst = max(worst, gap)
        assert (ours - base).abs().max() > 1e-3, f"{weight_type} / {scaling}: the adapter changed nothing"
        assert gap <= ATOL, f"{weight_type} / {scaling} {boost}: max |eps ours - eps community| = {gap:.2e}"
    print(f"{projection}: {len(cases)} cases, worst max |eps difference| = {worst:.2e}")


def _two(apply_mod, plus, patcher, a, b, first):
    """Adapter A (plain) and B (plus) on one model. first: "community" = A by the community pack then B by ours;
    "ours" = B by ours then A by the community pack; "ours-ours-AB" / "ours-ours-BA" = both by ours."""
    (a_ours, a_theirs, a_c, a_u), (b_ours, _, b_c, b_u) = a, b
    if first == "community":
        return _ours(apply_mod, _theirs(plus, patcher, a_theirs, a_c, a_u, weight=0.7), b_ours, b_c, b_u, weight=0.5)
    if first == "ours":
        return _theirs(plus, _ours(apply_mod, patcher, b_ours, b_c, b_u, weight=0.5), a_theirs, a_c, a_u, weight=0.7)
    m = _ours(apply_mod, patcher, a_ours, a_c, a_u, weight=0.7)
    if first == "ours-ours-BA":
        m = _ours(apply_mod, patcher, b_ours, b_c, b_u, weight=0.5)
        return _ours(apply_mod, m, a_ours, a_c, a_u, weight=0.7)
    return _ours(apply_mod, m, b_ours, b_c, b_u, weight=0.5)


def test_side_by_side_with_community_pack_sd15(sd15, kit, middle_fixed, cubiq, tmp_path):
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    plus = middle_fixed
    a = _case(sd15, "plain", tmp_path, cubiq, seed=1)
    b = _case(sd15, "plus", tmp_path, cubiq, seed=2)
    x, ctx, t = _inputs()
    community_then_ours = _two(apply_mod, plus, sd15, a, b, "community")
    ours_then_community = _two(apply_mod, plus, sd15, a, b, "ours")
    # every layer holds both adapters under one key (SD1.5: the short keys both packs use)
    for m in (community_then_ours, ours_then_community):
        attn2 = m.model_options["transformer_options"]["patches_replace"]["attn2"]
        assert len(attn2) == 16 and all(isinstance(p, Attn2Replace) for p in attn2.values())
        assert all(len(p.entries) == 1 and (p.base is not None or len(p.community) == 1) for p in attn2.values())
    ab = _eps(_two(apply_mod, plus, sd15, a, b, "ours-ours-AB"), x, t, ctx, [0, 1])
    ba = _eps(_two(apply_mod, plus, sd15, a, b, "ours-ours-BA"), x, t, ctx, [0, 1])
    only_b = _eps(_ours(apply_mod, sd15, b[0], b[2], b[3], weight=0.5), x, t, ctx, [0, 1])
    torch.testing.assert_close(_eps(community_then_ours, x, t, ctx, [0, 1]), ab, rtol=0, atol=ATOL)
    torch.testing.assert_close(_eps(ours_then_community, x, t, ctx, [0, 1]), ba, rtol=0, atol=ATOL)
    assert (ab - only_b).abs().max() > 1e-3  # A really acts


def test_community_pack_after_ours_still_acts_without_the_key_correction(sd15, kit, cubiq, tmp_path):
    """Unpatched community pack: its adapter acts on its 15 layers next to ours (its middle key is its own bug)."""
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    _, plus = cubiq
    a = _case(sd15, "plain", tmp_path, cubiq, seed=1)
    b = _case(sd15, "plus", tmp_path, cubiq, seed=2)
    x, ctx, t = _inputs()
    m = _two(apply_mod, plus, sd15, a, b, "ours")
    attn2 = m.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert sum(len(p.community) for p in attn2.values() if isinstance(p, Attn2Replace)) == 15
    assert (_eps(m, x, t, ctx, [0, 1]) - _eps(_ours(apply_mod, sd15, b[0], b[2], b[3], weight=0.5), x, t, ctx, [0, 1])).abs().max() > 1e-3


@pytest.mark.slow
def test_side_by_side_with_community_pack_sdxl(comfy, kit, middle_fixed, cubiq, tmp_path):
    """SDXL (3-part keys): the community node applied after ours raised a TypeError before; now both act."""
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    plus = middle_fixed
    sdxl = tiny_comfy_model(comfy, "sdxl")
    a = _case(sdxl, "plain", tmp_path, cubiq, seed=1, context=2048)
    b = _case(sdxl, "plain", tmp_path, cubiq, seed=2, context=2048)
    x, ctx, t = _inputs(context=2048)
    ab = _eps(_two(apply_mod, plus, sdxl, a, b, "ours-ours-AB"), x, t, ctx, [0, 1])
    torch.testing.assert_close(_eps(_two(apply_mod, plus, sdxl, a, b, "community"), x, t, ctx, [0, 1]), ab, rtol=0, atol=ATOL)
    ba = _eps(_two(apply_mod, plus, sdxl, a, b, "ours-ours-BA"), x, t, ctx, [0, 1])
    torch.testing.assert_close(_eps(_two(apply_mod, plus, sdxl, a, b, "ours"), x, t, ctx, [0, 1]), ba, rtol=0, atol=ATOL)
