"""Flux and SD3 rows of bench_apply.py: the cost of our `dit` block patches on a sampling step, next to the
unpatched model and the peer packs that run here, on small random models in ComfyUI's own classes.

The models are wider than the host tests' (hidden 256, 1024 image + 64 text tokens, cfg batch 2) so that a step is
the blocks' math rather than Python overhead; the adapters are random files in the official layouts
(tests/dit_factories.py). The image K/V of Flux are computed once per apply (cached per block, device and dtype);
the SD3.5 resampler runs once per step and cond/uncond side (cached by sigma), as in sampling. The SD3 rows also
time diffusers' own InstantX processor against its plain one on the same weights (the reference's cost of the same
math), and are repeated on a wider model (SD3_WIDE) whose proportions are closer to SD3.5 Large's.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

FLUX_SIZES = dict(hidden=256, heads=2, depth=2, single=4, context=256, pooled=256, axes=(16, 56, 56))
SD3_SIZES = dict(hidden=256, heads=4, depth=4, context=256, pooled=256, pos_max=32)
# closer to SD3.5 Large's proportions (width 2432, 4096 image + 333 prompt tokens at 1024 px: 1.8 tokens per channel
# of width; the rows above have 4.2): the share of the adapter's second attention falls with that ratio
SD3_WIDE = dict(hidden=512, heads=8, depth=8, context=256, pooled=256, pos_max=32)
ROOT = Path(__file__).resolve().parent.parent
LATENT = 64  # 512 px image -> 64x64 latent -> 32x32 = 1024 patches
TXT = 64


def flux_step(x, ctx, y, clock: Callable[[], float]) -> Callable:
    def step(patcher) -> float:
        to = dict(patcher.model_options.get("transformer_options", {}))
        to.update(cond_or_uncond=[0, 1], sigmas=torch.full((2,), 0.62))
        with torch.inference_mode(), _patched(patcher):
            t0 = clock()
            patcher.model.diffusion_model(x, torch.full((2,), 0.62), ctx, y=y, guidance=torch.full((2,), 3.5),
                                          transformer_options=to)
            return clock() - t0
    return step


@contextlib.contextmanager
def _patched(patcher):
    """The Shakker pack's object patches swap modules of the model all clones share: applied around its own steps
    only (outside the clock), so the other models run the model as it is."""
    if not isinstance(patcher, ObjectPatched):
        yield
        return
    patcher.patch_model()
    try:
        yield
    finally:
        patcher.unpatch_model()


def sd3_step(x, ctx, y, clock: Callable[[], float], new_sigma: bool = True, embeds=None) -> Callable:
    """embeds: the SigLIP outputs (cond, uncond) that a diffusers model among the models is given (diffusers projects
    them in its forward, every call)."""
    calls = itertools.count()

    def step(patcher) -> float:
        # new_sigma: a new sigma on every call, as in sampling, so the resampler (cached by sigma) runs on each step;
        # otherwise the blocks alone are timed
        sigma = torch.full((2,), 0.9 - 0.001 * next(calls) * new_sigma)
        if isinstance(patcher, torch.nn.Module):
            return _diffusers_step(patcher, x, ctx, y, sigma, clock, embeds)
        to = dict(patcher.model_options.get("transformer_options", {}))
        to.update(cond_or_uncond=[0, 1], sigmas=sigma)
        with torch.inference_mode():  # ComfyUI's SD3 timestep is sigma * 1000
            t0 = clock()
            patcher.model.diffusion_model(x, sigma * 1000, y=y, context=ctx, transformer_options=to)
            return clock() - t0
    return step


def _diffusers_step(ref, x, ctx, y, sigma, clock, embeds) -> float:
    kwargs = {"ip_adapter_image_embeds": embeds} if getattr(ref, "image_proj", None) is not None else None
    with torch.inference_mode():
        t0 = clock()
        ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=sigma * 1000,
            joint_attention_kwargs=kwargs)
        return clock() - t0


def _test_module(rel: str):
    """A helper module of this repository's tests, by path (ComfyUI's own `tests` package comes first on sys.path)."""
    name = "ipakit_bench_" + Path(rel).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / rel)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _adapter(nested):
    from ipa_train.adapter.dit_formats import detect_dit_config
    from ipa_train.adapter.dit_modules import build_dit_adapter
    fac = _test_module("tests/dit_factories.py")
    flat = fac.flat(nested)
    return build_dit_adapter(detect_dit_config(flat, "bench"), flat, "bench").eval()


def load_shakker():
    """The Shakker-Labs pack's (utils, attention_processor) modules from IPAKIT_PEERS_PATH, or a reason string."""
    root = Path(os.environ.get("IPAKIT_PEERS_PATH", "")) / "ComfyUI-IPAdapter-Flux"
    if not (root / "utils.py").is_file():
        return "IPAKIT_PEERS_PATH has no ComfyUI-IPAdapter-Flux"
    name = "peer_shakker_ipadapter_flux"
    try:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:  # the peer does not import in this host
        return f"does not import here: {type(e).__name__}: {e}"
    return sys.modules[name + ".utils"], sys.modules[name + ".attention_processor"]


class ObjectPatched:
    """A ModelPatcher whose patches are object patches (applied by patch_model), not transformer options."""

    def __init__(self, patcher):
        self.model, self.model_options = patcher.model, patcher.model_options
        self.patch_model, self.unpatch_model = patcher.patch_model, patcher.unpatch_model


def shakker_model(patcher, nested, adapter, cond, blocks: int, f: dict):
    shakker = load_shakker()
    if isinstance(shakker, str):
        return shakker
    utils, procs_mod = shakker
    tokens = adapter.image_proj(cond).detach()
    procs = {}
    for j in range(blocks):
        name = f"double_blocks.{j}" if j < f["depth"] else f"single_blocks.{j - f['depth']}"
        p = procs_mod.IPAFluxAttnProcessor2_0(f["hidden"], f["context"], scale=1.0, num_tokens=tokens.shape[1])
        p.to_k_ip.weight.data.copy_(nested["ip_adapter"][f"{j}.to_k_ip.weight"])
        p.to_v_ip.weight.data.copy_(nested["ip_adapter"][f"{j}.to_v_ip.weight"])
        procs[name] = p
    theirs = patcher.clone()
    utils.FluxUpdateModules(theirs, procs, tokens, False)
    return ObjectPatched(theirs)


def _model_and_inputs(comfy, builder: str, sizes: dict, seed: int, with_reference: bool = False):
    """(ModelPatcher, generator, x, context, pooled) of a cfg batch of 2 on a random model from dit_models, and the
    diffusers model with the same weights first when with_reference."""
    ref, patcher = getattr(_test_module("tests/host/dit_models.py"), builder)(comfy, sizes=sizes)
    g = torch.Generator().manual_seed(seed)
    out = (patcher, g, torch.randn(2, 16, LATENT, LATENT, generator=g),
           torch.randn(2, TXT, sizes["context"], generator=g), torch.randn(2, sizes["pooled"], generator=g))
    return (ref, *out) if with_reference else out


def flux_rows(comfy, steps: int, clock, round_robin) -> None:
    from ipa_train.hosts.comfy.dit import DitEmbeds
    from ipa_train.hosts.comfy.dit_apply import apply_dit

    fac, f = _test_module("tests/dit_factories.py"), FLUX_SIZES
    patcher, g, x, ctx, y = _model_and_inputs(comfy, "tiny_flux", f, 1)
    blocks = f["depth"] + f["single"]
    xl = _adapter(fac.xlabs_flux(hidden=f["hidden"], ctx=f["context"], tokens=16, blocks=f["depth"]))
    nested = fac.instantx_flux(hidden=f["hidden"], ctx=f["context"], tokens=128, blocks=blocks)
    ix = _adapter(nested)
    vit, sig = torch.randn(1, 768, generator=g), torch.randn(1, 1152, generator=g)
    models = {"unpatched": patcher,
              "xlabs v2 (16 tok)": apply_dit(patcher, xl, DitEmbeds(vit, torch.zeros_like(vit), "xlabs-flux")),
              "instantx (128 tok)": apply_dit(patcher, ix, DitEmbeds(sig, torch.zeros_like(sig), "instantx-flux"))}
    peer = shakker_model(patcher, nested, ix, sig, blocks, f)
    if not isinstance(peer, str):
        models["instantx, Shakker pack"] = peer
    times = round_robin(models, steps, flux_step(x, ctx, y, clock))
    _table(f"Flux, hidden {f['hidden']}, {f['depth']} double + {f['single']} single blocks", times, steps)
    if isinstance(peer, str):
        print(f"Shakker pack (InstantX): not run, {peer}")
    print("x-flux-comfyui (XLabs): not run; it swaps in x-flux blocks whose forward lacks the attn_mask / "
          "transformer_options arguments ComfyUI 0.8.0 passes, so it samples only through its own XlabsSampler")


def sd3_rows(comfy, steps: int, clock, round_robin) -> None:
    for sizes, same_sigma_too in ((SD3_SIZES, True), (SD3_WIDE, False)):
        _sd3_model_rows(comfy, sizes, steps, clock, round_robin, same_sigma_too)
    print("ComfyUI-InstantX-IPAdapter-SD3: not run; it hard-codes SD3.5 Large's widths (2432, resampler 1280) and "
          "fp16, so it cannot load a small model")


def _sd3_model_rows(comfy, s: dict, steps: int, clock, round_robin, same_sigma_too: bool) -> None:
    """Ours against the unpatched model, and diffusers' own InstantX processor against diffusers' plain one on the
    same weights (the reference's cost of the same math, with PyTorch SDPA as the model's attention)."""
    from ipa_train.hosts.comfy.dit import DitEmbeds
    from ipa_train.hosts.comfy.dit_apply import apply_dit

    fac = _test_module("tests/dit_factories.py")
    ref, patcher, g, x, ctx, y = _model_and_inputs(comfy, "tiny_sd3", s, 2, with_reference=True)
    state = fac.instantx_sd3(hidden=s["hidden"], head_dim=s["hidden"] // s["heads"], tokens=64, blocks=s["depth"],
                             dim=128, depth=4, temb_in=32)
    ad = _adapter(state)
    cond = torch.randn(1, 729, 1152, generator=g)
    ref_ip = _diffusers_instantx(ref, state)
    models = {"unpatched": patcher,
              "instantx (64 tok)": apply_dit(patcher, ad, DitEmbeds(cond, torch.zeros_like(cond), "instantx-sd3")),
              "diffusers, unpatched": ref,
              "diffusers, instantx": ref_ip}
    bases = {"diffusers, instantx": "diffusers, unpatched"}
    where = f"SD3 (MMDiT), hidden {s['hidden']}, {s['depth']} joint blocks"
    embeds = torch.cat([cond, torch.zeros_like(cond)])
    _table(f"{where}, a new sigma each step", round_robin(models, steps, sd3_step(x, ctx, y, clock, embeds=embeds)),
           steps, bases)
    if same_sigma_too:
        del models["diffusers, unpatched"], models["diffusers, instantx"]  # diffusers projects the image every call
        _table(f"{where}, the same sigma each step (resampler cached: the joint blocks' cost alone)",
               round_robin(models, steps, sd3_step(x, ctx, y, clock, new_sigma=False)), steps)
        with torch.inference_mode():
            t0 = clock()
            ad.image_proj(embeds, torch.full((2,), 700.0))
            print(f"the resampler alone (cond + uncond, 729 SigLIP tokens): {clock() - t0:.4f} s, a fixed cost per "
                  "step that does not grow with the model or the image")


def _diffusers_instantx(ref, state: dict):
    """A copy of the diffusers model with the adapter loaded by diffusers' own loader (scale 1, as our weight 1)."""
    ref_ip = copy.deepcopy(ref)
    ref_ip._load_ip_adapter_weights(state, low_cpu_mem_usage=False)
    for proc in ref_ip.attn_processors.values():
        proc.scale = 1.0
    return ref_ip


def _table(title: str, times: dict[str, float], steps: int, bases: dict[str, str] | None = None) -> None:
    """bases: row -> the row it is compared with (default: "unpatched"; a base row is compared with itself)."""
    bases = {**{b: b for b in (bases or {}).values()}, **(bases or {})}
    print(f"\n{title}, {LATENT * 8}x{LATENT * 8}, cfg batch 2, fp32, fastest of {steps} steps")
    print(f"{'model':<24} {'s/step':>8} {'vs unpatched':>13}")
    for name, t in times.items():
        print(f"{name:<24} {t:8.4f} {100 * (t / times[bases.get(name, 'unpatched')] - 1):+12.1f}%")
