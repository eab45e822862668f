"""Seconds per training step and peak RSS: our `train()` against the reference training step.

    python benchmarks/bench_train.py [--reference-repo PATH] [--steps 3] [--threads 2] [--resolution 128]
    python benchmarks/bench_train.py --variants flux sd3 --resolution 256   # the Flux / SD3.5 rows

Flux (XLabs format) and SD3.5 (InstantX format) rows: `bench_train_dit.py` (tiny-but-not-trivial transformers,
ours against a plain-PyTorch loop of the same math with diffusers' IP-Adapter classes; see there).

The base model is SD1.5-architecture with random weights, built offline from configs: the full-size UNet,
VAE and CLIP ViT-L/14 text encoder, and a CLIP ViT-H/14 image encoder (the one the SD1.5 adapters use).
Batch 1, fp32, CPU. Each measurement runs in its own process, so peak RSS (ru_maxrss) is its own.

With `--reference-repo` (a checkout of tencent-ailab/IP-Adapter; nothing of it is copied here) the
reference step runs from that folder: its `IPAdapter`, `ImageProjModel`/`Resampler` and `IPAttnProcessor2_0`
modules, with the loop body of `tutorial_train.py` / `tutorial_train_plus.py` (VAE encode, text and image
encoders, UNet forward/backward, AdamW step every step, every model loaded at once). Without it, the
documented reference figures are printed instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED = {"plain": {"s_per_step": 3.9, "peak_rss_gb": 8.05}, "plus": {"s_per_step": 4.25, "peak_rss_gb": 8.05}}
TARGET_RATIO = 0.5
TARGET_RSS_GB = {"plain": 4.2, "plus": 4.7}  # encoders released before the UNet loads: max(encoders, UNet)
DIT = ("flux", "sd3")  # no RSS bar: their reference is measured in the same run


# --------------------------------------------------------------------------------------------------------
# Full-size SD1.5-architecture components, random weights


def sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        sample_size=512, scaling_factor=0.18215,
    )


def sd15_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))


def vit_h_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
        image_size=224, projection_dim=1024, hidden_act="gelu"))


def tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from ipa_train.toy.tiny import write_tokenizer

    return CLIPTokenizer.from_pretrained(str(write_tokenizer(folder, max_length=77)))


def scheduler():
    from ipa_train.toy.tiny import tiny_scheduler

    return tiny_scheduler("epsilon")


def make_images(folder: Path, n: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo number {i}")
    return folder


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


# --------------------------------------------------------------------------------------------------------
# Workers


def run_ours(variant: str, steps: int, warmup: int, resolution: int) -> dict:
    import torch

    from ipa_train.hosts.backbone_diffusers import DiffusersBackbone
    from ipa_train.training.data import load_dataset
    from ipa_train.training.train import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="bench_ours_"))
    torch.manual_seed(0)
    if variant in DIT:
        from bench_train_dit import run_ours as run_dit

        out = run_dit(variant, steps, warmup, resolution, tokenizer(tmp / "tokenizer"), make_images(tmp / "data"))
        return {"impl": "ours", "variant": variant, **out, "peak_rss_gb": peak_rss_gb()}
    backbone = DiffusersBackbone(device="cpu", components={"scheduler": scheduler()}, factories={
        "unet": sd15_unet, "vae": sd15_vae, "text_encoder": sd15_text_encoder, "image_encoder": vit_h_image_encoder,
        "tokenizer": lambda: tokenizer(tmp / "tokenizer")})
    dataset = load_dataset(make_images(tmp / "data"), resolution=resolution)
    stamps: list[float] = []
    cfg = TrainConfig(output_dir=str(tmp / "out"), projection=variant, steps=warmup + steps, batch_size=1,
                      resolution=resolution, save_every=0, log_every=0)
    started = time.perf_counter()
    train(cfg, backbone, dataset, progress=lambda s, n, loss: stamps.append(time.perf_counter()))
    times = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])] if warmup else [stamps[0] - started]
    return {"impl": "ours", "variant": variant, "s_per_step": statistics.median(times), "steps_timed": len(times),
            "peak_rss_gb": peak_rss_gb()}


def _reference_modules(repo: Path, variant: str):
    sys.path.insert(0, str(repo))
    import diffusers.pipelines.controlnet as controlnet_pipelines
    from diffusers.models.controlnets import MultiControlNetModel

    # newer diffusers moved MultiControlNetModel; the reference package imports it from the old place
    controlnet_pipelines.MultiControlNetModel = MultiControlNetModel
    script = __import__("tutorial_train" if variant == "plain" else "tutorial_train_plus")
    from ip_adapter.attention_processor import AttnProcessor2_0, IPAttnProcessor2_0

    return script, AttnProcessor2_0, IPAttnProcessor2_0


def _reference_adapter(unet, image_encoder, variant: str, repo: Path):
    """The reference's model set-up (tutorial_train*.py main): projection, IP processors initialised from to_k/to_v."""
    import torch

    script, attn_cls, ip_cls = _reference_modules(repo, variant)
    if variant == "plain":
        from ip_adapter.ip_adapter import ImageProjModel

        proj = ImageProjModel(cross_attention_dim=768, clip_embeddings_dim=image_encoder.config.projection_dim,
                              clip_extra_context_tokens=4)
        tokens = 4
    else:
        from ip_adapter.resampler import Resampler

        proj = Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16,
                         embedding_dim=image_encoder.config.hidden_size, output_dim=768, ff_mult=4)
        tokens = 16
    procs, sd, widths = {}, unet.state_dict(), unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = attn_cls()
            continue
        block = name.split(".")[0]
        hidden = widths[-1] if block == "mid_block" else (
            list(reversed(widths))[int(name.split(".")[1])] if block == "up_blocks" else widths[int(name.split(".")[1])])
        kwargs = {"num_tokens": tokens} if variant == "plus" else {}
        procs[name] = ip_cls(hidden_size=hidden, cross_attention_dim=768, **kwargs)
        layer = name[: -len(".processor")]
        procs[name].load_state_dict({"to_k_ip.weight": sd[layer + ".to_k.weight"], "to_v_ip.weight": sd[layer + ".to_v.weight"]})
    unet.set_attn_processor(procs)
    modules = torch.nn.ModuleList(unet.attn_processors.values())
    return script.IPAdapter(unet, proj, modules), list(proj.parameters()) + list(modules.parameters())


def run_reference(variant: str, steps: int, warmup: int, resolution: int, repo: Path | None) -> dict:
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import CLIPImageProcessor

    from ipa_train.training.data import target_pixels

    tmp = Path(tempfile.mkdtemp(prefix="bench_ref_"))
    torch.manual_seed(0)
    if variant in DIT:
        from bench_train_dit import run_reference as run_dit

        out = run_dit(variant, steps, warmup, resolution, tokenizer(tmp / "tokenizer"), make_images(tmp / "data"))
        return {"impl": "reference", "variant": variant, **out, "peak_rss_gb": peak_rss_gb()}
    unet, vae, text_encoder, image_encoder = sd15_unet(), sd15_vae(), sd15_text_encoder(), vit_h_image_encoder()
    tok, sched = tokenizer(tmp / "tokenizer"), scheduler()
    for m in (unet, vae, text_encoder, image_encoder):
        m.requires_grad_(False)
    ip_adapter, params = _reference_adapter(unet, image_encoder, variant, repo)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    img = Image.open(make_images(tmp / "data", 1) / "0.png").convert("RGB")
    images = target_pixels(img, resolution)[None]  # the reference's Resize/CenterCrop/Normalize target
    clip_images = CLIPImageProcessor()(images=img, return_tensors="pt").pixel_values
    ids = tok("a photo number 0", max_length=tok.model_max_length, padding="max_length", truncation=True,
              return_tensors="pt").input_ids
    stamps = []
    for _ in range(warmup + steps):  # the loop body of tutorial_train*.py, batch 1, no drop
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (1,)).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            if variant == "plain":
                image_embeds = image_encoder(clip_images).image_embeds
            else:
                image_embeds = image_encoder(clip_images, output_hidden_states=True).hidden_states[-2]
        with torch.no_grad():
            ehs = text_encoder(ids)[0]
        pred = ip_adapter(noisy, timesteps, ehs, image_embeds)
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    times = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    return {"impl": "reference", "variant": variant, "s_per_step": statistics.median(times), "steps_timed": len(times),
            "peak_rss_gb": peak_rss_gb()}


# --------------------------------------------------------------------------------------------------------
# Driver


def _spawn(args: argparse.Namespace, impl: str, variant: str) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", f"{impl}:{variant}", "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--threads", str(args.threads), "--resolution", str(args.resolution)]
    if args.reference_repo:
        cmd += ["--reference-repo", args.reference_repo]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(args.threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        sys.stderr.write(f"{impl}/{variant} failed:\n{r.stderr[-3000:]}\n")
        return None
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-repo", default=None, help="checkout of tencent-ailab/IP-Adapter to run the reference step")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--variants", nargs="+", default=["plain", "plus"], choices=["plain", "plus", *DIT])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        impl, variant = args.worker.split(":")
        if impl == "ours":
            out = run_ours(variant, args.steps, args.warmup, args.resolution)
        else:
            repo = Path(args.reference_repo) if args.reference_repo else None
            out = run_reference(variant, args.steps, args.warmup, args.resolution, repo)
        print(json.dumps(out))  # noqa: T201 - the worker's result line, read by the driver
        return 0

    rows = []
    for variant in args.variants:
        ours = _spawn(args, "ours", variant)
        ref = _spawn(args, "reference", variant) if args.reference_repo or variant in DIT else None
        source = "measured" if ref else "documented"
        ref = ref or {"impl": "reference", "variant": variant, **DOCUMENTED[variant]}
        rows.append((variant, ours, ref, source))
    print(f"{'/'.join(args.variants)} (random weights), {args.resolution}x{args.resolution}, batch 1, fp32, "  # noqa: T201
          f"{args.threads} threads; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'variant':<8}{'ours s/step':>13}{'ref s/step':>12}{'ratio':>8}{'ours RSS GB':>13}{'ref RSS GB':>12}  reference")  # noqa: T201
    ok = True
    for variant, ours, ref, source in rows:
        if ours is None:
            ok = False
            continue
        ratio = ours["s_per_step"] / ref["s_per_step"]
        ok &= ratio <= TARGET_RATIO and ours["peak_rss_gb"] <= TARGET_RSS_GB.get(variant, ref["peak_rss_gb"])
        print(f"{variant:<8}{ours['s_per_step']:>13.2f}{ref['s_per_step']:>12.2f}{ratio:>8.2f}"  # noqa: T201
              f"{ours['peak_rss_gb']:>13.2f}{ref['peak_rss_gb']:>12.2f}  {source}")
    bars = ", ".join(f"{v} {TARGET_RSS_GB[v]} GB" if v in TARGET_RSS_GB else f"{v} <= the reference's"
                     for v in args.variants)
    print(f"target: ours <= {TARGET_RATIO:.0%} of the reference per step and peak RSS <= {bars}: "  # noqa: T201
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
