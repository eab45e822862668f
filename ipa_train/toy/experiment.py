"""Measurements on the shapes world: does an adapter learn to carry the reference's colour (or shape)?

`train_world_adapter` trains an adapter with the library's real `train` on world images whose captions leave
the attribute out, through the pretrained toy model as a `DiffusersBackbone`. `transfer_accuracy` samples
prompts without the attribute, each with a reference image of a known value, and reads the samples with the
oracle. `fused_table` pits a prompt colour against a different reference colour and counts which one wins,
with the diversity across seeds.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..training.data import load_dataset
from ..training.train import TrainConfig, TrainResult, train
from . import world
from .encoder import clip_inputs
from .oracle import Reading, read_batch

logger = logging.getLogger(__name__)

SAMPLE_STEPS = 20
GUIDANCE = 3.0


def train_world_adapter(backbone: Any, output_dir: str | os.PathLike, *, attribute: str = "colour",
                        projection: str = "plain", fusion: bool = False, steps: int = 300, batch_size: int = 16,
                        images: int = 256, lr: float = 1e-3, seed: int = 0, **overrides: Any) -> TrainResult:
    """Train an adapter on `images` world scenes whose captions leave `attribute` ("colour" or "shape") out."""
    out = Path(output_dir)
    data = out / "data"
    world.write_dataset(data, images, seed=seed + 1000, colour=attribute != "colour", shape=attribute != "shape")
    dataset = load_dataset(data, resolution=world.IMAGE_SIZE)
    options = {"output_dir": str(out), "name": f"shapes-{attribute}-{projection}{'-fused' if fusion else ''}",
               "projection": projection, "fusion": fusion, "steps": steps, "batch_size": batch_size, "lr": lr,
               "seed": seed, "resolution": world.IMAGE_SIZE, "save_every": 0, "log_every": max(1, steps // 10),
               "drop_text": 0.05, "drop_image": 0.05, "drop_both": 0.05}
    config = TrainConfig(**{**options, **overrides})
    return train(config, backbone, dataset)


@dataclass
class Trial:
    """One sample to draw: the reference scene, the prompt, and how the adapter is applied."""

    reference: world.Scene
    prompt: str
    mode: str = "scaled"
    weight: float = 1.0
    fusion_lambda: float = 1.0
    seed: int = 0


def transfer_trials(n: int, attribute: str = "colour", draw_seed: int = 0, **apply: Any) -> list[Trial]:
    """`n` trials whose references cycle through every value of `attribute`; the prompts leave it out.

    Prompt scenes are drawn independently of the references, so only the attribute itself can match.
    """
    g = torch.Generator().manual_seed(draw_seed)
    values = list(world.COLOURS) if attribute == "colour" else list(world.SHAPES)
    refs = [world.random_scenes(1, g, **{attribute: values[i % len(values)]})[0] for i in range(n)]
    prompts = world.random_scenes(n, g)
    keep = {"colour": attribute != "colour", "shape": attribute != "shape"}
    return [Trial(r, world.caption(p, **keep), **apply) for r, p in zip(refs, prompts)]


@torch.no_grad()
def run_trials(backbone: Any, adapter: Any, trials: list[Trial], chunk: int = 64) -> torch.Tensor:
    """Sample every trial -> images [N, 3, 32, 32] in [0, 1]; trials sharing mode/weight/lambda/seed run batched."""
    from ..adapter.dit_modules import DitAdapter
    from ..hosts.backbone_diffusers import generate
    from ..hosts.dit_generate import generate_dit

    dit = isinstance(adapter, DitAdapter)
    sampler, siglip = (generate_dit, adapter.config.clip_output == "siglip_pooled") if dit else (generate, False)
    out: list[torch.Tensor | None] = [None] * len(trials)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(trials):
        groups.setdefault((t.mode, t.weight, t.fusion_lambda, t.seed), []).append(i)
    for (mode, weight, lam, seed), idx in groups.items():
        for start in range(0, len(idx), chunk):
            part = idx[start:start + chunk]
            pixels = clip_inputs([trials[i].reference for i in part], siglip=siglip)  # [B, 3, 224, 224]
            images = sampler(backbone, adapter, pixels, [trials[i].prompt for i in part], mode=mode, weight=weight,
                              fusion_lambda=lam, steps=SAMPLE_STEPS, guidance=GUIDANCE, size=world.IMAGE_SIZE,
                              seed=seed)
            for i, x in zip(part, images):
                out[i] = x
    return torch.stack(out)  # type: ignore[arg-type]


def share(readings: list[Reading], values: list[str], attribute: str) -> float:
    """Share of readings whose `attribute` equals the value of the same index."""
    return sum(getattr(r, attribute) == v for r, v in zip(readings, values)) / max(1, len(readings))


def transfer_accuracy(backbone: Any, adapter: Any, n: int = 64, attribute: str = "colour", weight: float = 1.0,
                      mode: str = "scaled", fusion_lambda: float = 1.0, seed: int = 0) -> float:
    """Share of samples showing the reference's `attribute` (prompts leave it out; chance: 1/number of values)."""
    trials = transfer_trials(n, attribute, 500 + seed, mode=mode, weight=weight, fusion_lambda=fusion_lambda, seed=seed)
    readings = read_batch(run_trials(backbone, adapter, trials))
    return share(readings, [getattr(t.reference, attribute) for t in trials], attribute)


def pixel_diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance (0-1 scale, x100) of images [N, 3, H, W] drawn for the same input."""
    flat = images.flatten(1)
    n = flat.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return float(100 * ((flat[i] - flat[j]).pow(2).mean(dim=1).sqrt()).mean())


def clip_embedder(folder: str | os.PathLike | None = None) -> Any:
    """The tiny random CLIP of the tests as `CLIPEmbedder` (for "our CLIP diversity" offline)."""
    from ..evaluation import CLIPEmbedder
    from .tiny import write_tiny_clip

    if folder is None:
        folder = tempfile.mkdtemp(prefix="ipakit-tiny-clip-")
    return CLIPEmbedder.from_pretrained(write_tiny_clip(folder))


def conflict_pairs(n: int, seed: int = 0) -> list[tuple[world.Scene, world.Scene]]:
    """`n` (prompt scene, reference scene) pairs whose colours differ; prompts cycle through the colours."""
    g = torch.Generator().manual_seed(seed)
    colours = list(world.COLOURS)
    pairs = []
    for i in range(n):
        prompt = world.random_scenes(1, g, colour=colours[i % len(colours)])[0]
        ref_colour = colours[(i + 1 + i // len(colours)) % len(colours)]
        if ref_colour == prompt.colour:
            ref_colour = colours[(i + 2) % len(colours)]
        pairs.append((prompt, world.random_scenes(1, g, colour=ref_colour)[0]))
    return pairs


def fused_table(backbone: Any, adapter: Any, lambdas: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4),
                weights: tuple[float, ...] = (0.5, 1.0), pairs: int = 16, seeds: int = 4, seed: int = 0,
                embedder: Any = None) -> list[dict[str, Any]]:
    """For each fused lambda, at each weight: prompt-colour share, reference-colour share, and diversity
    across `seeds` seeds (pixel RMS distance and CLIP cosine distance, averaged over the pairs).

    The prompt names a colour, the reference shows another one. Lambda 1.0 is scaled mode exactly (the
    fusion returns the image tokens unchanged).
    """
    from ..evaluation import diversity

    embedder = embedder or clip_embedder()
    cases = conflict_pairs(pairs, seed)
    rows = []
    settings = [("fused", lam) for lam in lambdas]
    for weight in weights:
        for mode, lam in settings:
            trials = [Trial(ref, world.caption(prompt), mode, weight, lam, seed + s)
                      for s in range(seeds) for prompt, ref in cases]
            images = run_trials(backbone, adapter, trials)
            readings = read_batch(images)
            by_pair = images.view(seeds, pairs, *images.shape[1:]).transpose(0, 1)  # [pairs, seeds, 3, H, W]
            clip_div = [diversity(embedder.embed_images(list(x.permute(0, 2, 3, 1)))) for x in by_pair]
            rows.append({
                "mode": mode, "lambda": lam, "weight": weight, "samples": len(trials),
                "prompt_colour": share(readings, [world.caption(p).split()[1] for _ in range(seeds) for p, _ in cases],
                                       "colour"),
                "reference_colour": share(readings, [r.colour for _ in range(seeds) for _, r in cases], "colour"),
                "pixel_diversity": sum(pixel_diversity(x) for x in by_pair) / pairs,
                "clip_diversity": sum(c for c in clip_div if c is not None) / pairs,
            })
            logger.info("fused table: %s", rows[-1])
    return rows
