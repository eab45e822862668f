"""IP-Adapter training: one loop over a small backbone interface, resumable checkpoints without pickles.

The semantics follow the reference training script (tencent-ailab/IP-Adapter `tutorial_train*.py`):
the reference image is the target image; one uniform draw r per sample drops the image (r < i), the text
(r < i+t) or both (r < i+t+b); a dropped image is a zero CLIP embedding (plain) or the encoding of a zero
normalized pixel tensor (plus); the loss is the float32 MSE on the scheduler's target (epsilon or v);
AdamW over the projection and every layer's image K/V (plus the fusion weights in fused mode); the UNet,
VAE and both encoders are frozen.

Differences: the CLIP/text embeddings and VAE moments of small datasets are computed once and cached
(the VAE latent is still sampled from the cached mean/std every step, as the reference samples
`latent_dist` every step). With `random_crop`/`random_flip` the target changes every step, so its latents
cannot be cached and the VAE stays loaded; the CLIP input is always the centre crop, as in the reference.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapter.config import AdapterConfig, ResamplerConfig
from ..adapter.formats import load_adapter, save_adapter
from ..adapter.modules import IPAdapter
from ..errors import TrainConfigError
from .backbone import Backbone, TextCondition
from .checkpoints import (
    ADAPTER_FILE,
    CHECKPOINTS_DIR,
    STATE_JSON_FILE,
    STATE_TENSORS_FILE,
    LoopState,
    _rng_state,
    _set_rng_state,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .conditioning import Batch, Conditioning, drop_decisions, sample_indices
from .config import TrainConfig
from .data import CaptionedImages
from .engine import Engine

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FILE", "CHECKPOINTS_DIR", "STATE_JSON_FILE", "STATE_TENSORS_FILE", "AdapterModel", "Backbone", "Batch",
    "Conditioning", "Engine", "LoopState", "TextCondition", "TrainConfig", "TrainResult", "adapter_config_for",
    "build_adapter", "drop_decisions", "find_checkpoint", "load_checkpoint", "resampler_config", "sample_indices",
    "save_checkpoint", "set_seed", "train",
]

# --------------------------------------------------------------------------------------------------------
# Adapter construction


def resampler_config(cross_dim: int) -> ResamplerConfig:
    """The official resampler shape for SD1.5 (768) and SDXL (2048) widths, a proportional one otherwise."""
    if cross_dim == 768:
        return ResamplerConfig(dim=768, depth=4, heads=12, dim_head=64, ff_mult=4)
    if cross_dim == 2048:
        return ResamplerConfig(dim=1280, depth=4, heads=20, dim_head=64, ff_mult=4)
    return ResamplerConfig(dim=cross_dim, depth=4, heads=max(1, cross_dim // 64), dim_head=64, ff_mult=4)


def adapter_config_for(config: TrainConfig, backbone: Backbone) -> AdapterConfig:
    """The adapter a from-scratch run trains on `backbone`."""
    cross = int(backbone.cross_attention_dim)
    return AdapterConfig(
        projection=config.projection,
        num_tokens=config.tokens,
        clip_embedding_dim=backbone.clip_embedding_dim(config.clip_output),
        cross_attention_dim=cross,
        layer_hidden_sizes=tuple(backbone.layer_hidden_sizes()),
        clip_output=config.clip_output,
        fusion=config.fusion,
        resampler=resampler_config(cross) if config.projection == "plus" else None,
    )


def build_adapter(config: TrainConfig, backbone: Backbone) -> IPAdapter:
    """A new adapter (image K/V from the UNet's to_k/to_v), or the `init_adapter` file to fine-tune."""
    if not config.init_adapter:
        adapter = IPAdapter(adapter_config_for(config, backbone))
        backbone.init_adapter(adapter)
        return adapter
    loaded = load_adapter(config.init_adapter)
    cfg = loaded.config.replace(fusion=config.fusion or loaded.config.fusion)
    if cfg.projection != config.projection:
        logger.info("fine-tuning %s: projection %r taken from the file (option says %r)",
                    config.init_adapter, cfg.projection, config.projection)
    adapter = IPAdapter(cfg)
    missing, unexpected = adapter.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not k.startswith("fusion.") for k in missing):
        raise TrainConfigError(f"{config.init_adapter}: cannot load into a {cfg.variant} adapter "
                               f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    hidden = tuple(backbone.layer_hidden_sizes())
    if cfg.layer_hidden_sizes != hidden or cfg.cross_attention_dim != backbone.cross_attention_dim:
        raise TrainConfigError(
            f"{config.init_adapter}: this adapter ({cfg.cross_attention_layers} layers, text width "
            f"{cfg.cross_attention_dim}) was made for another base model than the one being trained "
            f"({len(hidden)} layers, text width {backbone.cross_attention_dim}); pick an adapter of the same family")
    return adapter


class AdapterModel(nn.Module):
    """The trained part of the forward: image tokens (fused with the prompt when training fused mode),
    then the frozen backbone's prediction. Wrapped by accelerate/DDP when running on several processes."""

    def __init__(self, adapter: IPAdapter, backbone: Backbone, fusion_lambda: float | None):
        super().__init__()
        self.adapter = adapter
        self.fusion_lambda = fusion_lambda
        self._backbone = [backbone]  # a list keeps the backbone out of the module tree and state dict

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCondition,
                clip: torch.Tensor) -> torch.Tensor:
        tokens = self.adapter.project(clip)  # [B, T, C]
        if self.fusion_lambda is not None:
            tokens = self.adapter.fuse(tokens, text.hidden, self.fusion_lambda)  # [B, T, C]
        return self._backbone[0].predict(noisy, timesteps, text, tokens)


# --------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What `train` returns."""

    adapter: IPAdapter
    losses: list[float]  # one mean loss per optimizer step, from step 1 (resumed runs include the earlier steps)
    adapter_path: Path | None  # the exported adapter (the last checkpoint's adapter when stopped early)
    checkpoints: list[Path]
    steps: int
    stopped: bool
    dataset: dict[str, Any]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return factor


def _micro_batches(config: TrainConfig, conditioning: Conditioning, step: int, engine: Engine) -> Iterator[Batch]:
    n = len(conditioning.dataset)
    for a in range(config.gradient_accumulation):
        micro = step * config.gradient_accumulation + a
        yield conditioning.batch(sample_indices(n, config.batch_size, micro, config.seed, engine.rank, engine.world),
                                 random)


def _loss(model: nn.Module, backbone: Backbone, batch: Batch, engine: Engine) -> torch.Tensor:
    noise = torch.randn(batch.latents.shape).to(engine.device)  # [B, c, h, w]
    timesteps = torch.randint(0, backbone.num_train_timesteps, (batch.latents.shape[0],)).to(engine.device)
    noisy = backbone.add_noise(batch.latents, noise, timesteps)
    with engine.autocast():
        pred = model(noisy, timesteps, batch.text, batch.clip)
    return F.mse_loss(pred.float(), backbone.target(batch.latents, noise, timesteps).float(), reduction="mean")


def train(config: TrainConfig, backbone: Backbone, dataset: CaptionedImages, *,
          should_stop: Callable[[], bool] | None = None,
          progress: Callable[[int, int, float], None] | None = None,
          accelerator: Any = None, interrupts: tuple[type[BaseException], ...] = ()) -> TrainResult:
    """Train (or fine-tune, or resume) an IP-Adapter on `dataset` with the frozen `backbone`.

    Args:
        config: the run's options.
        backbone: base model and image encoder behind the `Backbone` interface.
        dataset: captioned images (`ipa_train.training.data.load_dataset`).
        should_stop: polled before every step; when it returns True a checkpoint is written and training returns.
        progress: called after every optimizer step with (step, total steps, mean loss of the step).
        accelerator: an `accelerate.Accelerator` for multi-GPU / mixed precision runs; None runs in-process.
        interrupts: exception types a host raises from inside a forward pass to cancel (ComfyUI's
            InterruptProcessingException). The unfinished step is discarded (gradients and RNG state rolled
            back), a checkpoint of the last finished step is written, and training returns as stopped.

    Returns:
        TrainResult with the trained adapter, the per-step losses and the written files.
    """
    engine = Engine(config, backbone.device, accelerator)
    set_seed(config.seed)
    out = Path(config.output_dir)
    conditioning = Conditioning(backbone, dataset, config)
    adapter = build_adapter(config, backbone).to(engine.device).train()
    backbone.attach(adapter)
    if config.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    params = adapter.trainable_parameters(include_fusion=config.fusion)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(config.warmup_steps))
    state = LoopState()
    if config.resume:
        state = load_checkpoint(find_checkpoint(config), adapter, optimizer, scheduler, engine, config)
    model = AdapterModel(adapter, backbone, config.fusion_lambda if config.fusion else None)
    model, optimizer = engine.prepare(model, optimizer)
    logger.info("training a %s adapter%s: %d trainable parameters, %d steps of %d x %d sample(s), %d image(s)",
                adapter.config.variant, " (fused)" if config.fusion else "", sum(p.numel() for p in params),
                config.steps, config.gradient_accumulation, config.batch_size * engine.world, len(dataset))

    def checkpoint() -> Path | None:
        engine.wait()
        if not engine.is_main:
            return None
        path = save_checkpoint(out / CHECKPOINTS_DIR / f"checkpoint-{state.step:06d}", adapter, optimizer,
                               scheduler, engine, state, config)
        checkpoints.append(path)
        return path

    checkpoints: list[Path] = []
    stopped = False
    started = time.perf_counter()
    first_step = state.step
    while state.step < config.steps:
        if should_stop is not None and should_stop():
            stopped = True
            logger.info("stop requested at step %d: writing a checkpoint", state.step)
            break
        rng_at_step = _rng_state() if interrupts else None
        total = 0.0
        try:
            for a, batch in enumerate(_micro_batches(config, conditioning, state.step, engine)):
                with engine.sync(model, a == config.gradient_accumulation - 1):
                    loss = _loss(model, backbone, batch, engine)
                    engine.backward(loss / config.gradient_accumulation)
                total += float(loss.detach()) / config.gradient_accumulation
        except interrupts:
            optimizer.zero_grad(set_to_none=True)
            _set_rng_state(*rng_at_step)
            stopped = True
            logger.info("interrupted during step %d: discarded it, writing a checkpoint", state.step + 1)
            break
        engine.step(optimizer, params)
        scheduler.step()
        state.step += 1
        state.losses.append(engine.mean(total))
        if progress is not None:
            try:
                progress(state.step, config.steps, state.losses[-1])
            except interrupts:
                stopped = True
                logger.info("interrupted after step %d: writing a checkpoint", state.step)
                break
        if config.log_every and state.step % config.log_every == 0:
            rate = (time.perf_counter() - started) / (state.step - first_step)
            logger.info("step %d/%d  loss %.5f  lr %.3g  %.2f s/step", state.step, config.steps,
                        state.losses[-1], scheduler.get_last_lr()[0], rate)
        if config.save_every and state.step % config.save_every == 0 and state.step < config.steps:
            checkpoint()
    final_checkpoint = checkpoint()
    adapter_path = _export(config, adapter, dataset, state, engine, stopped, final_checkpoint)
    return TrainResult(adapter, list(state.losses), adapter_path, checkpoints, state.step, stopped, dataset.describe())


def _export(config: TrainConfig, adapter: IPAdapter, dataset: CaptionedImages, state: LoopState, engine: Engine,
            stopped: bool, final_checkpoint: Path | None) -> Path | None:
    if not engine.is_main:
        return None
    if stopped:
        return final_checkpoint / ADAPTER_FILE if final_checkpoint is not None else None
    info = {"steps": state.step, "lr": config.lr, "batch_size": config.batch_size * engine.world * config.gradient_accumulation,
            "resolution": config.resolution, "images": len(dataset),
            "fusion_lambda": config.fusion_lambda if config.fusion else None,
            "final_loss": state.losses[-1] if state.losses and math.isfinite(state.losses[-1]) else None}
    path = save_adapter(adapter, Path(config.output_dir) / f"{config.name}.safetensors",
                        {"ipa_kit.training": json.dumps(info)})
    logger.info("wrote %s", path)
    return path
