#!/usr/bin/env python3
"""Cost of our patch on a sampling step: SD1.5-architecture UNet (random fp32 weights) at 128x128 on CPU.

Prints s/step for the unpatched model and with our plain and plus adapters applied (cfg batch of 2, one
cond and one uncond chunk, exactly what a KSampler step runs), and the overhead ratios, from one run.
Needs a ComfyUI checkout: COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_apply.py [--steps N]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
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


def one_step(patcher, x, sigma, ctx) -> float:
    to = dict(patcher.model_options["transformer_options"])
    to.update(cond_or_uncond=[0, 1], sigmas=sigma, wrappers=patcher.wrappers)
    with torch.inference_mode():
        t0 = time.perf_counter()
        patcher.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comfy, apply_mod = boot_comfy()
    from diffusers import UNet2DConditionModel

    from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
    from ipa_train.adapter.modules import IPAdapter
    from ipa_train.hosts.comfy_patch import encode_embeds
    from ipa_train.hosts.diffusers_unet import unet_layer_hidden_sizes

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).eval()
    hidden = tuple(unet_layer_hidden_sizes(unet))
    patcher = comfy.sd.load_diffusion_model_state_dict(unet.state_dict(), model_options={"dtype": torch.float32})
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
    # Round-robin, so that drift in machine load hits every configuration alike; the first round warms up.
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.steps + 1):
        for name, m in models.items():
            t = one_step(m, x, sigma, ctx)
            if i:
                times[name].append(t)
    base = statistics.median(times["unpatched"])
    rows = [(name, statistics.median(ts), statistics.median(ts) / base) for name, ts in times.items()]
    print(f"SD1.5-architecture UNet, 128x128, cfg batch 2, fp32, {args.threads} threads, median of {args.steps} steps")
    print(f"{'model':<16} {'s/step':>8} {'vs unpatched':>13}")
    for name, t, r in rows:
        print(f"{name:<16} {t:8.3f} {100 * (r - 1):+12.1f}%")
    print("target: at most +10% (the community pack adds 26-49% here, per the issue)")


if __name__ == "__main__":
    main()
