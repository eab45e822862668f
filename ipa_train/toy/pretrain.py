"""Pretraining of the toy base model on the shapes world, and a text-only sampler to check what it learned.

The UNet learns to draw scenes from captions; the text and image encoders stay at their random
initialisation. Captions leave words out at random (colour, shape, background, or everything) so the model
also draws from partial prompts and supports classifier-free guidance. The weights are an exponential
moving average of the trained ones. With the same seed, steps and thread count the result is bit-identical
(deterministic algorithms, data drawn from seeded generators).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import IPAKitError
from . import world
from .model import PATCH, build_components, default_configs, save_components

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    steps: int = 6500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1  # cosine decay to lr * this at the last step
    ema_decay: float = 0.999
    drop_caption: float = 0.1
    drop_colour: float = 0.15
    drop_shape: float = 0.15
    drop_background: float = 0.3
    patch: int = 2  # VAE stand-in: 2 -> 16x16x12 latents, 4 -> 8x8x48 (see `model.default_configs`)
    seed: int = 0
    threads: int = 1  # fixed: the reduction order (and so every weight) depends on it
    log_every: int = 250
    save_every: int = 1000
    encoder_steps: int = 600  # then the image encoder learns the world's attributes (`toy.encoder`); 0 keeps it random
    encoder_batch_size: int = 64
    encoder_lr: float = 1e-3


def _caption(scene: world.Scene, config: PretrainConfig, rng: random.Random) -> str:
    if rng.random() < config.drop_caption:
        return ""
    return world.caption(scene, colour=rng.random() >= config.drop_colour, shape=rng.random() >= config.drop_shape,
                         background=rng.random() >= config.drop_background)


class TextCache:
    """Text-encoder hidden states [S, C] by caption (the world has a few hundred distinct captions)."""

    def __init__(self, tokenizer: Any, text_encoder: Any):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self._cache})
        if missing:
            ids = self.tokenizer(missing, max_length=self.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids)[0]  # [N, S, C]
            self._cache.update(zip(missing, hidden))
        return torch.stack([self._cache[c] for c in captions])  # [B, S, C]


def to_latents(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1] -> latents [B, 3*p*p, 32/p, 32/p] (what `PixelUnshuffleVAE.encode` gives)."""
    return F.pixel_unshuffle(images * 2 - 1, patch)


def _lr_factor(step: int, config: PretrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def sample(components: dict[str, Any], prompts: list[str], seed: int = 0, steps: int = 20,
           guidance: float = 3.0) -> torch.Tensor:
    """Text-only DDIM sampling with classifier-free guidance -> images [B, 3, 32, 32] in [0, 1]."""
    from diffusers import DDIMScheduler

    unet, text = components["unet"], TextCache(components["tokenizer"], components["text_encoder"])
    sched = DDIMScheduler.from_config(components["scheduler"].config)
    sched.set_timesteps(steps)
    b = len(prompts)
    ehs = torch.cat([text([""] * b), text(prompts)])  # [2B, S, C]
    g = torch.Generator().manual_seed(seed)
    patch = components["vae"].patch
    size = world.IMAGE_SIZE // patch
    latents = torch.randn(b, 3 * patch * patch, size, size, generator=g)
    for t in sched.timesteps:
        uncond, cond = unet(torch.cat([latents, latents]), t, ehs).sample.chunk(2)
        latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return ((F.pixel_shuffle(latents, patch) + 1) / 2).clamp(0, 1)


def text_only_accuracy(components: dict[str, Any], n: int = 64, seed: int = 1234, steps: int = 20,
                       guidance: float = 3.0, sampler: Any = None) -> dict[str, float]:
    """Sample `n` full-caption prompts (with `sampler`, default this module's UNet `sample`) and read them with the
    oracle: colour and shape accuracy."""
    from .oracle import accuracy, read_batch

    scenes = world.random_scenes(n, torch.Generator().manual_seed(seed))
    images = (sampler or sample)(components, [world.caption(s) for s in scenes], seed=seed, steps=steps,
                                 guidance=guidance)
    readings = read_batch(images)
    return {"colour": accuracy(readings, [s.colour for s in scenes], "colour"),
            "shape": accuracy(readings, [s.shape for s in scenes], "shape"), "samples": n}


def pretrain(output: str | os.PathLike, config: PretrainConfig | None = None,
             checkpoint_dir: str | os.PathLike | None = None,
             unet_from: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train the toy UNet on the world, then the image encoder, and write the model to `output` (one file).

    The two stages share nothing but the seed, so `unet_from` (a file an earlier run with the same UNet
    settings wrote) can stand in for the first stage: its UNet weights and UNet info are taken as they are.
    Returns the info stored in the file (config, steps, final loss, seconds, the encoder stage's figures).
    """
    config = config or PretrainConfig()
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    configs = default_configs(config.patch)
    parts = build_components(configs, seed=config.seed)
    if unet_from is not None:
        from .model import load_components

        info = stage_from(parts, load_components(unet_from), "unet", Path(unet_from), "--unet-from")
    else:
        info = _pretrain_unet(parts, config, configs, checkpoint_dir)
    if config.encoder_steps:
        from .encoder import EncoderConfig, pretrain_image_encoder

        info["encoder"] = pretrain_image_encoder(parts["image_encoder"], EncoderConfig(
            config.encoder_steps, config.encoder_batch_size, config.encoder_lr, config.seed))
    info["config"] = asdict(config)
    save_components(Path(output), parts, configs, info)
    logger.info("wrote %s", output)
    return info


def stage_from(parts: dict[str, Any], earlier: dict[str, Any], name: str, path: Path, flag: str) -> dict[str, Any]:
    """Take the denoiser `name` of an earlier build (`earlier`, its components, read from `path`) into `parts`;
    returns that build's info minus its encoder stage(s)."""
    from .model import model_info

    if dict(earlier[name].config) != dict(parts[name].config):
        label = "UNet config differs from this build's (--patch?)" if name == "unet" else f"{name} config differs"
        raise IPAKitError(f"{path}: its {label}; rebuild without {flag}")
    parts[name].load_state_dict(earlier[name].state_dict())
    info = {k: v for k, v in model_info(path).items() if not k.startswith("encoder") and k != "config"}
    return {**info, f"{name}_from": path.name}


def _pretrain_unet(parts: dict[str, Any], config: PretrainConfig, configs: dict[str, Any],
                   checkpoint_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The UNet stage; leaves the EMA weights in `parts["unet"]` and returns its figures."""
    unet = parts["unet"]
    unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    text = TextCache(parts["tokenizer"], parts["text_encoder"])
    sched = parts["scheduler"]
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    data_gen = torch.Generator().manual_seed(config.seed + 100)
    noise_gen = torch.Generator().manual_seed(config.seed + 200)
    rng = random.Random(config.seed + 300)
    started, losses = time.perf_counter(), []
    for step in range(config.steps):
        scenes = world.random_scenes(config.batch_size, data_gen)
        latents = to_latents(world.render(scenes), config.patch)
        ehs = text([_caption(s, config, rng) for s in scenes])
        noise = torch.randn(latents.shape, generator=noise_gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (config.batch_size,), generator=noise_gen)
        target = sched.get_velocity(latents, noise, t)  # v-prediction
        loss = F.mse_loss(unet(sched.add_noise(latents, noise, t), t, ehs).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        after_step(step, unet, ema, losses, config, started)
        if checkpoint_dir and config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            info = {"steps": step + 1, "config": asdict(config)}
            save_ema(Path(checkpoint_dir) / f"step{step + 1:06d}.safetensors", parts, "unet", ema,
                     lambda path, info=info: save_components(path, parts, configs, info))
    parts["unet"].load_state_dict(ema)
    parts["unet"].eval()
    return {"steps": config.steps, "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "seconds": round(time.perf_counter() - started, 1), "threads": config.threads}


def after_step(step: int, model: Any, ema: dict[str, torch.Tensor], losses: list[float], config: Any,
               started: float) -> None:
    """The EMA update of `model`'s weights (decay warming up to `config.ema_decay`) and the periodic loss log."""
    decay = min(config.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
    if (step + 1) % config.log_every == 0:
        recent = losses[-config.log_every:]
        logger.info("step %d/%d loss %.4f (%.2f s/step)", step + 1, config.steps, sum(recent) / len(recent),
                    (time.perf_counter() - started) / (step + 1))


def save_ema(path: Path, parts: dict[str, Any], name: str, ema: dict[str, torch.Tensor], write: Any) -> None:
    """Write a checkpoint with the EMA weights in `parts[name]` (`write(path)`), then put the trained ones back."""
    trained = {k: v.detach().clone() for k, v in parts[name].state_dict().items()}
    parts[name].load_state_dict(ema)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    parts[name].load_state_dict(trained)
    logger.info("wrote %s", path)
