"""Our installed adapter against diffusers' own IP-Adapter path, and the exact invariants."""

from __future__ import annotations

import pytest
import torch

from ipa_train.adapter.layout import known_sites, layer_multipliers
from ipa_train.errors import BaseModelMismatchError
from ipa_train.hosts.diffusers_unet import install_adapter

from .factories import adapter_for_unet, load_into_diffusers, tiny_unet, unet_inputs


def _clip(projection: str, batch: int = 2, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 20, generator=g) if projection == "plain" else torch.randn(batch, 9, 20, generator=g)


def _diffusers_reference(unet, adapter, clip, weight, sample, t, text, added):
    """diffusers' own IP-Adapter processors and projection, loaded from our adapter's official-layout weights."""
    load_into_diffusers(unet, adapter, weight)
    kwargs = dict(added or {})
    kwargs["image_embeds"] = [clip.unsqueeze(1)]  # [B, num_images=1, ...] per adapter
    return unet(sample, t, text, added_cond_kwargs=kwargs).sample


@pytest.mark.parametrize("projection", ["plain", "plus"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_noise_prediction_matches_diffusers(kind, projection):
    unet = tiny_unet(kind)
    adapter = adapter_for_unet(unet, projection)
    sample, t, text, added = unet_inputs(unet)
    clip = _clip(projection)
    with torch.no_grad():
        base = unet(sample, t, text, added_cond_kwargs=added).sample
        patch = install_adapter(unet, adapter, weight=0.7)
        ours = unet(sample, t, patch.encoder_hidden_states(text, clip), added_cond_kwargs=added).sample
        patch.remove()
        ref = _diffusers_reference(unet, adapter, clip, 0.7, sample, t, text, added)
    # The adapter really changes the output, so the comparison below is not vacuous.
    assert (ours - base).abs().max() > 1e-3
    # Both sides run the same fp32 ops (SDPA per head, identical projections); only kernel reduction order
    # may differ between code paths, which stays below 1e-5 on outputs of magnitude ~1.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_weight_zero_is_exactly_the_unpatched_unet(kind):
    unet = tiny_unet(kind)
    adapter = adapter_for_unet(unet, "plus")
    sample, t, text, added = unet_inputs(unet)
    with torch.no_grad():
        base = unet(sample, t, text, added_cond_kwargs=added).sample
        patch = install_adapter(unet, adapter, weight=0.0, mode="fused")
        zero = unet(sample, t, patch.encoder_hidden_states(text, _clip("plus")), added_cond_kwargs=added).sample
        patch.remove()
        after = unet(sample, t, text, added_cond_kwargs=added).sample
    assert torch.equal(zero, base)
    assert torch.equal(after, base)


@pytest.mark.parametrize("fusion_weights", [False, True])
def test_fused_with_lambda_one_equals_scaled(fusion_weights):
    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plain", fusion=fusion_weights)
    sample, t, text, added = unet_inputs(unet)
    clip = _clip("plain")
    with torch.no_grad():
        patch = install_adapter(unet, adapter, weight=1.0, mode="scaled")
        scaled = unet(sample, t, patch.encoder_hidden_states(text, clip)).sample
        patch.remove()
        patch = install_adapter(unet, adapter, weight=1.0, mode="fused", fusion_lambda=1.0)
        fused1 = unet(sample, t, patch.encoder_hidden_states(text, clip)).sample
        patch.fusion_lambda = 0.5
        fused05 = unet(sample, t, patch.encoder_hidden_states(text, clip)).sample
        patch.remove()
    assert torch.equal(fused1, scaled)
    assert (fused05 - scaled).abs().max() > 1e-4


def test_layer_weights_select_layers():
    """Per-layer weights: all zeros but one layer equals patching that layer alone (others exactly skipped)."""
    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plain")
    sample, t, text, _ = unet_inputs(unet)
    clip = _clip("plain")
    sites = known_sites("sd15")
    style = layer_multipliers(sites, "sd15", "style")
    assert [s.transformer_index for s, m in zip(sites, style) if m] == [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
    with torch.no_grad():
        base = unet(sample, t, text).sample
        patch = install_adapter(unet, adapter, weight=1.0, layer_weights=[0.0] * 16)
        none = unet(sample, t, patch.encoder_hidden_states(text, clip)).sample
        patch.set_weight(1.0, style)
        styled = unet(sample, t, patch.encoder_hidden_states(text, clip)).sample
        patch.remove()
    assert torch.equal(none, base)
    assert (styled - base).abs().max() > 1e-4


def test_sdxl_adapter_on_sd15_unet_is_refused():
    sd15, sdxl = tiny_unet("sd15"), tiny_unet("sdxl")
    adapter = adapter_for_unet(sdxl, "plain")
    with pytest.raises(BaseModelMismatchError, match=r"adapter \(70 cross-attention layers.*does not fit this model.*16 cross-attention layers"):
        install_adapter(sd15, adapter)


def test_gradients_reach_adapter_only():
    unet = tiny_unet("sd15")
    unet.requires_grad_(False)
    adapter = adapter_for_unet(unet, "plus", fusion=True).train()
    sample, t, text, _ = unet_inputs(unet)
    patch = install_adapter(unet, adapter, mode="fused", fusion_lambda=0.5)
    out = unet(sample, t, patch.encoder_hidden_states(text, _clip("plus"))).sample
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.trainable_parameters())
    assert all(p.grad is None for p in unet.parameters())
