"""InstantX Flux: ours against the Shakker-Labs pack (ComfyUI-IPAdapter-Flux, run in-process as an oracle from
IPAKIT_PEERS_PATH, never copied) on the same tiny Flux. That pack RMS-normalises the image values (`norm_added_v`),
which the published InstantX processor does not: the difference is measured and reported, and with that one norm
added to our keys/values the two agree."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import ipa_train.hosts.comfy.dit as dit_host
from ipa_train.adapter.dit_attention import INSTANTX_FLUX_K_EPS, rms_norm
from ipa_train.hosts.comfy.dit import DitEmbeds
from ipa_train.hosts.comfy.dit_apply import apply_dit

from .. import dit_factories as fac
from .dit_models import FLUX, tiny_flux
from .test_host_flux import _adapter, _inputs, comfy_out

PEERS = os.environ.get("IPAKIT_PEERS_PATH", "")


@pytest.fixture(scope="module")
def shakker(comfy):
    root = Path(PEERS) / "ComfyUI-IPAdapter-Flux"
    if not (root / "utils.py").is_file():
        pytest.skip(f"IPAKIT_PEERS_PATH={PEERS!r} has no ComfyUI-IPAdapter-Flux (the Shakker-Labs pack)")
    name = "peer_shakker_ipadapter_flux"
    if name not in sys.modules:
        try:
            spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as e:  # the peer does not import in this host: say why
            sys.modules.pop(name, None)
            pytest.skip(f"the Shakker-Labs pack does not import here: {type(e).__name__}: {e}")
    return sys.modules[name + ".utils"], sys.modules[name + ".attention_processor"]


def test_instantx_against_the_shakker_pack(comfy, shakker, monkeypatch):
    utils, procs_mod = shakker
    _, patcher = tiny_flux(comfy)
    blocks = FLUX["depth"] + FLUX["single"]
    state = fac.instantx_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=16, blocks=blocks, seed=6)
    adapter = _adapter(state)
    cond = torch.randn(1, 1152, generator=torch.Generator().manual_seed(7))
    tokens = adapter.image_proj(cond).detach()  # the pack applies one set of tokens to every row
    procs = {}
    for j in range(blocks):
        name = f"double_blocks.{j}" if j < FLUX["depth"] else f"single_blocks.{j - FLUX['depth']}"
        p = procs_mod.IPAFluxAttnProcessor2_0(FLUX["hidden"], FLUX["context"], scale=0.9, num_tokens=16)
        p.to_k_ip.weight.data.copy_(state["ip_adapter"][f"{j}.to_k_ip.weight"])
        p.to_v_ip.weight.data.copy_(state["ip_adapter"][f"{j}.to_v_ip.weight"])
        procs[name] = p
    theirs_model = patcher.clone()
    utils.FluxUpdateModules(theirs_model, procs, tokens, False)
    inp = _inputs()
    theirs_model.patch_model()
    try:
        theirs = comfy_out(theirs_model, **inp)
    finally:
        theirs_model.unpatch_model()

    ours_model = apply_dit(patcher, adapter, DitEmbeds(cond, cond, "instantx-flux"), weight=0.9)
    ours = comfy_out(ours_model, **inp)
    base = comfy_out(patcher, **inp)
    gap = (ours - theirs).abs().max().item()

    kv = dit_host.flux_image_kv

    def with_v_norm(block, toks, heads, fmt):
        k, v = kv(block, toks, heads, fmt)
        return k, rms_norm(v, INSTANTX_FLUX_K_EPS)

    monkeypatch.setattr(dit_host, "flux_image_kv", with_v_norm)
    ours_v = comfy_out(apply_dit(patcher, adapter, DitEmbeds(cond, cond, "instantx-flux"), weight=0.9), **inp)
    same = (ours_v - theirs).abs().max().item()
    print(f"InstantX vs Shakker pack: max |diff| {gap:.2e} (its RMS norm on V; adapter effect "
          f"{(ours - base).abs().max():.2e}); with that norm added to ours: {same:.2e}")
    assert gap > 1e-3  # the V norm is a real difference, not hidden
    assert same < 1e-4


def test_our_bin_loads_in_the_shakker_pack(comfy, shakker, tmp_path):
    """An InstantX Flux adapter converted to `.bin` (the pack reads only torch files) loads into the pack's own
    projection and processors with its strict `load_state_dict` calls, and its projection gives our tokens."""
    from ipa_train import load_adapter
    from ipa_train.cli import main

    utils, procs_mod = shakker
    flux_mod = sys.modules["peer_shakker_ipadapter_flux.ipadapter_flux"]
    blocks = FLUX["depth"] + FLUX["single"]
    state = fac.instantx_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=16, blocks=blocks,
                              proj_hidden=2 * 1152, seed=8)  # the pack's projection is 1152 -> 2304 -> tokens
    src = fac.write(state, tmp_path / "trained.safetensors")
    dst = tmp_path / "ipadapter-flux" / "trained.bin"
    assert main(["convert", str(src), str(dst)]) == 0
    theirs = torch.load(dst, map_location="cpu")  # the pack's own call
    proj = flux_mod.MLPProjModel(cross_attention_dim=FLUX["context"], id_embeddings_dim=1152, num_tokens=16)
    proj.load_state_dict(theirs["image_proj"], strict=True)
    procs = torch.nn.ModuleList(procs_mod.IPAFluxAttnProcessor2_0(FLUX["hidden"], FLUX["context"], num_tokens=16)
                                for _ in range(blocks))
    procs.load_state_dict(theirs["ip_adapter"], strict=True)
    cond = torch.randn(2, 1152, generator=torch.Generator().manual_seed(9))
    ours = load_adapter(dst)
    with torch.no_grad():
        torch.testing.assert_close(proj(cond), ours.image_proj(cond), rtol=0, atol=1e-6)
    assert torch.equal(procs[blocks - 1].to_v_ip.weight, ours.blocks[blocks - 1].to_v_ip.weight)
