"""The offline demo: train a fused-mode adapter on the five embedded photos with a tiny random backbone,
then sample with it in scaled and fused mode. It checks the whole pipeline in about a minute on a CPU;
with random weights the pictures are noise-like by design.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .adapter.formats import atomic_write
from .plot import plot_losses
from .training.data import clip_pixels, load_dataset
from .training.train import TrainConfig, train

logger = logging.getLogger(__name__)

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
REAL_MODEL_COMMAND = (
    "python -m ipa_train train --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 "
    "--image-encoder PATH/TO/CLIP-ViT-H-14 (e.g. h94/IP-Adapter models/image_encoder) --data YOUR_IMAGES/ "
    "--output runs/my-adapter --name my-ip-adapter --projection plus --steps 20000 --batch-size 8 "
    "--resolution 512 --mixed-precision fp16   (multi-GPU: accelerate launch -m ipa_train train ...)"
)


@dataclass
class DemoResult:
    adapter: Path
    loss_plot: Path
    samples: list[Path]
    losses: list[float]
    seconds: float


def _save_image(x: torch.Tensor, path: Path, scale: int = 2) -> Path:
    """[3, H, W] in [0, 1] -> PNG (nearest upscaling so the tiny samples are visible)."""
    arr = (x.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def run_demo(output_dir: str | Path = "demo_output", steps: int = 120, seed: int = 0,
             sample_steps: int = 12) -> DemoResult:
    """Train on the embedded photos with a tiny random backbone; write adapter, loss plot and samples.

    Args:
        output_dir: folder for `demo-ip-adapter.safetensors`, `loss.png` and `samples/`.
        steps: training steps (each a batch of 2 at 64 px).
        sample_steps: DDIM steps per sample.
    """
    from .hosts.backbone_diffusers import DiffusersBackbone, generate
    from .toy.tiny import tiny_components

    started = time.perf_counter()
    out = Path(output_dir)
    logger.warning("demo: the backbone is a tiny RANDOMLY INITIALISED Stable-Diffusion-architecture model. "
                   "This run checks the pipeline (data, training, checkpoints, export, sampling), not image quality.")
    with tempfile.TemporaryDirectory() as tmp:
        components = tiny_components(Path(tmp) / "tokenizer", seed=seed)
    backbone = DiffusersBackbone(components=components, device="cpu", keep_encoders=True)
    dataset = load_dataset(DEMO_DATA, resolution=64)
    config = TrainConfig(output_dir=str(out), name="demo-ip-adapter", projection="plain", fusion=True, steps=steps,
                         batch_size=2, lr=1e-3, seed=seed, save_every=max(1, steps // 2), log_every=max(1, steps // 6),
                         resolution=64, drop_image=0.05, drop_text=0.05, drop_both=0.05)
    result = train(config, backbone, dataset)
    plot = plot_losses(result.losses, out / "loss.png", title="demo loss (random backbone)")
    samples = []
    refs = [i for i, s in enumerate(dataset.samples) if s.path.stem in ("chelsea", "astronaut")] or [0]
    for i in refs:
        pixels = clip_pixels(dataset.open(i))[None]  # [1, 3, 224, 224]
        prompt = dataset.caption(i)
        for mode in ("scaled", "fused"):
            img = generate(backbone, result.adapter, pixels, [prompt], mode=mode, steps=sample_steps, size=64, seed=seed)
            samples.append(_save_image(img[0], out / "samples" / f"{dataset.samples[i].path.stem}_{mode}.png"))
    seconds = time.perf_counter() - started
    assert result.adapter_path is not None
    logger.info("demo finished in %.0f s: loss %.4f -> %.4f (mean of first/last 10 steps)", seconds,
                sum(result.losses[:10]) / len(result.losses[:10]), sum(result.losses[-10:]) / len(result.losses[-10:]))
    return DemoResult(result.adapter_path, plot, samples, result.losses, seconds)
