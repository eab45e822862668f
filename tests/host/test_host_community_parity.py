"""Our apply nodes against the community pack's (cubiq/ComfyUI_IPAdapter_plus, run in-process as an oracle from
IPADAPTER_PLUS_PATH): same adapter file, same CLIP outputs, same noise prediction. Both of its node families:

- its Advanced and Embeds nodes (a weight_type, no boost input) against IPAKitApply with its defaults and the same
  weight, weight type and embeds_scaling: every weight type, SD1.5 and SDXL, plain and plus, each embeds_scaling
  on several types (the Advanced node on SDXL: linear and the types whose defaults differ between the families);
- its dedicated nodes (Precise Style Transfer, Precise Composition, Style & Composition) against IPAKitApply with
  the inputs those nodes show (style_boost, composition_boost, weight_composition), and its Style & Composition
  node with two images against ours;

and the two packs' adapters on one model, in either order. The community nodes are called as ComfyUI calls them
(their declared inputs only); their image encoder (`encode_image_masked`) is replaced by a lookup that returns the
CLIP outputs our side gets, so the CLIP vision model is not under test here.

The community pack registers its middle block under ("middle", 1), a key ComfyUI never calls (its issues #806,
#810); these tests correct that key in memory to ("middle", 0) so that its middle layer acts like ours.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from ipa_train import save_adapter
from ipa_train.adapter.attention import EMBEDS_SCALING
from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
from ipa_train.adapter.weight_types import WEIGHT_TYPES
from ipa_train.hosts.comfy.unet import Attn2Replace, encode_embeds

from ..factories import random_adapter
from .conftest import tiny_comfy_model
from .test_host_patch import _eps

# fp32 on both sides; the two packs order the same float operations differently (our K/V are projected once per
# apply, theirs per call; the weight enters before or after the attention), which moved eps (magnitude ~1) by at
# most 3.7e-6 on SD1.5 and 6.2e-6 on SDXL (70 layers) over all cases here. A wrong layer multiplier or route moves it by > 1e-3 (every case is checked to
# differ from the unpatched model by more than that).
ATOL = 2e-5
WEIGHT, SECOND = 0.8, 0.6
# The types whose defaults differ between the community pack's two node families: its Advanced /
# Embeds nodes use boost = weight and weight_composition = 1.0; its dedicated nodes show style_boost 1.0,
# composition_boost 0.0 and weight_composition 1.0.
FAMILY_DEFAULTS_DIFFER = ("style and composition", "style transfer precise", "composition precise")
IMAGE = torch.full((1, 224, 224, 3), 0.5)  # the reference image handed to the community nodes
IMAGE_COMPOSITION = torch.full((1, 224, 224, 3), 0.25)
ZERO_IMAGE = torch.zeros(1, 224, 224, 3)  # what its nodes encode for the unconditional side of a plus adapter
CLIP = object()  # its nodes only check that a CLIP vision model is given; the encoder below never reads it


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


class _Encoded(dict):
    """The community pack's encoder output: a dict read by attribute."""

    __getattr__ = dict.__getitem__


@pytest.fixture
def community(middle_fixed, monkeypatch):
    """(the community module with the middle key fixed, images): its nodes encode an image by looking it up in the
    list `images` of (image, CLIP output); the one tensor serves as image_embeds and as penultimate states."""
    images: list[tuple[torch.Tensor, torch.Tensor]] = []

    def encode_image_masked(clip_vision, image, *args, **kwargs):
        for known, out in images:
            if known.shape == image.shape and torch.equal(known, image):
                return _Encoded(image_embeds=out, penultimate_hidden_states=out)
        raise AssertionError(f"the community node encoded an image the test did not give it: {tuple(image.shape)}")

    monkeypatch.setattr(middle_fixed, "encode_image_masked", encode_image_masked)
    return middle_fixed, images


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_comfy_model(comfy, "sd15")


@pytest.fixture(scope="module")
def sdxl(comfy):
    """The SDXL-layout model, its class made a subclass of ComfyUI's SDXL model: the community pack's Style &
    Composition node refuses other model classes. SDXL differs from BaseModel only in encode_adm, never called here."""
    import comfy.model_base

    patcher = tiny_comfy_model(comfy, "sdxl")
    patcher.model.__class__ = type("TinySDXL", (comfy.model_base.SDXL,), {})
    return patcher


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
    """The community pack's ipadapter_execute on CLIP outputs (what its nodes call)."""
    return plus.ipadapter_execute(patcher.clone(), adapter_dict, None, pos_embed=cond, neg_embed=uncond, weight=weight,
                                  weight_type=weight_type, embeds_scaling=scaling, **kw)[0]


def _ours(apply_mod, patcher, adapter, cond, uncond, weight_type="linear", scaling="V only", weight=WEIGHT, second=None):
    embeds = encode_embeds(adapter, cond, uncond)
    return apply_mod.apply(patcher, adapter, embeds, "scaled", weight, weight_type=weight_type, embeds_scaling=scaling,
                           second=second)


def _declared_defaults(node_cls) -> dict:
    """A V3 node's widget defaults, as a fresh node in the editor shows them."""
    return {i.id: i.default for i in node_cls.define_schema().inputs if getattr(i, "default", None) is not None}


def _kit(apply_mod, patcher, adapter, cond, uncond, **widgets):
    """IPAKitApply as a fresh node: its declared defaults, then the widgets a user set."""
    embeds = encode_embeds(adapter, cond, uncond)
    inputs = {**_declared_defaults(apply_mod.IPAKitApply), **widgets}
    return apply_mod.IPAKitApply.execute(patcher, adapter, embeds, **inputs).result[0]


def _node(plus, name, patcher, adapter_dict, **inputs):
    """One of the community pack's apply nodes, called as ComfyUI calls it: its declared inputs only."""
    cls = getattr(plus, name)
    declared = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
    assert set(inputs) <= set(declared), f"{name} has no input {set(inputs) - set(declared)}"
    return getattr(cls(), cls.FUNCTION)(patcher, adapter_dict, **inputs)[0]


def _community_default(plus, name, widget):
    return getattr(plus, name).INPUT_TYPES()["required"][widget][1]["default"]


def _family_case(request, family, projection, tmp_path, cubiq, images, seed=1):
    """(model, ours, theirs, cond, uncond, (x, ctx, t)) with the encoder lookup filled: the reference image -> cond,
    the all-zero image (plus adapters' unconditional side) -> uncond. A plain adapter's unconditional side is zeros
    (what the community nodes use without a negative image)."""
    patcher = request.getfixturevalue(family)
    context = 768 if family == "sd15" else 2048
    ours, theirs, cond, uncond = _case(patcher, projection, tmp_path, cubiq, seed=seed, context=context)
    if projection == "plain":
        uncond = torch.zeros_like(cond)
    images += [(IMAGE, cond), (ZERO_IMAGE, uncond)]
    return patcher, ours, theirs, cond, uncond, _inputs(context)


def _turn(weight_type: str) -> str:
    """The embeds_scaling a weight type is checked on when not on all of them: each scaling in turn."""
    return EMBEDS_SCALING[WEIGHT_TYPES.index(weight_type) % len(EMBEDS_SCALING)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_advanced_and_embeds_nodes_equal_kit_apply_with_its_defaults(request, kit, community, cubiq, tmp_path, family,
                                                                      projection):
    """A workflow moved from the community pack's Advanced or Embeds node to IPAKitApply (same file, image, weight,
    weight type, embeds_scaling; nothing else set) predicts the same noise. Both nodes, every weight type, each on
    one embeds_scaling in turn (SD1.5) or V only (SDXL); linear and the types whose defaults differ between the
    community pack's node families also on every scaling (SD1.5; SDXL: linear), Embeds node, and on the Advanced node
    (which differs from the Embeds node only in how the CLIP outputs arrive)."""
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    plus, images = community
    patcher, ours, theirs, cond, uncond, (x, ctx, t) = _family_case(request, family, projection, tmp_path, cubiq, images)
    base = _eps(patcher, x, t, ctx, [1, 0])
    if family == "sd15":  # every type on one scaling (in turn); linear and the types whose defaults differ on all
        cases = [(wt, sc) for wt in WEIGHT_TYPES for sc in EMBEDS_SCALING
                 if sc == _turn(wt) or wt == "linear" or wt in FAMILY_DEFAULTS_DIFFER]
    else:
        cases = [(wt, "V only") for wt in WEIGHT_TYPES] + [("linear", sc) for sc in EMBEDS_SCALING[1:]]
    worst, advanced_types = 0.0, set()
    for weight_type, scaling in cases:
        kit_eps = _eps(_kit(apply_mod, patcher, ours, cond, uncond, weight=WEIGHT, weight_type=weight_type,
                            embeds_scaling=scaling), x, t, ctx, [1, 0])
        assert (kit_eps - base).abs().max() > 1e-3, f"{weight_type} / {scaling}: the adapter changed nothing"
        shown = dict(weight=WEIGHT, weight_type=weight_type, start_at=0.0, end_at=1.0, embeds_scaling=scaling)
        nodes = {"IPAdapterEmbeds": dict(shown, pos_embed=cond, neg_embed=uncond)}
        if weight_type in FAMILY_DEFAULTS_DIFFER or (scaling == _turn(weight_type) if family == "sd15"
                                                     else weight_type == "linear"):
            nodes["IPAdapterAdvanced"] = dict(shown, image=IMAGE, combine_embeds="concat", clip_vision=CLIP)
            advanced_types.add(weight_type)
        for name, inputs in nodes.items():
            theirs_eps = _eps(_node(plus, name, patcher, theirs, **inputs), x, t, ctx, [1, 0])
            gap = (kit_eps - theirs_eps).abs().max().item()
            worst = max(worst, gap)
            assert gap <= ATOL, f"{name} {weight_type} / {scaling}: max |eps ours - eps community| = {gap:.2e}"
    assert advanced_types == (set(WEIGHT_TYPES) if family == "sd15" else {"linear", *FAMILY_DEFAULTS_DIFFER})
    print(f"{family} {projection}: {len(cases)} cases, worst max |eps difference| = {worst:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_dedicated_nodes_are_reproduced_with_the_inputs_they_show(request, kit, community, cubiq, tmp_path, family,
                                                                   projection):
    """Its Precise Style Transfer / Precise Composition nodes (their default boost and another) and, on SDXL, its
    Style & Composition node (one image for both; SD1.5 it refuses, so there its weight_composition is given to
    the Advanced path) equal IPAKitApply given the same style_boost / composition_boost / weight_composition. The
    precise nodes' default boosts differ from the Advanced node's (the weight), so IPAKitApply's defaults must not
    give their picture: checked too."""
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    plus, images = community
    patcher, ours, theirs, cond, uncond, (x, ctx, t) = _family_case(request, family, projection, tmp_path, cubiq, images)
    style_boost = _community_default(plus, "IPAdapterPreciseStyleTransfer", "style_boost")
    composition_boost = _community_default(plus, "IPAdapterPreciseComposition", "composition_boost")
    weight_composition = _community_default(plus, "IPAdapterStyleComposition", "weight_composition")
    assert (style_boost, composition_boost, weight_composition) == (1.0, 0.0, 1.0)
    shown = dict(weight=WEIGHT, combine_embeds="concat", start_at=0.0, end_at=1.0, image=IMAGE, clip_vision=CLIP)
    # (community node, its inputs, IPAKitApply's widgets, whether this is that node's default)
    cases = []
    for boost, scaling in ((style_boost, "V only"), (2.0, "K+V")):
        cases.append(("IPAdapterPreciseStyleTransfer", dict(shown, style_boost=boost, embeds_scaling=scaling),
                      dict(weight_type="style transfer precise", style_boost=boost, embeds_scaling=scaling),
                      boost == style_boost))
    for boost, scaling in ((composition_boost, "V only"), (0.5, "K+V w/ C penalty")):
        cases.append(("IPAdapterPreciseComposition", dict(shown, composition_boost=boost, embeds_scaling=scaling),
                      dict(weight_type="composition precise", composition_boost=boost, embeds_scaling=scaling),
                      boost == composition_boost))
    if family == "sdxl":
        for wc, expand, scaling in ((weight_composition, False, "V only"), (SECOND, False, "K+V"),
                                    (SECOND, True, "K+mean(V) w/ C penalty")):
            inputs = dict(image_style=IMAGE, image_composition=IMAGE, weight_style=WEIGHT, weight_composition=wc,
                          expand_style=expand, combine_embeds="average", start_at=0.0, end_at=1.0,
                          embeds_scaling=scaling, clip_vision=CLIP)
            cases.append(("IPAdapterStyleComposition", inputs,
                          dict(weight_type="strong style and composition" if expand else "style and composition",
                               weight_composition=wc, embeds_scaling=scaling), wc == weight_composition))
    else:
        with pytest.raises(Exception, match="only available for SDXL"):
            _node(plus, "IPAdapterStyleComposition", patcher, theirs, image_style=IMAGE, image_composition=IMAGE,
                  weight_style=WEIGHT, weight_composition=SECOND, expand_style=False, combine_embeds="average",
                  start_at=0.0, end_at=1.0, embeds_scaling="V only", clip_vision=CLIP)
    worst = 0.0
    for name, inputs, widgets, is_default in cases:
        theirs_eps = _eps(_node(plus, name, patcher, theirs, **inputs), x, t, ctx, [1, 0])
        kit_eps = _eps(_kit(apply_mod, patcher, ours, cond, uncond, weight=WEIGHT, **widgets), x, t, ctx, [1, 0])
        gap = (kit_eps - theirs_eps).abs().max().item()
        worst = max(worst, gap)
        assert gap <= ATOL, f"{name} {inputs}: max |eps ours - eps community| = {gap:.2e}"
        if is_default and name.startswith("IPAdapterPrecise"):
            fresh = _kit(apply_mod, patcher, ours, cond, uncond, weight=WEIGHT, weight_type=widgets["weight_type"],
                         embeds_scaling=widgets["embeds_scaling"])
            assert (_eps(fresh, x, t, ctx, [1, 0]) - theirs_eps).abs().max() > 1e-3, \
                f"{name}: its default boost should differ from the Advanced node's (the weight)"
    if family == "sd15":  # the style-and-composition types with weight_composition, through the Advanced path
        for weight_type in ("style and composition", "strong style and composition"):
            theirs_eps = _eps(_theirs(plus, patcher, theirs, cond, uncond, weight_type, "K+V", weight_composition=SECOND),
                              x, t, ctx, [1, 0])
            kit_eps = _eps(_kit(apply_mod, patcher, ours, cond, uncond, weight=WEIGHT, weight_type=weight_type,
                                embeds_scaling="K+V", weight_composition=SECOND), x, t, ctx, [1, 0])
            gap = (kit_eps - theirs_eps).abs().max().item()
            worst = max(worst, gap)
            assert gap <= ATOL, f"{weight_type} weight_composition={SECOND}: max |eps difference| = {gap:.2e}"
    print(f"{family} {projection}: worst max |eps difference| = {worst:.2e}")


@pytest.mark.slow
def test_style_composition_node_with_two_images_matches_community_node(kit, community, cubiq, sdxl, tmp_path):
    """Our Style & Composition node and the community pack's (SDXL, plain adapter, two different images) with the
    same inputs: their defaults (weights 1.0 / 1.0, expand_style off) and others."""
    from .test_host_style_composition import FakeClipVision

    sc_mod = importlib.import_module(kit.__name__ + ".nodes.style_composition")
    plus, images = community
    ours, theirs, _, _ = _case(sdxl, "plain", tmp_path, cubiq, seed=5, context=2048)
    clip = FakeClipVision()
    images += [(img, clip.encode_image(img)["image_embeds"]) for img in (IMAGE, IMAGE_COMPOSITION)]
    x, ctx, t = _inputs(2048)
    defaults = _declared_defaults(sc_mod.IPAKitApplyStyleComposition)
    community_defaults = {k: _community_default(plus, "IPAdapterStyleComposition", k)
                          for k in ("weight_style", "weight_composition", "expand_style", "combine_embeds")}
    assert {k: defaults[k] for k in community_defaults} == community_defaults
    for changes in ({}, {"weight_style": WEIGHT, "weight_composition": SECOND, "expand_style": True, "embeds_scaling": "K+V"}):
        inputs = {**defaults, **changes}
        node = sc_mod.IPAKitApplyStyleComposition.execute(sdxl, ours, clip, IMAGE, IMAGE_COMPOSITION, **inputs).result[0]
        shown = {k: inputs[k] for k in ("weight_style", "weight_composition", "expand_style", "combine_embeds",
                                        "start_at", "end_at", "embeds_scaling")}
        theirs_model = _node(plus, "IPAdapterStyleComposition", sdxl, theirs, image_style=IMAGE,
                             image_composition=IMAGE_COMPOSITION, clip_vision=CLIP, **shown)
        gap = (_eps(node, x, t, ctx, [1, 0]) - _eps(theirs_model, x, t, ctx, [1, 0])).abs().max().item()
        assert gap <= ATOL, f"{changes}: max |eps ours - eps community| = {gap:.2e}"
        assert (_eps(node, x, t, ctx, [1, 0]) - _eps(sdxl, x, t, ctx, [1, 0])).abs().max() > 1e-3


def test_apply_nodes_run_with_their_declared_defaults(kit):
    """An API prompt that leaves an optional input out gets the same value as a fresh node in the editor."""
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    sc_mod = importlib.import_module(kit.__name__ + ".nodes.style_composition")
    for cls in (apply_mod.IPAKitApply, apply_mod.IPAKitApplySimple, sc_mod.IPAKitApplyStyleComposition):
        params = inspect.signature(cls.execute).parameters
        for name, default in _declared_defaults(cls).items():
            assert params[name].default == default, f"{cls.__name__}.{name}: execute {params[name].default!r}, declared {default!r}"


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
