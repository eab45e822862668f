"""The toy Flux model's VAE: a small convolutional autoencoder, 32x32 RGB <-> 16x16 latents of 2 channels.

Why learned and not the UNet toy's exact pixel-unshuffle: with exact pixels, the transformer itself must render
every pixel of an edge from tokens of 4x4 pixels (48 values each), and in a one-hour build it draws ragged blobs:
real squares noised to sigma 0.4 and denoised come back as squares only 28 times in 48, and sampled squares never
read as squares. Latent diffusion leaves the pixels to the VAE's convolutional decoder; so does this toy. On
16x16x2 latents (tokens of 8 values) the same transformer draws clean circles, squares and triangles.

The autoencoder is trained first, on the world's images, with a little Gaussian noise on the latents so that the
decoder also renders slightly-off latents (a sampler's output) as clean shapes. Latents are normalised to zero
mean and unit variance per channel (stored buffers), so `config.scaling_factor` is 1 and `shift_factor` None,
as the training and sampling code reads them from a diffusers `AutoencoderKL`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import world
from .model import _LatentDist  # the mean and (zero) std the training code reads

logger = logging.getLogger(__name__)


class ConvAutoencoder(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> normalised latents [B, C, H/2, W/2] (C = `latent_channels`)."""

    def __init__(self, latent_channels: int = 2, width: int = 32) -> None:
        super().__init__()
        c, w = latent_channels, width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, c, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, 3, 3, padding=1))
        self.register_buffer("latent_mean", torch.zeros(c, 1, 1))
        self.register_buffer("latent_std", torch.ones(c, 1, 1))
        # block_out_channels of length 2: a downscale of 2, as `generate` computes it from a diffusers VAE
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, latent_channels=c,
                                      block_out_channels=(w, w))

    @property
    def dtype(self) -> torch.dtype:
        return self.latent_std.dtype

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        mean = (self.encoder(pixels) - self.latent_mean) / self.latent_std
        return SimpleNamespace(latent_dist=_LatentDist(mean))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.decoder(latents * self.latent_std + self.latent_mean))


@dataclass
class AutoencoderConfig:
    steps: int = 1200
    batch_size: int = 48
    lr: float = 2e-3
    latent_noise: float = 0.1  # std of the noise added to the latents in training, relative to theirs
    seed: int = 0


def pretrain_autoencoder(ae: ConvAutoencoder, config: AutoencoderConfig) -> dict[str, Any]:
    """Train `ae` to reconstruct the world's images (MSE), then set its latent normalisation; returns its figures
    (steps, final loss, seconds, and the oracle's reading of 256 reconstructions)."""
    from .oracle import accuracy, read_batch

    ae.train()
    opt = torch.optim.Adam(ae.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed + 500)
    started, losses = time.perf_counter(), []
    for step in range(config.steps):
        x = world.render(world.random_scenes(config.batch_size, gen)) * 2 - 1
        z = ae.encoder(x)
        noisy = z + config.latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        loss = F.mse_loss(ae.decoder(noisy), x) + 1e-4 * z.pow(2).mean()  # the small penalty keeps latents bounded
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            logger.info("autoencoder step %d/%d loss %.5f", step + 1, config.steps, sum(losses[-50:]) / 50)
    ae.eval()
    with torch.no_grad():
        z = ae.encoder(world.render(world.random_scenes(512, gen)) * 2 - 1)
        ae.latent_mean.copy_(z.mean(dim=(0, 2, 3)).view(-1, 1, 1))
        ae.latent_std.copy_(z.std(dim=(0, 2, 3)).view(-1, 1, 1))
        scenes = world.random_scenes(256, torch.Generator().manual_seed(config.seed + 501))
        images = world.render(scenes) * 2 - 1
        readings = read_batch(((ae.decode(ae.encode(images).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    tail = losses[-50:] or [float("nan")]
    return {"steps": config.steps, "final_loss": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - started, 1),
            "reconstruction": {"colour": accuracy(readings, [s.colour for s in scenes], "colour"),
                               "shape": accuracy(readings, [s.shape for s in scenes], "shape")}}
