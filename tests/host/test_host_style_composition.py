"""The style & composition node and the simple node's new inputs, on tiny SD1.5 / SDXL-layout ComfyUI models.

Style and composition is the union of two layer sets the parity tests check one by one against the community
pack (style transfer / composition), so the node must equal those two applied in a chain, each with its image.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ipa_train.adapter.config import AdapterConfig
from ipa_train.hosts.comfy.unet import encode_embeds

from ..factories import random_adapter
from .conftest import tiny_comfy_model
from .test_host_community_parity import _inputs, _layer_hidden
from .test_host_patch import _eps


class FakeClipVision:
    """Stands in for ComfyUI's CLIP vision model: image_embeds [N, 1024] a fixed function of the pixels."""

    def __init__(self):
        self.proj = torch.randn(3 * 8 * 8, 1024, generator=torch.Generator().manual_seed(7))

    def encode_image(self, image, crop=True):
        small = torch.nn.functional.interpolate(image.permute(0, 3, 1, 2), size=(8, 8), mode="area")
        embeds = small.flatten(1) @ self.proj
        return {"image_embeds": embeds, "penultimate_hidden_states": embeds[:, None].expand(-1, 257, -1)}


@pytest.fixture(scope="module")
def nodes(kit):
    return (importlib.import_module(kit.__name__ + ".nodes.apply"),
            importlib.import_module(kit.__name__ + ".nodes.style_composition"))


@pytest.mark.parametrize("family", ["sd15", pytest.param("sdxl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("expand_style", [False, True])
def test_style_composition_node_is_style_layers_plus_composition_layers(comfy, nodes, family, expand_style):
    apply_mod, sc_mod = nodes
    model = tiny_comfy_model(comfy, family)
    context = 768 if family == "sd15" else 2048
    adapter = random_adapter(AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=1024,
                                           cross_attention_dim=context, layer_hidden_sizes=_layer_hidden(model)), seed=4)
    clip = FakeClipVision()
    g = torch.Generator().manual_seed(5)
    style_img, comp_img = torch.rand(2, 64, 64, 3, generator=g), torch.rand(1, 64, 64, 3, generator=g)
    x, ctx, t = _inputs(context)
    node = sc_mod.IPAKitApplyStyleComposition.execute(model, adapter, clip, style_img, comp_img, 0.9, 0.6, expand_style,
                                                      "average", 0.0, 1.0, "K+V").result[0]

    style = encode_embeds(adapter, clip.encode_image(style_img)["image_embeds"], torch.zeros(1, 1024), "average")
    comp = encode_embeds(adapter, clip.encode_image(comp_img)["image_embeds"], torch.zeros(1, 1024))
    style_type = "strong style transfer" if expand_style else "style transfer"
    comp_layers = {"sd15": "4:1, 5:1" if expand_style else "4:0.25, 5:1", "sdxl": "3:1"}[family]
    chain = apply_mod.apply(model, adapter, style, "scaled", 0.9, weight_type=style_type, embeds_scaling="K+V")
    chain = apply_mod.apply(chain, adapter, comp, "scaled", 0.6, layers="custom", layer_weights=comp_layers,
                            embeds_scaling="K+V")
    ours, ref = _eps(node, x, t, ctx, [0, 1]), _eps(chain, x, t, ctx, [0, 1])
    assert (ref - _eps(model, x, t, ctx, [0, 1])).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_simple_node_start_end_and_weight_type(comfy, nodes):
    apply_mod, _ = nodes
    model = tiny_comfy_model(comfy, "sd15")
    adapter = random_adapter(AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=1024,
                                           cross_attention_dim=768, layer_hidden_sizes=_layer_hidden(model)), seed=4)
    clip = FakeClipVision()
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    x, ctx, t = _inputs()
    simple = apply_mod.IPAKitApplySimple.execute(model, adapter, clip, image, 0.8, "scaled", 0.0, 1.0, "ease out").result[0]
    embeds = encode_embeds(adapter, clip.encode_image(image)["image_embeds"], torch.zeros(1, 1024))
    direct = apply_mod.apply(model, adapter, embeds, "scaled", 0.8, weight_type="ease out")
    torch.testing.assert_close(_eps(simple, x, t, ctx, [0, 1]), _eps(direct, x, t, ctx, [0, 1]), rtol=0, atol=0)
    # a step outside start_at..end_at is the unpatched model, exactly
    gated = apply_mod.IPAKitApplySimple.execute(model, adapter, clip, image, 0.8, "scaled", 0.9, 1.0, "ease out").result[0]
    assert torch.equal(_eps(gated, x, t, ctx, [0, 1]), _eps(model, x, t, ctx, [0, 1]))


def test_simple_node_has_the_apply_nodes_defaults(comfy, nodes):
    """The simple node shows no boost or weight_composition input: it uses IPAKitApply's defaults (the community
    pack's Advanced node: boost = weight, composition layers at 1.0)."""
    apply_mod, _ = nodes
    model = tiny_comfy_model(comfy, "sd15")
    adapter = random_adapter(AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=1024,
                                           cross_attention_dim=768, layer_hidden_sizes=_layer_hidden(model)), seed=4)
    clip = FakeClipVision()
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    embeds = encode_embeds(adapter, clip.encode_image(image)["image_embeds"], torch.zeros(1, 1024))
    x, ctx, t = _inputs()
    for weight_type in ("style and composition", "style transfer precise", "composition precise"):
        simple = apply_mod.IPAKitApplySimple.execute(model, adapter, clip, image, 0.8, "scaled", 0.0, 1.0, weight_type)
        full = apply_mod.IPAKitApply.execute(model, adapter, embeds, weight=0.8, weight_type=weight_type)
        torch.testing.assert_close(_eps(simple.result[0], x, t, ctx, [0, 1]), _eps(full.result[0], x, t, ctx, [0, 1]),
                                   rtol=0, atol=0)
