"""In-process ComfyUI: our nodes patch a real SD1.5-architecture UNet and predict the same noise as diffusers."""

from __future__ import annotations

import importlib

import pytest
import torch

from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
from ipa_train.hosts.comfy.unet import encode_embeds
from ipa_train.hosts.diffusers_unet import unet_layer_hidden_sizes

from ..factories import load_into_diffusers, random_adapter


@pytest.fixture(scope="module")
def models(comfy):
    """A diffusers SD1.5-architecture UNet with random fp32 weights and the same weights loaded in ComfyUI."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()  # SD1.5 config
    sd = {k: v.clone() for k, v in unet.state_dict().items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    return unet, patcher


def _adapter(unet, projection):
    cfg = AdapterConfig(
        projection=projection, num_tokens=4 if projection == "plain" else 16,
        clip_embedding_dim=1024 if projection == "plain" else 1280, cross_attention_dim=768,
        layer_hidden_sizes=tuple(unet_layer_hidden_sizes(unet)),
        clip_output="image_embeds" if projection == "plain" else "penultimate",
        resampler=ResamplerConfig(dim=768, depth=4, heads=12, dim_head=64, ff_mult=4) if projection == "plus" else None,
    )
    return random_adapter(cfg, seed=1)


def _eps(patcher, x, t, ctx, cond_or_uncond):
    """Noise prediction through BaseModel.apply_model, with the transformer_options a sampler passes."""
    ms = patcher.get_model_object("model_sampling")
    sigma = ms.sigma(t.float())
    x_noisy = x * torch.sqrt(sigma**2 + 1.0)[:, None, None, None]
    to = dict(patcher.model_options["transformer_options"])
    to["cond_or_uncond"] = cond_or_uncond
    to["sigmas"] = sigma
    wrappers = patcher.wrappers
    to["wrappers"] = wrappers
    with torch.no_grad():
        den = patcher.model.apply_model(x_noisy, sigma, c_crossattn=ctx, transformer_options=to)
    return (x_noisy - den) / sigma[:, None, None, None]


def _diffusers_eps(unet, adapter, clip_cond, clip_uncond, x, t, ctx, weight):
    load_into_diffusers(unet, adapter, weight)
    # rows: [cond, uncond] as in the ComfyUI call below
    embeds = torch.cat([clip_cond, clip_uncond]).unsqueeze(1)
    try:
        with torch.no_grad():
            return unet(x, t, ctx, added_cond_kwargs={"image_embeds": [embeds]}).sample
    finally:
        unet.unload_ip_adapter() if hasattr(unet, "unload_ip_adapter") else None
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
        unet.encoder_hid_proj = None
        unet.config.encoder_hid_dim_type = None


@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_comfyui_patched_matches_diffusers(models, kit, projection):
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    unet, patcher = models
    adapter = _adapter(unet, projection)
    g = torch.Generator().manual_seed(2)
    shape = (1, 1024) if projection == "plain" else (1, 257, 1280)
    clip_cond, clip_uncond = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    embeds = encode_embeds(adapter, clip_cond, clip_uncond)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 768, generator=g)

    base = _eps(patcher, x, t, ctx, [0, 1])
    patched = apply_mod.apply(patcher, adapter, embeds, "scaled", 0.7)
    ours = _eps(patched, x, t, ctx, [0, 1])
    ref = _diffusers_eps(unet, adapter, clip_cond, clip_uncond, x, t, ctx, 0.7)
    plain_ref = unet(x, t, ctx).sample.detach()
    # ComfyUI's UNet and diffusers' differ only in kernel order on the same fp32 weights (~1e-5 on eps of
    # magnitude ~1, measured without any adapter); the adapter must not add more than that.
    host_gap = (base - plain_ref).abs().max().item()
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=0, atol=max(1e-4, 4 * host_gap))
    # every one of the 16 cross-attention layers is patched, the middle block included
    keys = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(keys) == 16 and ("middle", 0) in keys  # depth-1 blocks: the short keys the community pack uses too
    # the original model is untouched
    assert "patches_replace" not in patcher.model_options["transformer_options"]


def _plain_case(unet, seed: int):
    """A plain adapter for `unet`, its embeds of a random CLIP embedding, and model inputs: latents x [2, 4, 16, 16],
    text context [2, 77, 768], timesteps [2]."""
    adapter = _adapter(unet, "plain")
    embeds = encode_embeds(adapter, torch.randn(1, 1024), torch.zeros(1, 1024))
    g = torch.Generator().manual_seed(seed)
    return adapter, embeds, (torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor([300, 300]))


def test_weight_zero_equals_unpatched_exactly(models, kit):
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    unet, patcher = models
    adapter, embeds, (x, ctx, t) = _plain_case(unet, seed=3)
    base = _eps(patcher, x, t, ctx, [1, 0])
    for mode in ("scaled", "fused"):
        zero = _eps(apply_mod.apply(patcher, adapter, embeds, mode, 0.0, 0.5), x, t, ctx, [1, 0])
        assert torch.equal(zero, base)
    # outside start/end: exact too
    gated = _eps(apply_mod.apply(patcher, adapter, embeds, "scaled", 1.0, start_at=0.9, end_at=1.0), x, t, ctx, [1, 0])
    assert torch.equal(gated, base)


def test_fused_mode_and_chaining_run(models, kit):
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    unet, patcher = models
    adapter, embeds, (x, ctx, t) = _plain_case(unet, seed=4)
    scaled = _eps(apply_mod.apply(patcher, adapter, embeds, "scaled", 0.8), x, t, ctx, [0, 1])
    fused1 = _eps(apply_mod.apply(patcher, adapter, embeds, "fused", 0.8, 1.0), x, t, ctx, [0, 1])
    fused = _eps(apply_mod.apply(patcher, adapter, embeds, "fused", 0.8, 0.5), x, t, ctx, [0, 1])
    assert torch.equal(fused1, scaled)
    assert (fused - scaled).abs().max() > 1e-4
    two = apply_mod.apply(apply_mod.apply(patcher, adapter, embeds, "scaled", 0.4), adapter, embeds, "scaled", 0.4)
    assert len(two.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].entries) == 2
    torch.testing.assert_close(_eps(two, x, t, ctx, [0, 1]), scaled, rtol=0, atol=1e-4)


def test_sdxl_adapter_on_sd15_model_refused(models, kit):
    apply_mod = importlib.import_module(kit.__name__ + ".nodes.apply")
    from ipa_train.errors import BaseModelMismatchError

    _, patcher = models
    cfg = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=1280, cross_attention_dim=2048,
                        layer_hidden_sizes=(8,) * 70)
    adapter = random_adapter(cfg)
    embeds = encode_embeds(adapter, torch.randn(1, 1280), torch.zeros(1, 1280))
    with pytest.raises(BaseModelMismatchError, match="Stable Diffusion XL adapter.*Stable Diffusion 1.5"):
        apply_mod.apply(patcher, adapter, embeds)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sites_found_in_comfyui_unet_match_official_layout(comfy, family):
    """The layers our apply node finds in ComfyUI's own UNet (built on the meta device) are the official ones."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ipa_train.adapter.layout import context_dim_of_blocks, groups_from_blocks, known_sites, sites_from_groups

    common = dict(use_checkpoint=False, image_size=32, out_channels=4, in_channels=4, model_channels=320,
                  use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False)
    cfg = {"sd15": dict(adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False,
                        context_dim=768, num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
           "sdxl": dict(num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                        transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
                        use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])}[family]
    cfg.update(common)
    cfg["dtype"] = torch.float32
    unet = UNetModel(**comfy.model_detection.convert_config(cfg), device="meta", operations=comfy.ops.disable_weight_init)
    blocks = (unet.input_blocks, unet.middle_block, unet.output_blocks)
    assert sites_from_groups(groups_from_blocks(*blocks)) == known_sites(family)
    assert context_dim_of_blocks(*blocks) == {"sd15": 768, "sdxl": 2048}[family]
