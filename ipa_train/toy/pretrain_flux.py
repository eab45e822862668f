"""Pretraining of the toy Flux base model on the shapes world (rectified flow), and a text-only sampler.

The autoencoder (the toy's VAE, `toy.autoencoder`) learns the world's images first; then the transformer learns to draw scenes from captions with the flow-matching objective the DiT adapters train
with (x_t = (1 - sigma) x0 + sigma * noise, target noise - x0, logit-normal sigmas with Flux's resolution
shift: `DitBackbone`'s own schedule). Text and the encoders' random initialisation, caption dropout, the EMA
and the determinism discipline are the UNet toy's (`toy.pretrain`); the image encoders then learn the world's
attributes (`toy.encoder`). With the same seed, steps and thread count the file is bit-identical.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import IPAKitError
from ..hosts.diffusers_flux import image_ids, pack, unpack
from ..training.schedules import DynamicShift, FlowMatchSchedule
from . import world
from .flux import FLUX_FORMAT, build_flux_components, default_flux_configs, weighted
from .model import save_components
from .pretrain import _caption, _lr_factor, after_step, save_ema, stage_from, text_only_accuracy

logger = logging.getLogger(__name__)

SCHEDULE = FlowMatchSchedule(shift=0.0, dynamic=DynamicShift())  # what `DitBackbone` trains Flux with


@dataclass
class FluxPretrainConfig:
    steps: int = 4200
    batch_size: int = 32
    lr: float = 1.5e-3
    warmup: int = 300
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    drop_caption: float = 0.1
    drop_colour: float = 0.15
    drop_shape: float = 0.15
    drop_background: float = 0.3
    seed: int = 0
    threads: int = 1  # fixed: the reduction order (and so every weight) depends on it
    log_every: int = 250
    save_every: int = 1000
    encoder_steps: int = 600  # per image encoder (CLIP vision, then SigLIP); 0 keeps them random
    encoder_batch_size: int = 64
    encoder_lr: float = 1e-3
    vae: str = "autoencoder"  # a learned VAE (`toy.autoencoder`), trained before the transformer; or "pixel"
    vae_steps: int = 1000  # the autoencoder's training steps
    timestep_sampling: str = "uniform"  # or "logit_normal" (fewer of the low-noise steps that draw clean edges)


class FluxTextCache:
    """(T5 states [S, C], CLIP pooled [C]) by caption, from the toy's two text encoders."""

    def __init__(self, parts: dict[str, Any]):
        self.parts = parts
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            tok = self.parts["tokenizer"]
            ids = tok(missing, max_length=tok.model_max_length, padding="max_length", truncation=True,
                      return_tensors="pt").input_ids
            states = self.parts["text_encoder_2"](ids)[0]  # [N, S, C]
            pooled = self.parts["text_encoder"](ids).pooler_output  # [N, C]
            self._cache.update(zip(missing, zip(states, pooled)))
        hidden, pooled = zip(*(self._cache[c] for c in captions))
        return torch.stack(hidden), torch.stack(pooled)  # [B, S, C], [B, C]


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1] -> the toy VAE's latents [B, c, 16, 16] (no gradient)."""
    with torch.no_grad():
        return vae.encode(images * 2 - 1).latent_dist.mean


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The toy VAE's latents [B, c, 16, 16] -> images [B, 3, 32, 32] in [0, 1]."""
    with torch.no_grad():
        return ((vae.decode(latents).sample + 1) / 2).clamp(0, 1)


def velocity(transformer: Any, x: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
             pooled: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity [B, c, h, w] at latents x_t [B, c, h, w] and sigmas [B] (no adapter)."""
    h, w = x.shape[-2:]
    out = transformer(hidden_states=pack(x), encoder_hidden_states=hidden, pooled_projections=pooled,
                      timestep=sigmas, img_ids=image_ids(h, w, x.device),
                      txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device), return_dict=False)[0]
    return unpack(out, h, w)


@torch.no_grad()
def sample_flux(components: dict[str, Any], prompts: list[str], seed: int = 0, steps: int = 20,
                guidance: float = 3.0) -> torch.Tensor:
    """Text-only Euler sampling with classifier-free guidance -> images [B, 3, 32, 32] in [0, 1]."""
    text = FluxTextCache(components)
    b = len(prompts)
    hidden, pooled = (torch.cat(p) for p in zip(text([""] * b), text(prompts)))  # [2B, ...]
    vae = components["vae"]
    side = world.IMAGE_SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    x = torch.randn(b, vae.config.latent_channels, side, side, generator=torch.Generator().manual_seed(seed))
    sigmas = SCHEDULE.sampling_sigmas(steps, x)
    for i in range(steps):
        uncond, cond = velocity(components["transformer"], torch.cat([x, x]), sigmas[i].expand(2 * b), hidden,
                                pooled).chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + guidance * (cond - uncond))
    return decode_latents(vae, x)


def text_only_accuracy_flux(components: dict[str, Any], n: int = 64, seed: int = 1234, steps: int = 20,
                            guidance: float = 3.0) -> dict[str, float]:
    """Sample `n` full-caption prompts and read them with the oracle: colour and shape accuracy."""
    return text_only_accuracy(components, n, seed, steps, guidance, sampler=sample_flux)


def pretrain_flux(output: str | os.PathLike, config: FluxPretrainConfig | None = None,
                  checkpoint_dir: str | os.PathLike | None = None,
                  transformer_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the toy Flux transformer on the world, then the two image encoders; write one file to `output`.

    `transformer_from` (a file an earlier run with the same settings wrote) stands in for the autoencoder and
    transformer stages, as `--unet-from` does for the UNet stage of the UNet toy. Returns the info stored in the file.
    """
    config = config or FluxPretrainConfig()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    configs = default_flux_configs(config.vae)
    parts = build_flux_components(configs, seed=config.seed)
    if transformer_from is not None:
        from .flux import load_flux_components

        earlier = load_flux_components(transformer_from)
        if earlier["vae"].config != parts["vae"].config:
            raise IPAKitError(f"{transformer_from}: its VAE differs from this build's; rebuild without "
                              "--transformer-from")
        info = stage_from(parts, earlier, "transformer", Path(transformer_from), "--transformer-from")
        parts["vae"].load_state_dict(earlier["vae"].state_dict())
    else:
        info = _pretrain_vae(parts, config)
        info.update(_pretrain_transformer(parts, config, configs, checkpoint_dir))
    if config.encoder_steps:
        from .encoder import EncoderConfig, pretrain_image_encoder

        for offset, name in enumerate(("clip_vision", "siglip")):
            info[f"encoder_{name}"] = pretrain_image_encoder(parts[name], EncoderConfig(
                config.encoder_steps, config.encoder_batch_size, config.encoder_lr, config.seed + 10 * offset))
    info["config"] = asdict(config)
    save_components(Path(output), parts, configs, info, weighted(configs), FLUX_FORMAT)
    logger.info("wrote %s", output)
    return info


def _pretrain_vae(parts: dict[str, Any], config: FluxPretrainConfig) -> dict[str, Any]:
    """The learned autoencoder's stage (none for the exact pixel-unshuffle VAE); its figures under "vae"."""
    from .autoencoder import AutoencoderConfig, ConvAutoencoder, pretrain_autoencoder

    if not isinstance(parts["vae"], ConvAutoencoder):
        return {}
    parts["vae"].requires_grad_(True)
    figures = pretrain_autoencoder(parts["vae"], AutoencoderConfig(steps=config.vae_steps, seed=config.seed))
    parts["vae"].requires_grad_(False)
    logger.info("autoencoder: %s", figures)
    return {"vae": figures}


def _pretrain_transformer(parts: dict[str, Any], config: FluxPretrainConfig, configs: dict[str, Any],
                          checkpoint_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The transformer stage; leaves the EMA weights in `parts["transformer"]` and returns its figures."""
    model = parts["transformer"]
    model.train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    text = FluxTextCache(parts)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    data_gen = torch.Generator().manual_seed(config.seed + 100)
    noise_gen = torch.Generator().manual_seed(config.seed + 200)
    rng = random.Random(config.seed + 300)
    schedule = replace(SCHEDULE, sampling=config.timestep_sampling)
    started, losses = time.perf_counter(), []
    for step in range(config.steps):
        scenes = world.random_scenes(config.batch_size, data_gen)
        latents = encode_images(parts["vae"], world.render(scenes))
        hidden, pooled = text([_caption(s, config, rng) for s in scenes])
        noise = torch.randn(latents.shape, generator=noise_gen)
        sigmas = schedule.sample(latents, generator=noise_gen)
        noisy = SCHEDULE.add_noise(latents, noise, sigmas)
        loss = F.mse_loss(velocity(model, noisy, sigmas, hidden, pooled), SCHEDULE.target(latents, noise, sigmas))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        after_step(step, model, ema, losses, config, started)
        if checkpoint_dir and config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            info = {"steps": step + 1, "config": asdict(config)}
            save_ema(Path(checkpoint_dir) / f"step{step + 1:06d}.safetensors", parts, "transformer", ema,
                     lambda path, info=info: save_components(path, parts, configs, info, weighted(configs),
                                                            FLUX_FORMAT))
    model.load_state_dict(ema)
    model.eval()
    return {"steps": config.steps, "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "seconds": round(time.perf_counter() - started, 1), "threads": config.threads}
