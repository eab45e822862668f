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
