"""InstantX SD3.5 IP-Adapter in a real ComfyUI: a tiny random MMDiT loaded by ComfyUI's own loader, patched through
its joint-block `dit` patches, against diffusers' SD3Transformer2DModel with the same weights and the adapter
loaded by diffusers' own loader (`IPAdapterTimeImageProjection` + `SD3IPAdapterJointAttnProcessor2_0`); fp32 CPU,
CFG batch."""

from __future__ import annotations

import pytest
import torch

from ipa_train.adapter.dit_formats import detect_dit_config
from ipa_train.adapter.dit_modules import build_dit_adapter
from ipa_train.errors import BaseModelMismatchError
from ipa_train.hosts.comfy.dit import BlockPatch, DitEmbeds
from ipa_train.hosts.comfy.dit_apply import apply_dit

from .. import dit_factories as fac
from .dit_models import SD3, tiny_sd3

TOL = 1e-4


@pytest.fixture(scope="module")
def sd3(comfy):
    return tiny_sd3(comfy)


def _inputs(seed=3, sigma=0.7):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 16, 8, 8, generator=g), ctx=torch.randn(2, 6, SD3["context"], generator=g),
                y=torch.randn(2, SD3["pooled"], generator=g), sigma=sigma)


def comfy_out(patcher, x, ctx, y, sigma, spy=None):
    to = dict(patcher.model_options.get("transformer_options", {}))
    to["cond_or_uncond"], to["sigmas"] = [0, 1], torch.full((2,), sigma)
    if spy is not None:
        to["patches_replace"] = {"dit": {k: spy(k, p) for k, p in to.get("patches_replace", {}).get("dit", {}).items()}}
    with torch.no_grad():  # ComfyUI's SD3 timestep is sigma * 1000 (ModelSamplingDiscreteFlow, multiplier 1000)
        return patcher.model.diffusion_model(x, torch.full((2,), sigma * 1000), y=y, context=ctx, transformer_options=to)


def ref_out(ref, x, ctx, y, sigma, **kwargs):
    with torch.no_grad():
        return ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y,
                   timestep=torch.full((2,), sigma * 1000), joint_attention_kwargs=kwargs or None).sample


def _state(seed=4):
    return fac.instantx_sd3(hidden=SD3["hidden"], head_dim=SD3["hidden"] // SD3["heads"], tokens=16,
                            blocks=SD3["depth"], dim=128, depth=4, temb_in=32, seed=seed)


def _adapter(state):
    flat = fac.flat(state)
    return build_dit_adapter(detect_dit_config(flat, "t"), flat, "t").eval()


def _embeds(seed=5):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 729, 1152, generator=g)
    return DitEmbeds(cond, torch.zeros_like(cond), "instantx-sd3")


def test_unpatched_comfy_mmdit_equals_diffusers(sd3):
    ref, patcher = sd3
    inp = _inputs()
    assert (comfy_out(patcher, **inp) - ref_out(ref, **inp)).abs().max() < TOL


@pytest.mark.parametrize("sigma", [0.93, 0.31])
def test_instantx_sd35_matches_diffusers(sd3, sigma):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    ref, patcher = sd3
    state, embeds = _state(), _embeds()
    m = apply_dit(patcher, _adapter(state), embeds, weight=0.6)
    calls = []

    def spy(key, patch):
        def run(block, active, args, extra):
            calls.append(key)
            return patch.run(block, active, args, extra)
        return BlockPatch(run, patch.block, patch.entries, patch.base)

    inp = _inputs(sigma=sigma)
    ours = comfy_out(m, **inp, spy=spy)
    try:
        ref._load_ip_adapter_weights(state, low_cpu_mem_usage=False)
        for proc in ref.attn_processors.values():
            proc.scale = 0.6
        theirs = ref_out(ref, **inp, ip_adapter_image_embeds=torch.cat([embeds.cond, embeds.uncond]))
    finally:
        ref.set_attn_processor(JointAttnProcessor2_0())
        ref.image_proj = None
    base = comfy_out(patcher, **inp)
    diff = (ours - theirs).abs().max().item()
    print(f"InstantX SD3.5 vs diffusers at sigma {sigma}: max |diff| {diff:.2e}, effect {(ours - base).abs().max():.2e}")
    assert (ours - base).abs().max() > 1e-2
    assert diff < TOL
    assert sorted(calls) == [("double_block", i) for i in range(SD3["depth"])]


def test_resampler_runs_once_per_step_and_side(sd3, monkeypatch):
    _, patcher = sd3
    adapter = _adapter(_state())
    runs = []
    forward = type(adapter.image_proj).forward
    monkeypatch.setattr(type(adapter.image_proj), "forward", lambda self, *a: runs.append(1) or forward(self, *a))
    m = apply_dit(patcher, adapter, _embeds(), weight=0.6)
    comfy_out(m, **_inputs(sigma=0.8))
    assert len(runs) == 2  # cond and uncond, for every block of the step
    comfy_out(m, **_inputs(sigma=0.8))
    assert len(runs) == 2  # the same sigma again: cached
    comfy_out(m, **_inputs(sigma=0.5))
    assert len(runs) == 4


@pytest.mark.parametrize("kwargs", [dict(weight=0.0), dict(weight=1.0, start_at=0.8), dict(weight=1.0, end_at=0.05),
                                    dict(weight=1.0, block_weights=[0.0, 0.0])])
def test_off_is_the_unpatched_model_bit_for_bit(sd3, kwargs):
    _, patcher = sd3
    inp = _inputs(sigma=0.7)
    m = apply_dit(patcher, _adapter(_state()), _embeds(), **kwargs)
    assert torch.equal(comfy_out(m, **inp), comfy_out(patcher, **inp))


def test_start_at_is_comfyui_percent_under_the_shift(sd3):
    _, patcher = sd3
    sampling = patcher.get_model_object("model_sampling")
    sigma_half = float(sampling.percent_to_sigma(0.5))  # shift 3: 0.75, not 1 - 0.5
    assert abs(sigma_half - 0.75) < 1e-6
    m = apply_dit(patcher, _adapter(_state()), _embeds(), weight=1.0, start_at=0.5)
    on, off = _inputs(sigma=0.74), _inputs(sigma=0.76)
    assert not torch.equal(comfy_out(m, **on), comfy_out(patcher, **on))
    assert torch.equal(comfy_out(m, **off), comfy_out(patcher, **off))


def test_wrong_family_and_width_are_refused(sd3, comfy):
    from .dit_models import tiny_flux

    _, patcher = sd3
    flux_state = fac.xlabs_flux(hidden=64, ctx=32, tokens=4, blocks=2)
    flux_adapter = _adapter(flux_state)
    with pytest.raises(BaseModelMismatchError, match="made for Flux, but the model is an SD3") as e:
        apply_dit(patcher, flux_adapter, DitEmbeds(torch.zeros(1, 768), torch.zeros(1, 768), "xlabs-flux"), file="x.st")
    assert "\n" not in str(e.value) and "x.st" in str(e.value)
    _, flux_patcher = tiny_flux(comfy)
    with pytest.raises(BaseModelMismatchError, match="made for SD3.5, but the model is a Flux model"):
        apply_dit(flux_patcher, _adapter(_state()), _embeds())
    wide = fac.instantx_sd3(hidden=192, head_dim=64, tokens=16, blocks=2, dim=128, depth=4, temb_in=32)
    with pytest.raises(BaseModelMismatchError, match=r"width 192, 2 joint blocks\) does not fit this model"):
        apply_dit(patcher, _adapter(wide), _embeds())
