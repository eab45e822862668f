"""Flux / SD3.5 apply controls in a real ComfyUI, on the tiny Flux and MMDiT of `dit_models`: attention masks,
fused mode (against the published InstantX math on fused tokens), Kontext reference latents, and chaining with the
InstantX SD3 pack's block patch (run in-process from IPAKIT_PEERS_PATH as an oracle, never copied).

Model calls go through the APPLY_MODEL wrappers the apply registers, as ComfyUI's `apply_model` runs them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from ipa_train.adapter.modules import TextImageFusion
from ipa_train.hosts.comfy.dit import BlockPatch, DitEmbeds
from ipa_train.hosts.comfy.dit_apply import apply_dit

from .. import dit_factories as fac
from .dit_models import FLUX, SD3, randomize, tiny_flux, tiny_sd3
from .test_host_flux import _inputs as flux_inputs
from .test_host_flux import _install_instantx, _instantx_tokens, _restore, ref_out
from .test_host_sd3 import _adapter, _embeds, _state
from .test_host_sd3 import _inputs as sd3_inputs

TOL = 1e-4


@pytest.fixture(scope="module")
def flux(comfy):
    return tiny_flux(comfy)


@pytest.fixture(scope="module")
def sd3(comfy):
    return tiny_sd3(comfy)


def run(patcher, x, ctx, y, sigma, guidance=None, spy=None, **kwargs):
    """The diffusion model's output for a CFG batch (cond, uncond), inside the model's APPLY_MODEL wrappers."""
    to = dict(patcher.model_options.get("transformer_options", {}))
    to["cond_or_uncond"], to["sigmas"] = [0, 1], torch.full((2,), sigma)
    dm = patcher.model.diffusion_model
    is_flux = guidance is not None

    def model(x, t, c_concat, c_crossattn, control, opts, **kw):
        if spy is not None:
            opts = {**opts, "patches_replace": {"dit": {k: spy(k, p) for k, p in opts["patches_replace"]["dit"].items()}}}
        if is_flux:
            return dm(x, t, c_crossattn, y=y, guidance=torch.full((2,), guidance), transformer_options=opts, **kw)
        return dm(x, t * 1000, y=y, context=c_crossattn, transformer_options=opts)  # SD3: timestep = sigma * 1000

    call = model
    for group in patcher.wrappers.get("apply_model", {}).values():
        for w in group:
            call = functools.partial(w, call)
    with torch.no_grad():
        return call(x, torch.full((2,), sigma), None, ctx, None, to, **kwargs)


def _flux_state(seed=6):
    return fac.instantx_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=16,
                             blocks=FLUX["depth"] + FLUX["single"], seed=seed)


@pytest.fixture(scope="module")
def instantx():
    state = _flux_state()
    g = torch.Generator().manual_seed(7)
    return state, _adapter(state), DitEmbeds(torch.randn(1, 1152, generator=g), torch.zeros(1, 1152), "instantx-flux")


def _mask(white_left: bool = True):
    m = torch.zeros(64, 64)
    m[:, :32] = 1.0 if white_left else 0.0
    return m


def test_flux_masks_of_zeros_and_ones(flux, instantx):
    _, patcher = flux
    _, adapter, embeds = instantx
    inp = flux_inputs()
    base, full = run(patcher, **inp), run(apply_dit(patcher, adapter, embeds), **inp)
    assert torch.equal(run(apply_dit(patcher, adapter, embeds, attn_mask=torch.zeros(64, 64)), **inp), base)
    assert torch.equal(run(apply_dit(patcher, adapter, embeds, attn_mask=torch.ones(1, 64, 64)), **inp), full)
    half = run(apply_dit(patcher, adapter, embeds, attn_mask=_mask()), **inp)
    assert (half - base).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3


def test_sd3_masks_of_zeros_and_ones(sd3):
    _, patcher = sd3
    adapter, embeds, inp = _adapter(_state()), _embeds(), sd3_inputs(sigma=0.7)
    base, full = run(patcher, **inp), run(apply_dit(patcher, adapter, embeds, weight=0.8), **inp)
    assert torch.equal(run(apply_dit(patcher, adapter, embeds, weight=0.8, attn_mask=torch.zeros(64, 64)), **inp), base)
    assert torch.equal(run(apply_dit(patcher, adapter, embeds, weight=0.8, attn_mask=torch.ones(64, 64)), **inp), full)
    half = run(apply_dit(patcher, adapter, embeds, weight=0.8, attn_mask=_mask()), **inp)
    assert (half - base).abs().max() > 1e-3 and (half - full).abs().max() > 1e-3


def test_flux_fused_matches_the_published_math_on_fused_tokens(flux, instantx):
    ref, patcher = flux
    state, adapter, embeds = instantx
    inp = flux_inputs()
    lam = 0.4
    scaled = run(apply_dit(patcher, adapter, embeds, weight=0.9), **inp)
    at_one = run(apply_dit(patcher, adapter, embeds, weight=0.9, mode="fused", fusion_lambda=1.0), **inp)
    assert torch.equal(at_one, scaled)  # lambda 1 is the scaled mode
    ours = run(apply_dit(patcher, adapter, embeds, weight=0.9, mode="fused", fusion_lambda=lam), **inp)
    tokens = _instantx_tokens(state, torch.cat([embeds.cond, embeds.uncond]))
    fused = TextImageFusion(FLUX["context"], trainable=False)(tokens[:1], inp["ctx"][:1], lam)  # cond row only
    try:
        _install_instantx(ref, state, torch.cat([fused, tokens[1:]]), 0.9)
        theirs = ref_out(ref, **inp)
    finally:
        _restore(ref)
    diff = (ours - theirs).abs().max().item()
    print(f"InstantX Flux fused (lambda {lam}) vs the published math on fused tokens: max |diff| {diff:.2e}, "
          f"fused vs scaled {(ours - scaled).abs().max():.2e}")
    assert diff < TOL and (ours - scaled).abs().max() > 1e-3


def test_sd3_fused_changes_only_the_cond_rows(sd3):
    _, patcher = sd3
    adapter, embeds, inp = _adapter(_state()), _embeds(), sd3_inputs(sigma=0.6)
    scaled = run(apply_dit(patcher, adapter, embeds, weight=0.8), **inp)
    assert torch.equal(run(apply_dit(patcher, adapter, embeds, weight=0.8, mode="fused", fusion_lambda=1.0), **inp),
                       scaled)
    fused = run(apply_dit(patcher, adapter, embeds, weight=0.8, mode="fused", fusion_lambda=0.3), **inp)
    assert (fused[0] - scaled[0]).abs().max() > 1e-3
    assert torch.allclose(fused[1], scaled[1], atol=1e-6)  # the uncond row keeps its tokens


def _recording(records):
    """A spy patch: runs ours, and the unpatched block on copies of the same args (ComfyUI's Flux blocks add into
    their inputs in place), keeping copies of both."""
    def spy(key, patch):
        def record(block, active, args, extra):
            out = patch.run(block, active, args, extra)
            plain = extra["original_block"]({**args, **{k: args[k].clone() for k in ("img", "txt") if k in args}})
            records[key] = ({k: v.clone() for k, v in out.items()}, plain, args)
            return out
        return BlockPatch(record, patch.block, patch.entries, patch.base)
    return spy


@pytest.mark.parametrize("fmt", ["xlabs-flux", "instantx-flux"])
def test_flux_kontext_reference_latents_get_no_image_attention(flux, instantx, fmt):
    _, patcher = flux
    if fmt == "xlabs-flux":
        state = fac.xlabs_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=4, blocks=FLUX["depth"], seed=4)
        adapter, embeds = _adapter(state), DitEmbeds(torch.randn(1, 768), torch.zeros(1, 768), "xlabs-flux")
    else:
        _, adapter, embeds = instantx
    inp = flux_inputs()
    reference = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(9)).expand(2, -1, -1, -1)
    m = apply_dit(patcher, adapter, embeds, attn_mask=torch.ones(64, 64))
    records = {}
    out = run(m, **inp, spy=_recording(records), ref_latents=[reference])
    assert out.shape == inp["x"].shape and torch.isfinite(out).all()
    main = (8 // 2) * (8 // 2)
    ours, plain, args = records[("double_block", 0)]
    assert args["img"].shape[1] == 2 * main  # the reference latent's rows follow the generated image's
    assert torch.allclose(ours["img"][:, main:], plain["img"][:, main:], atol=1e-6)
    assert (ours["img"][:, :main] - plain["img"][:, :main]).abs().max() > 1e-3
    if fmt == "instantx-flux":
        ours, plain, _ = records[("single_block", 0)]
        text = inp["ctx"].shape[1]
        assert torch.allclose(ours["img"][:, text + main:], plain["img"][:, text + main:], atol=1e-6)
        assert (ours["img"][:, :text + main] - plain["img"][:, :text + main]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# chaining with the InstantX SD3 pack, whose joint-block patch recomputes the block and ignores `original_block`

PEERS = os.environ.get("IPAKIT_PEERS_PATH", "")


@pytest.fixture(scope="module")
def sd3_peer(comfy):
    path = Path(PEERS) / "ComfyUI-InstantX-IPAdapter-SD3" / "models" / "jointblock.py"
    if not path.is_file():
        pytest.skip(f"IPAKIT_PEERS_PATH={PEERS!r} has no ComfyUI-InstantX-IPAdapter-SD3")
    name = "peer_instantx_sd3_jointblock"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the peer does not import in this host: say why
            pytest.skip(f"the InstantX SD3 pack does not import here: {type(e).__name__}: {e}")
        sys.modules[name] = module
    return sys.modules[name]


def _with_peer(patcher, peer, weight):
    """The peer's JointBlockIPWrapper at every joint block, with random tiny processors and image tokens."""
    torch.manual_seed(11)
    hidden, head = SD3["hidden"], SD3["hidden"] // SD3["heads"]
    options = {"hidden_states": torch.randn(2, 8, hidden), "t_emb": torch.randn(2, 32), "weight": weight}
    m = patcher.clone()
    for i, block in enumerate(m.get_model_object("diffusion_model").joint_blocks):
        proc = peer.IPAttnProcessor(hidden_size=hidden, cross_attention_dim=hidden, ip_hidden_states_dim=hidden,
                                    head_dim=head, timesteps_emb_dim=32).eval()
        randomize(proc, 20 + i)  # its RMS norms start uninitialised (torch.empty)
        m.set_model_patch_replace(peer.JointBlockIPWrapper(block, proc, options), "dit", "double_block", i)
    return m


def test_sd3_chains_with_the_instantx_sd3_pack_in_either_order(sd3, sd3_peer):
    _, patcher = sd3
    adapter, embeds, inp = _adapter(_state()), _embeds(), sd3_inputs(sigma=0.7)
    base = run(patcher, **inp)
    peer_alone = run(_with_peer(patcher, sd3_peer, 0.7), **inp)
    ours_alone = run(apply_dit(patcher, adapter, embeds, weight=0.8), **inp)
    ours_after = run(apply_dit(_with_peer(patcher, sd3_peer, 0.7), adapter, embeds, weight=0.8), **inp)
    peer_after = run(_with_peer(apply_dit(patcher, adapter, embeds, weight=0.8), sd3_peer, 0.7), **inp)
    for name, other in (("base", base), ("peer alone", peer_alone), ("ours alone", ours_alone)):
        assert (ours_after - other).abs().max() > 1e-3, name
    assert torch.allclose(peer_after, ours_after, atol=1e-5)  # the peer registered last replaced ours: put back
    # each side at weight 0 leaves the other alone
    assert torch.equal(run(apply_dit(_with_peer(patcher, sd3_peer, 0.7), adapter, embeds, weight=0.0), **inp),
                       peer_alone)
    assert torch.allclose(run(apply_dit(_with_peer(patcher, sd3_peer, 0.0), adapter, embeds, weight=0.8), **inp),
                          ours_alone, atol=1e-5)


def test_our_sd3_bin_loads_in_the_instantx_sd3_pack(sd3_peer, tmp_path):
    """An InstantX SD3.5 adapter converted to `.bin` (the pack indexes `state_dict["image_proj"]`, which only the
    nested torch file has) loads into the pack's own TimeResampler and processors with its `load_state_dict`
    calls, and the resampler gives our tokens."""
    from ipa_train import load_adapter
    from ipa_train.cli import main

    path = Path(PEERS) / "ComfyUI-InstantX-IPAdapter-SD3" / "models" / "resampler.py"
    spec = importlib.util.spec_from_file_location("peer_instantx_sd3_resampler", path)
    resampler_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resampler_mod)
    hidden, dim, blocks = 128, 128, 3
    state = fac.instantx_sd3(hidden=hidden, dim=dim, blocks=blocks, seed=12)
    src = fac.write(state, tmp_path / "trained.safetensors")
    dst = tmp_path / "trained.bin"
    assert main(["convert", str(src), str(dst)]) == 0
    theirs = torch.load(dst, map_location="cpu", weights_only=True)  # the pack's own call
    resampler = resampler_mod.TimeResampler(dim=dim, depth=4, dim_head=64, heads=dim // 64, num_queries=64,
                                            embedding_dim=1152, output_dim=hidden, ff_mult=4, timestep_in_dim=32,
                                            timestep_flip_sin_to_cos=True, timestep_freq_shift=0).eval()
    resampler.load_state_dict(theirs["image_proj"])
    n_procs = len({k.split(".")[0] for k in theirs["ip_adapter"]})
    procs = torch.nn.ModuleList(sd3_peer.IPAttnProcessor(hidden_size=hidden, cross_attention_dim=hidden,
                                                         ip_hidden_states_dim=hidden, ip_encoder_hidden_states_dim=hidden,
                                                         head_dim=64, timesteps_emb_dim=dim) for _ in range(n_procs))
    procs.load_state_dict(theirs["ip_adapter"])
    assert n_procs == blocks
    ours = load_adapter(dst)
    assert torch.equal(procs[blocks - 1].to_k_ip.weight, ours.blocks[blocks - 1].to_k_ip.weight)
    embeds = torch.randn(2, 5, 1152, generator=torch.Generator().manual_seed(13))
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        tokens = resampler(embeds, t)
        mine, _ = ours.image_proj(embeds, t)
    torch.testing.assert_close(tokens, mine, rtol=0, atol=1e-5)
