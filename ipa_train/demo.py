"""The offline demo: the shapes world, a pretrained toy base model shipped with the package, and an adapter
that learns to carry the reference image's colour into the picture.

The adapter (plain projection by default, fusion weights trained at lambda 0.5) is trained on world images whose captions
leave the colour out ("a circle on a grey background"), so only the reference image can tell the model which
colour to draw. The demo then samples a
colourless prompt with a reference of each colour, without the adapter (weight 0), in scaled mode and in fused
mode, reads every sample with the oracle (pixel statistics, no CLIP) and reports how often the sample shows
the reference's colour. Chance is 1/8.

`run_random_demo` keeps the former smoke run: a tiny random SD-architecture backbone on the embedded photos.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
REAL_FLUX_COMMAND = (
    "python -m ipa_train train --base-model black-forest-labs/FLUX.1-dev --image-encoder "
    "openai/clip-vit-large-patch14 --format xlabs-flux --data YOUR_IMAGES/ --output runs/flux --resolution 512 "
    "--batch-size 4 --mixed-precision bf16 --gradient-checkpointing --steps 20000   (README: Training Flux and SD3.5)"
)
DEMO_PROMPT_SHAPE = "circle"
FUSED_LAMBDA = 0.8  # the published inference value of the fused mode
DEMO_STEPS = 600  # plain adapter: 95 % of samples show the reference colour after 400 steps (README)
DIT_DEMO_FORMAT = "xlabs-flux"  # --family flux: the adapter layout trained on the toy Flux model
DIT_DEMO_STEPS = 600
DIT_DEMO_TOKENS = 4
DIT_DEMO_LR = 1e-3
COLUMNS = (("no adapter", "scaled", 0.0, 1.0), ("scaled", "scaled", 1.0, 1.0),
           ("fused", "fused", 1.0, FUSED_LAMBDA))  # (column, mode, weight, lambda)


@dataclass
class DemoResult:
    adapter: Path
    loss_plot: Path
    samples: list[Path]
    losses: list[float]
    seconds: float
    grid: Path | None = None
    report: Path | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # column -> share of samples with the reference colour


def _save_image(x: torch.Tensor, path: Path, scale: int = 2) -> Path:
    """[3, H, W] in [0, 1] -> PNG (nearest upscaling so the tiny samples are visible)."""
    arr = (x.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path


def _demo_trials(seeds: int) -> list[Any]:
    """One reference per colour (shape and background vary), the same colourless prompt, `seeds` seeds each,
    for each column of the demo."""
    from .toy import world
    from .toy.experiment import Trial

    g = torch.Generator().manual_seed(7)
    refs = [world.random_scenes(1, g, colour=c)[0] for c in world.COLOURS]
    prompt = world.caption(world.Scene("red", DEMO_PROMPT_SHAPE, "grey", 16, 16, 20), colour=False)
    return [Trial(r, prompt, mode, weight, lam, seed)
            for _, mode, weight, lam in COLUMNS for seed in range(seeds) for r in refs]


def _sample_and_report(backbone: Any, adapter: Any, out: Path, seeds: int) -> tuple[list[Path], Path, dict[str, float],
                                                                                    list[dict[str, Any]]]:
    from .toy import world
    from .toy.experiment import run_trials
    from .toy.grid import draw_grid
    from .toy.oracle import read_batch

    trials = _demo_trials(seeds)
    images = run_trials(backbone, adapter, trials)
    readings = read_batch(images)
    ref_files: dict[world.Scene, str] = {}
    for scene in dict.fromkeys(t.reference for t in trials):
        name = f"references/{scene.colour}_{scene.shape}_{scene.background}.png"
        _save_image(world.render([scene])[0], out / name)
        ref_files[scene] = name
    entries, files = [], []
    per_column = len(trials) // len(COLUMNS)
    for i, (t, x, r) in enumerate(zip(trials, images, readings)):
        column = COLUMNS[i // per_column][0].replace(" ", "-")
        name = f"samples/{column}_{t.reference.colour}_seed{t.seed}.png"
        files.append(_save_image(x, out / name))
        entries.append({"file": name, "reference": ref_files[t.reference], "reference_colour": t.reference.colour,
                        "reference_shape": t.reference.shape, "prompt": t.prompt, "mode": t.mode,
                        "weight": t.weight, "lambda": t.fusion_lambda if t.mode == "fused" else None,
                        "seed": t.seed, "column": COLUMNS[i // per_column][0], "oracle": r.as_dict(),
                        "shows_reference_colour": r.colour == t.reference.colour})
    accuracy = {}
    for j, (column, *_rest) in enumerate(COLUMNS):
        part = entries[j * per_column:(j + 1) * per_column]
        accuracy[column] = sum(e["shows_reference_colour"] for e in part) / len(part)
    # The grid: first seed of each reference, one column per application.
    n_refs = len(world.COLOURS)
    rows = list(dict.fromkeys(t.reference for t in trials))
    cells = [[images[j * per_column + k] for j in range(len(COLUMNS))] for k in range(n_refs)]
    labels = [[f"reads {readings[j * per_column + k].colour}" for j in range(len(COLUMNS))] for k in range(n_refs)]
    heads = [f"{c} ({accuracy[c]:.0%})" if c == "no adapter" else
             f"{c} w=1{f' l={lam}' if mode == 'fused' else ''} ({accuracy[c]:.0%})" for c, mode, _w, lam in COLUMNS]
    grid = draw_grid(out / "grid.png", f'prompt: "{trials[0].prompt}"  (% = samples showing the reference colour)',
                     [world.render([s])[0] for s in rows], [s.colour for s in rows], heads, cells, labels)
    return files, grid, accuracy, entries


def run_demo(output_dir: str | Path = "demo_output", steps: int | None = None, seed: int = 0, seeds: int = 4,
             batch_size: int = 16, random_backbone: bool = False, sample_steps: int = 12,
             threads: int = 1, projection: str = "plain", family: str = "unet",
             format: str = DIT_DEMO_FORMAT) -> DemoResult:
    """Train a colour-carrying adapter on the shapes world with a shipped toy model (the UNet one with fused
    training, or with `family="flux"` the Flux one with an adapter of `format`); sample without it, in scaled
    mode and in fused mode (lambda 0.8); report what the oracle reads.

    Writes `<name>.safetensors`, `loss.png`, `grid.png`, `samples/*.png`, `references/*.png` and `report.json`.

    Args:
        steps: training steps (batch of `batch_size` 32 px images); None: the family's default.
        projection: "plus" (Resampler over the CLIP patch tokens) or "plain" (CLIP image_embeds).
        seeds: seeds per reference and column (8 references, 3 columns).
        random_backbone: run the former smoke demo instead (tiny random backbone, embedded photos).
        sample_steps: DDIM steps per sample of the random-backbone demo.
        threads: torch CPU threads while the toy demo runs. The toy model's operations are too small to gain
            from more than one, and a second thread that has to wait for a busy core makes them many times slower.
    """
    if random_backbone:
        return run_random_demo(output_dir, steps=steps or 120, seed=seed, sample_steps=sample_steps)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if family == "flux":
            options = {"format": format, "num_tokens": DIT_DEMO_TOKENS, "lr": DIT_DEMO_LR}
            return _run_toy_demo(Path(output_dir), steps or DIT_DEMO_STEPS, seed, seeds, batch_size, options)
        return _run_toy_demo(Path(output_dir), steps or DEMO_STEPS, seed, seeds, batch_size,
                             {"projection": projection, "fusion": True})
    finally:
        torch.set_num_threads(before)


def _run_toy_demo(out: Path, steps: int, seed: int, seeds: int, batch_size: int, options: dict[str, Any]) -> DemoResult:
    from .toy.experiment import train_world_adapter

    started = time.perf_counter()
    if "format" in options:
        from .toy.flux import toy_flux_backbone

        backbone = toy_flux_backbone(options["format"])
    else:
        from .toy.model import toy_backbone

        backbone = toy_backbone()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_world_adapter(backbone, tmp, attribute="colour", steps=steps, batch_size=batch_size, seed=seed,
                                     **options)
        assert result.adapter_path is not None
        adapter_path = out / "shapes-colour-ip-adapter.safetensors"
        atomic_write(adapter_path, lambda dst: Path(dst).write_bytes(result.adapter_path.read_bytes()))
    train_seconds = time.perf_counter() - started
    plot = plot_losses(result.losses, out / "loss.png", title="demo adapter loss (shapes world, colourless captions)")
    files, grid, accuracy, entries = _sample_and_report(backbone, result.adapter, out, seeds)
    seconds = time.perf_counter() - started
    report = {"prompt": entries[0]["prompt"], "accuracy_reference_colour": accuracy, "chance": 1 / 8,
              "base_model": "toy Flux (shapes_flux)" if "format" in options else "toy UNet (shapes_base)",
              "training": {"steps": steps, "batch_size": batch_size, **options, "seconds": round(train_seconds, 1),
                           "final_loss": result.losses[-1]},
              "seconds": round(seconds, 1), "adapter": adapter_path.name, "grid": grid.name, "samples": entries}
    report_path = out / "report.json"
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    logger.info("demo finished in %.0f s", seconds)
    return DemoResult(adapter_path, plot, files, result.losses, seconds, grid, report_path, accuracy)


def run_random_demo(output_dir: str | Path = "demo_output", steps: int = 120, seed: int = 0,
                    sample_steps: int = 12) -> DemoResult:
    """Smoke run: train on the embedded photos with a tiny RANDOM backbone; write adapter, loss plot and samples.

    Checks the pipeline (data, training, checkpoints, export, sampling) in about a minute; the samples are
    noise-like by design.
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
