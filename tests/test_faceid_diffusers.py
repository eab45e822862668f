"""FaceID through our diffusers UNet patch equals diffusers' own FaceID path (its FaceID image projection and IP
processors), with the file's LoRA merged into the UNet by its diffusers names (diffusers itself loads that LoRA only
through PEFT, which the test environment may lack)."""

from __future__ import annotations

import pytest
import torch

from ipa_train.adapter.config import AdapterConfig
from ipa_train.adapter.faceid_lora import comfy_lora_state
from ipa_train.adapter.layout import known_sites
from ipa_train.hosts.diffusers_unet import install_adapter, unet_layer_hidden_sizes
from ipa_train.hosts.face_embeds import encode_face_embeds
from tests.faceid_factories import random_lora
from tests.factories import random_adapter, tiny_unet, unet_inputs


def _merge_lora(unet, lora: dict[str, torch.Tensor], scale: float = 1.0) -> int:
    """W += scale * up @ down on every module the renamed LoRA names (`unet.<attention>.processor.to_q_lora...`)."""
    modules = dict(unet.named_modules())
    done = 0
    for key in [k for k in lora if k.endswith(".down.weight")]:
        base = key[len("unet."):].rsplit("_lora.", 1)[0].replace(".processor.", ".")
        base = base + ".0" if base.endswith(".to_out") else base
        with torch.no_grad():
            modules[base].weight += scale * lora[key.replace(".down.", ".up.")] @ lora[key]
        done += 1
    return done


def _ours_eps(unet, adapter, face, inputs, weight=0.7, clip=None, shortcut_scale=1.0):
    sample, t, text, added = inputs
    embeds = encode_face_embeds(adapter, face, clip, clip, shortcut_scale=shortcut_scale)  # only cond is used here
    patch = install_adapter(unet, adapter, weight=weight)
    try:
        return unet(sample, t, patch.encoder_hidden_states(text, ip_tokens=embeds.cond), added_cond_kwargs=added).sample
    finally:
        patch.remove()


def _diffusers_eps(unet, adapter, face, inputs, weight=0.7, lora=None, clip=None, shortcut_scale=1.0):
    """diffusers' FaceID path: its projection and IP processors from the file's groups (plus its LoRA via PEFT;
    plus: the crop's CLIP states `clip` [1, L, D] and the v2 shortcut set on its projection, as its pipelines do)."""
    sample, t, text, added = inputs
    sd = adapter.state_dict()
    groups = {g: {k[len(g) + 1:]: v for k, v in sd.items() if k.startswith(g + ".")} for g in ("image_proj", "ip_adapter")}
    groups["ip_adapter"].update(lora or {})
    unet._load_ip_adapter_weights([groups], low_cpu_mem_usage=False)
    if lora:
        _diffusers_faceid_lora(unet, groups, 1.0)
    for p in unet.attn_processors.values():
        if hasattr(p, "scale"):
            p.scale = [weight]
    if clip is not None:
        proj = unet.encoder_hid_proj.image_projection_layers[0]
        proj.clip_embeds = clip.expand(sample.shape[0], -1, -1).unsqueeze(1)  # [B, 1 image, L, D]
        proj.shortcut = adapter.config.projection == "faceid-plusv2"
        proj.shortcut_scale = shortcut_scale
    kwargs = dict(added or {})
    kwargs["image_embeds"] = [face.expand(sample.shape[0], -1).unsqueeze(1)]  # [B, 1 face, 512]
    return unet(sample, t, text, added_cond_kwargs=kwargs).sample


# SD1.5 layout only: the SDXL LoRA names are checked against diffusers' own loader in test_faceid_tokens.py
CASES = [("sd15", "faceid", 4), ("sd15", "faceid-portrait", 16)]


@pytest.mark.parametrize("kind,projection,tokens", CASES)
def test_faceid_noise_prediction_equals_diffusers(kind, projection, tokens):
    unet = tiny_unet(kind)
    c = unet.config.cross_attention_dim
    hidden = tuple(unet_layer_hidden_sizes(unet))
    cfg = AdapterConfig(projection=projection, num_tokens=tokens, clip_embedding_dim=512, cross_attention_dim=c,
                        layer_hidden_sizes=hidden, clip_output="none", face_embedding_dim=512)
    adapter = random_adapter(cfg, seed=2)
    sample, t, text, added = unet_inputs(unet)
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(3)), dim=-1)
    if projection == "faceid":
        lora = comfy_lora_state(random_lora(hidden, c, rank=2, seed=4, scale=0.2), known_sites(kind))
        assert _merge_lora(unet, lora) == 4 * 2 * len(hidden)
    with torch.no_grad():
        base = unet(sample, t, text, added_cond_kwargs=added).sample
        ours = _ours_eps(unet, adapter, face, (sample, t, text, added))
        ref = _diffusers_eps(unet, adapter, face, (sample, t, text, added))
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _diffusers_faceid_lora(unet, groups: dict, scale: float = 1.0) -> None:
    """What diffusers' `load_ip_adapter` does with a FaceID file's LoRA: rename it by the UNet's processor order,
    load it through PEFT (`faceid_0`) and set its weight."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    extra = unet._load_ip_adapter_loras([groups])
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(extra[0])
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet, adapter_name="faceid_0")
    unet.set_adapters(["faceid_0"], weights=[scale])


PEFT_CASES = [("sd15", "faceid", None), ("sdxl", "faceid", None), ("sd15", "faceid-plus", 1.0),
              ("sdxl", "faceid-plusv2", 2.0)]


@pytest.mark.parametrize("kind,projection,scale", PEFT_CASES)
def test_faceid_lora_through_peft_equals_ours(kind, projection, scale):
    """Our FaceID path (the embedded LoRA renamed by our site order and merged at strength 1, our patch) against
    diffusers' own: its FaceID projection and IP processors, and the LoRA loaded through PEFT at scale 1. The SDXL
    layout has 2 and 10 transformer blocks per attention and 10 in the mid block (processors: down, up, then mid)."""
    pytest.importorskip("peft")
    import copy

    plus = projection != "faceid"
    unet = tiny_unet(kind, cross_attention_dim=128 if plus else None)
    ref_unet = copy.deepcopy(unet)
    c = unet.config.cross_attention_dim
    hidden = tuple(unet_layer_hidden_sizes(unet))
    cfg = AdapterConfig(projection=projection, num_tokens=4, clip_embedding_dim=64 if plus else 512,
                        cross_attention_dim=c, layer_hidden_sizes=hidden, clip_output="penultimate" if plus else "none",
                        face_embedding_dim=512)
    adapter = random_adapter(cfg, seed=5)
    raw_lora = random_lora(hidden, c, rank=2, seed=6, scale=0.2)
    sample, t, text, added = unet_inputs(unet)
    g = torch.Generator().manual_seed(7)
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    clip = torch.randn(1, 9, 64, generator=g) if plus else None
    with torch.no_grad():
        base = unet(sample, t, text, added_cond_kwargs=added).sample
        assert _merge_lora(unet, comfy_lora_state(raw_lora, known_sites(kind))) == 4 * 2 * len(hidden)
        ours = _ours_eps(unet, adapter, face, (sample, t, text, added), clip=clip, shortcut_scale=scale or 1.0)
        ref = _diffusers_eps(ref_unet, adapter, face, (sample, t, text, added), lora=raw_lora, clip=clip,
                             shortcut_scale=scale or 1.0)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
