"""A short pretraining of the toy CLIP vision encoder, so its embeddings say what a picture of the world shows.

Real IP-Adapters read a trained CLIP, whose pooled `image_embeds` are organised by what captions name (a red
thing lies near other red things). A randomly initialised encoder keeps the colour in its embeddings only
weakly and mixed with the background, position and size, and the plain projection (one linear layer over
`image_embeds`) then gets the hue only roughly. Here linear heads on `image_embeds` learn to name the colour,
the shape and the background of world scenes (cross-entropy, summed); the encoder learns with them and the
heads are dropped. Deterministic: seeded data, seeded head initialisation, no other randomness.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import world

logger = logging.getLogger(__name__)


@dataclass
class EncoderConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def clip_inputs(scenes: list[world.Scene], siglip: bool = False) -> torch.Tensor:
    """Vision inputs [B, 3, 224, 224] of rendered scenes, prepared exactly as the training data and the nodes do
    (CLIP's mean/std, or SigLIP's 0.5/0.5)."""
    from ..training.data import clip_pixels

    kwargs = {"mean_std": SIGLIP_MEAN_STD} if siglip else {}
    return torch.stack([clip_pixels(world.to_pil(x), **kwargs) for x in world.render(scenes)])


def is_siglip(encoder: Any) -> bool:
    return "siglip" in type(encoder.config).__name__.lower()


def embed(encoder: Any, scenes: list[world.Scene]) -> torch.Tensor:
    """The pooled embedding an adapter reads [B, D]: CLIP's `image_embeds`, SigLIP's pooled output."""
    out = encoder(clip_inputs(scenes, siglip=is_siglip(encoder)))
    return out.pooler_output if is_siglip(encoder) else out.image_embeds


def _labels(scenes: list[world.Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    colours, shapes, backgrounds = list(world.COLOURS), list(world.SHAPES), list(world.BACKGROUNDS)
    return (torch.tensor([colours.index(s.colour) for s in scenes]),
            torch.tensor([shapes.index(s.shape) for s in scenes]),
            torch.tensor([backgrounds.index(s.background) for s in scenes]))


def pretrain_image_encoder(encoder: Any, config: EncoderConfig | None = None) -> dict[str, Any]:
    """Train `encoder` (a `CLIPVisionModelWithProjection` or `SiglipVisionModel`) in place; returns steps, final loss and seconds."""
    config = config or EncoderConfig()
    sizes = (len(world.COLOURS), len(world.SHAPES), len(world.BACKGROUNDS))
    torch.manual_seed(config.seed + 400)  # the heads' initialisation
    width = encoder.config.hidden_size if is_siglip(encoder) else encoder.config.projection_dim
    heads = torch.nn.Linear(width, sum(sizes))
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=config.lr)
    data_gen = torch.Generator().manual_seed(config.seed + 500)
    encoder.train()
    started, losses = time.perf_counter(), []
    for step in range(config.steps):
        scenes = world.random_scenes(config.batch_size, data_gen)
        logits = heads(embed(encoder, scenes)).split(sizes, dim=1)  # 3 x [B, K]
        loss = sum(F.cross_entropy(lg, y) for lg, y in zip(logits, _labels(scenes)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            logger.info("image encoder step %d/%d loss %.4f", step + 1, config.steps, sum(losses[-100:]) / 100)
    encoder.eval()
    tail = losses[-50:] or [float("nan")]
    return {"steps": config.steps, "final_loss": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def probe_accuracy(encoder: Any, n: int = 256, seed: int = 77) -> dict[str, float]:
    """Nearest-class-mean accuracy of `image_embeds` for colour, shape and background (fit and test on
    separate scenes): how well the embeddings tell the world's attributes apart."""
    g = torch.Generator().manual_seed(seed)
    fit, test = world.random_scenes(n, g), world.random_scenes(n, g)
    e_fit, e_test = embed(encoder, fit), embed(encoder, test)
    out = {}
    for name, y_fit, y_test in zip(("colour", "shape", "background"), _labels(fit), _labels(test)):
        classes = int(y_fit.max()) + 1
        means = torch.stack([e_fit[y_fit == k].mean(0) for k in range(classes)])  # [K, D]
        out[name] = float((torch.cdist(e_test, means).argmin(1) == y_test).float().mean())
    return out
