#!/usr/bin/env python3
"""Cost of our patch on a sampling step: SD1.5-architecture UNet (random fp32 weights) at 128x128 on CPU.

Prints s/step (`--dtype fp16` / `bf16`: the UNet computing in half precision) for the unpatched model and with our plain and plus adapters applied (cfg batch of 2, one
cond and one uncond chunk, exactly what a KSampler step runs), and the overhead ratios, from one run. Then, for
every weight type, our plain adapter next to the community pack's node (cubiq/ComfyUI_IPAdapter_plus, when
IPADAPTER_PLUS_PATH names a checkout) with the same adapter file, each against the unpatched model measured in
the same round-robin. Then the Flux and SD3 rows (bench_dit.py): small random DiTs in ComfyUI's classes, our
XLabs / InstantX patches against the unpatched model and the peer packs that run here (IPAKIT_PEERS_PATH).
Needs a ComfyUI checkout: COMFYUI_PATH=/path/to/ComfyUI [IPADAPTER_PLUS_PATH=...] [IPAKIT_PEERS_PATH=...]
python benchmarks/bench_apply.py [--families sd15,flux,sd3]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def boot_comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.sd
    import utils.extra_config  # noqa: F401

    spec = importlib.util.spec_from_file_location("ipadapter_kit", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    kit = importlib.util.module_from_spec(spec)
    sys.modules["ipadapter_kit"] = kit
    spec.loader.exec_module(kit)
    return comfy, importlib.import_module("ipadapter_kit.nodes.apply")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLOCK = time.process_time


def one_step(patcher, x, sigma, ctx) -> float:
    to = dict(patcher.model_options["transformer_options"])
    to.update(cond_or_uncond=[0, 1], sigmas=sigma, wrappers=patcher.wrappers)
    with torch.inference_mode():
        t0 = CLOCK()
        patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
        return CLOCK() - t0


def load_community_pack():
    """The community pack's IPAdapterPlus module, or None when IPADAPTER_PLUS_PATH is not set."""
    path = os.environ.get("IPADAPTER_PLUS_PATH")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("cubiq_ipadapter_plus", Path(path) / "__init__.py",
                                                  submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cubiq_ipadapter_plus"] = module
    spec.loader.exec_module(module)
    return sys.modules["cubiq_ipadapter_plus.IPAdapterPlus"], sys.modules["cubiq_ipadapter_plus.utils"]


def round_robin(models: dict, steps: int, step) -> dict[str, float]:
    """Fastest step of each model (the one least disturbed by other load), stepping the models in turn so that
    load drift hits all alike; round 0 warms up. step(model) -> seconds."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 1):
        for name, m in models.items():
            t = step(m)
            if i:
                times[name].append(t)
    return {k: min(v) for k, v in times.items()}


def weight_type_table(patcher, apply_mod, adapter, clip, steps, x, sigma, ctx, tmp) -> None:
    """Every weight type: ours and the community pack's, each with the unpatched model in the same round-robin."""
    from ipa_train import save_adapter
    from ipa_train.adapter.weight_types import WEIGHT_TYPES
    from ipa_train.hosts.comfy.unet import encode_embeds

    community = load_community_pack()
    theirs_file = None
    if community is not None:
        theirs_file = community[1].ipadapter_model_loader(str(save_adapter(adapter, Path(tmp) / "plain.safetensors")))
    embeds = encode_embeds(adapter, clip, torch.zeros_like(clip))
    print(f"\nweight types, plain adapter, weight 1.0, V only; fastest of {steps} steps, each vs unpatched in its own round")
    print(f"{'weight type':<30} {'ours s/step':>11} {'ours':>8} {'community s/step':>16} {'community':>10}")
    for weight_type in WEIGHT_TYPES:
        models = {"unpatched": patcher,
                  "ours": apply_mod.apply(patcher, adapter, embeds, "scaled", 1.0, weight_type=weight_type)}
        if community is not None:
            models["community"] = community[0].ipadapter_execute(
                patcher.clone(), theirs_file, None, pos_embed=clip, neg_embed=torch.zeros_like(clip), weight=1.0,
                weight_type=weight_type)[0]
        med = round_robin(models, steps, lambda m: one_step(m, x, sigma, ctx))
        base = med["unpatched"]
        theirs = (f"{med['community']:16.3f} {100 * (med['community'] / base - 1):+9.1f}%" if community is not None
                  else f"{'-':>16} {'-':>10}")
        print(f"{weight_type:<30} {med['ours']:11.3f} {100 * (med['ours'] / base - 1):+7.1f}% {theirs}")
        del models
    print("target: at most +10% for ours. The community pack never runs its middle-block layer (its key is not one "
          "ComfyUI calls), which saves it one of the 16 layers here.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types-steps", type=int, default=4, help="steps per weight type (0 skips the weight-type table)")
    ap.add_argument("--families", default="sd15,flux,sd3",
                    help="comma-separated: sd15 (the UNet rows and weight-type table), flux, sd3 (small random DiTs, "
                         "ours against unpatched and the peer packs that run here; IPAKIT_PEERS_PATH names them)")
    ap.add_argument("--dit-steps", type=int, default=5, help="steps per model in the Flux / SD3 rows")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="the UNet's weight and compute dtype (fp16/bf16: as ComfyUI runs them on a GPU; on CPU the "
                         "compute is forced to that dtype too, where ComfyUI itself would pick fp32)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall: elapsed time (use on an idle machine); cpu: this process's CPU time, which other "
                         "load on a shared machine hardly moves (use with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    comfy, apply_mod = boot_comfy()
    families = {f.strip() for f in args.families.split(",") if f.strip()}
    if "sd15" in families:
        sd15_rows(comfy, apply_mod, args)
    from bench_dit import flux_rows, sd3_rows

    for family, rows in (("flux", flux_rows), ("sd3", sd3_rows)):
        if family in families:
            rows(comfy, args.dit_steps, CLOCK, round_robin)
    print("target: at most +10% for ours")


def sd15_rows(comfy, apply_mod, args) -> None:
    from diffusers import UNet2DConditionModel

    from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
    from ipa_train.adapter.modules import IPAdapter
    from ipa_train.hosts.comfy.unet import encode_embeds
    from ipa_train.hosts.diffusers_unet import unet_layer_hidden_sizes

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    hidden = tuple(unet_layer_hidden_sizes(unet))
    dtype = DTYPES[args.dtype]
    patcher = comfy.sd.load_diffusion_model_state_dict(unet.state_dict(), model_options={"dtype": dtype})
    patcher.model.manual_cast_dtype = None  # compute in the weights' dtype (ComfyUI's choice on a GPU)
    del unet
    x = torch.randn(2, 4, 16, 16)  # 128x128 image -> 16x16 latent; cond + uncond
    ctx = torch.randn(2, 77, 768)
    sigma = torch.tensor([5.0, 5.0])
    adapters = {
        "plain": (AdapterConfig("plain", 4, 1024, 768, hidden), torch.randn(1, 1024)),
        "plus": (AdapterConfig("plus", 16, 1280, 768, hidden, "penultimate",
                               resampler=ResamplerConfig(768, 4, 12, 64, 4)), torch.randn(1, 257, 1280)),
    }
    models = {"unpatched": patcher}
    for name, (cfg, clip) in adapters.items():
        adapter = IPAdapter(cfg).eval()
        embeds = encode_embeds(adapter, clip, torch.zeros_like(clip))
        for mode in ("scaled", "fused"):
            models[f"{name} {mode}"] = apply_mod.apply(patcher, adapter, embeds, mode, 1.0, 0.8)
    med = round_robin(models, args.steps, lambda m: one_step(m, x, sigma, ctx))
    base = med["unpatched"]
    print(f"SD1.5-architecture UNet, 128x128, cfg batch 2, {args.dtype}, {args.threads} threads, {args.clock} clock, "
          f"fastest of {args.steps} steps")
    print(f"{'model':<16} {'s/step':>8} {'vs unpatched':>13}")
    for name, t in med.items():
        print(f"{name:<16} {t:8.3f} {100 * (t / base - 1):+12.1f}%")
    print("target: at most +10%")
    if args.types_steps:
        import tempfile

        cfg, clip = adapters["plain"]
        adapter = IPAdapter(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            weight_type_table(patcher, apply_mod, adapter, clip, args.types_steps, x, sigma, ctx, tmp)


if __name__ == "__main__":
    main()
