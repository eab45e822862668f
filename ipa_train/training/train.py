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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapter.dit_modules import DitAdapter
from ..adapter.formats import save_adapter
from ..adapter.modules import IPAdapter
from ..errors import TrainConfigError
from ..outputs import MB, OutputError, check_output_dir, check_output_file
from .adapters import adapter_config_for, adapter_shape, build_adapter, resampler_config
from .backbone import Backbone, BackboneSizes, TextCondition
from .checkpoints import (
    ADAPTER_FILE,
    CHECKPOINTS_DIR,
    STATE_JSON_FILE,
    STATE_TENSORS_FILE,
    LoopState,
    _rng_state,
    _set_rng_state,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
)
from .conditioning import Batch, Conditioning, drop_decisions, sample_indices
from .config import TrainConfig
from .data import CaptionedImages
from .dit import resolve_format
from .engine import Engine, largest_conv_bytes
from .faceid import attach_face_lora, lora_parameters
from .schedules import DDPMSchedule, NoiseSchedule, schedule_for

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FILE", "CHECKPOINTS_DIR", "STATE_JSON_FILE", "STATE_TENSORS_FILE", "AdapterModel", "Backbone",
    "default_schedule",
    "BackboneSizes", "Batch", "Conditioning", "Engine", "LoopState", "TextCondition", "TrainConfig", "TrainResult",
    "adapter_config_for",
    "build_adapter", "drop_decisions", "find_checkpoint", "load_checkpoint", "resampler_config", "sample_indices",
    "save_checkpoint", "set_seed", "train", "TrainingDiverged", "preflight",
]

class AdapterModel(nn.Module):
    """The trained part of the forward: image tokens (fused with the prompt when training fused mode),
    then the frozen backbone's prediction. Wrapped by accelerate/DDP when running on several processes.
    FaceID: the tokens come from the face embeddings (and the face crops' CLIP states for plus), and the LoRA the
    backbone applies is a submodule, so that DDP sees its parameters."""

    def __init__(self, adapter: IPAdapter, backbone: Backbone, fusion_lambda: float | None,
                 lora: nn.Module | None = None):
        super().__init__()
        self.adapter = adapter
        self.fusion_lambda = fusion_lambda
        self.lora = lora
        self._backbone = [backbone]  # a list keeps the backbone out of the module tree and state dict

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCondition,
                clip: torch.Tensor, face: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.adapter, DitAdapter):  # Flux / SD3.5: timesteps are the sigmas [B]
            return self._backbone[0].predict(noisy, timesteps, text, self.adapter.image_tokens(clip, timesteps))
        if face is not None:  # [B, F] (+ clip [B, L, D] for plus; [B, 0] when no CLIP is read)
            tokens = self.adapter.project_face(face, clip if clip.dim() == 3 else None)
        else:
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
    checkpoints: list[Path]  # written by this run; older ones may since be pruned (keep_checkpoints)
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


def default_schedule(backbone: Backbone) -> NoiseSchedule:
    """The backbone's own flow-matching schedule (family defaults), or its DDPM schedule."""
    flow = getattr(backbone, "schedule", None)
    return flow if getattr(flow, "kind", None) == "flow" else DDPMSchedule(backbone)


def _loss(model: nn.Module, backbone: Backbone, batch: Batch, engine: Engine,
          schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """float32 MSE between the prediction and the schedule's target (epsilon / v / flow velocity noise - x0).
    The noise, then the timesteps (DDPM indices or sigmas), are drawn from torch's CPU generator."""
    schedule = schedule or default_schedule(backbone)
    noise = torch.randn(batch.latents.shape).to(engine.device)  # [B, c, h, w]
    timesteps = schedule.sample(batch.latents).to(engine.device)  # [B]
    noisy = schedule.add_noise(batch.latents, noise, timesteps)
    with engine.autocast():
        pred = model(noisy, timesteps, batch.text, batch.clip, batch.face)
    return F.mse_loss(pred.float(), schedule.target(batch.latents, noise, timesteps).float(), reduction="mean")


class TrainingDiverged(TrainConfigError):
    """The loss or the adapter's weights became NaN or infinite."""


def preflight(config: TrainConfig, backbone: Backbone, main: bool = True) -> Path | None:
    """Checks made before any work: the init adapter, the output folder (a folder, writable, room for a checkpoint
    and the exported adapter) and the checkpoint to resume from, which is returned. The adapter's size comes from
    `backbone.sizes` (configs only): no model is loaded here, so the encoders run and are released before the
    denoiser ever loads."""
    out = Path(config.output_dir)
    cfg = adapter_shape(config, backbone)
    with torch.device("meta"):
        n = (DitAdapter if config.is_dit else IPAdapter)(cfg).num_parameters()
    if not config.is_dit:
        n += lora_parameters(cfg, backbone.sizes)
    # A checkpoint holds the fp32 adapter and AdamW's two fp32 moments (12 bytes a parameter); the export 4 more.
    check_output_dir(out, 16 * n + MB, "output folder")
    check_output_dir(out / CHECKPOINTS_DIR, 0, "checkpoint folder")
    check_output_file(out / f"{config.name}.safetensors", 0, "adapter file")
    if main:
        remove_leftovers(out / CHECKPOINTS_DIR)
    return find_checkpoint(config) if config.resume else None


@dataclass
class _Run:
    """Everything one run updates."""

    adapter: IPAdapter | DitAdapter
    params: list[nn.Parameter]
    optimizer: Any
    scheduler: Any
    model: nn.Module
    conditioning: Conditioning
    state: LoopState
    schedule: NoiseSchedule
    conv_bytes: int | None = None  # the denoiser's largest conv weight (None: unknown), see `Engine.kernels`
    checkpoints: list[Path] = field(default_factory=list)
    non_finite_in_a_row: int = 0


def _setup(config: TrainConfig, backbone: Backbone, dataset: CaptionedImages, engine: Engine,
           resume_from: Path | None) -> _Run:
    set_seed(config.seed)
    conditioning = Conditioning(backbone, dataset, config)
    adapter = build_adapter(config, backbone).to(engine.device).train()
    backbone.attach(adapter)
    lora = attach_face_lora(backbone, adapter, engine.device, config.init_adapter or "the adapter")
    if config.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    params = adapter.trainable_parameters(include_fusion=config.fusion) + (list(lora.parameters()) if lora else [])
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(config.warmup_steps))
    state = LoopState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, adapter, optimizer, scheduler, engine, config)
    model = AdapterModel(adapter, backbone, config.fusion_lambda if config.fusion else None, lora)
    model, optimizer = engine.prepare(model, optimizer)
    logger.info("training a %s adapter%s: %d trainable parameters, %d steps of %d x %d sample(s), %d image(s)",
                adapter.config.variant, " (fused)" if config.fusion else "", sum(p.numel() for p in params),
                config.steps, config.gradient_accumulation, config.batch_size * engine.world, len(dataset))
    return _Run(adapter, params, optimizer, scheduler, model, conditioning, state, schedule_for(backbone, config),
                largest_conv_bytes(getattr(backbone, "denoiser", None)))


def _diverged(config: TrainConfig, step: int, what: str) -> TrainingDiverged:
    kept = list_checkpoints(Path(config.output_dir, CHECKPOINTS_DIR))
    last = (f"the last good checkpoint {kept[-1]} is kept (resume with --resume {kept[-1]} and the changed options)"
            if kept else "no checkpoint was written before")
    return TrainingDiverged(f"training diverged at step {step}: {what}; nothing was exported and {last}. Lower --lr "
                            f"(now {config.lr:g}), set --max-grad-norm 1.0, or use --mixed-precision bf16 instead of fp16")


def _check_loss(run: _Run, config: TrainConfig, engine: Engine, loss: float) -> None:
    """Stop on a NaN/inf loss. fp16's gradient scaler skips such steps by design, so it gets a few in a row."""
    if math.isfinite(loss):
        run.non_finite_in_a_row = 0
        return
    run.non_finite_in_a_row += 1
    if engine.precision != "fp16" or run.non_finite_in_a_row > 10:
        raise _diverged(config, run.state.step + 1, f"the loss is {loss}")


def _one_step(run: _Run, config: TrainConfig, backbone: Backbone, engine: Engine,
              interrupts: tuple[type[BaseException], ...]) -> float | None:
    """One optimizer step; its mean loss, or None when a host interrupt discarded the unfinished step."""
    rng_at_step = _rng_state() if interrupts else None
    total = 0.0
    try:
        for a, batch in enumerate(_micro_batches(config, run.conditioning, run.state.step, engine)):
            with engine.sync(run.model, a == config.gradient_accumulation - 1), engine.kernels(run.conv_bytes):
                loss = _loss(run.model, backbone, batch, engine, run.schedule)
                engine.backward(loss / config.gradient_accumulation)
            total += float(loss.detach()) / config.gradient_accumulation
    except interrupts:
        run.optimizer.zero_grad(set_to_none=True)
        _set_rng_state(*rng_at_step)
        logger.info("interrupted during step %d: discarded it, writing a checkpoint", run.state.step + 1)
        return None
    mean = engine.mean(total)
    _check_loss(run, config, engine, mean)  # before the optimizer step: the weights stay those of the last step
    engine.step(run.optimizer, run.params)
    run.scheduler.step()
    run.state.step += 1
    run.state.losses.append(mean)
    return mean


def _checkpoint(run: _Run, config: TrainConfig, engine: Engine) -> Path | None:
    engine.wait()
    if not all(bool(torch.isfinite(p).all()) for p in run.adapter.parameters()):
        raise _diverged(config, run.state.step, "the adapter's weights became NaN or infinite")
    if not engine.is_main:
        return None
    path = save_checkpoint(Path(config.output_dir, CHECKPOINTS_DIR, f"checkpoint-{run.state.step:06d}"), run.adapter,
                           run.optimizer, run.scheduler, engine, run.state, config)
    run.checkpoints.append(path)
    return path


def _loop(run: _Run, config: TrainConfig, backbone: Backbone, engine: Engine, should_stop: Callable[[], bool] | None,
          progress: Callable[[int, int, float], None] | None, interrupts: tuple[type[BaseException], ...]) -> bool:
    """Train until `config.steps`; True when stopped early (stop request or host interrupt)."""
    started = time.perf_counter()
    first_step = run.state.step
    while run.state.step < config.steps:
        if should_stop is not None and should_stop():
            logger.info("stop requested at step %d: writing a checkpoint", run.state.step)
            return True
        loss = _one_step(run, config, backbone, engine, interrupts)
        if loss is None:
            return True
        if progress is not None:
            try:
                progress(run.state.step, config.steps, loss)
            except interrupts:
                logger.info("interrupted after step %d: writing a checkpoint", run.state.step)
                return True
        if config.log_every and run.state.step % config.log_every == 0:
            rate = (time.perf_counter() - started) / (run.state.step - first_step)
            logger.info("step %d/%d  loss %.5f  lr %.3g  %.2f s/step", run.state.step, config.steps, loss,
                        run.scheduler.get_last_lr()[0], rate)
        if config.save_every and run.state.step % config.save_every == 0 and run.state.step < config.steps:
            _checkpoint(run, config, engine)
    return False


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

    Raises:
        OutputError: the output folder is unusable (checked before any work) or the disk filled up.
        TrainingDiverged: the loss or the weights became NaN/inf; earlier checkpoints are kept, nothing exported.
    """
    config = resolve_format(config, backbone.sizes.family)
    engine = Engine(config, backbone.device, accelerator)
    resume_from = preflight(config, backbone, engine.is_main)
    run = _setup(config, backbone, dataset, engine, resume_from)
    stopped = _loop(run, config, backbone, engine, should_stop, progress, interrupts)
    final_checkpoint = _checkpoint(run, config, engine)
    adapter_path = _export(config, run.adapter, dataset, run.state, engine, stopped, final_checkpoint)
    return TrainResult(run.adapter, list(run.state.losses), adapter_path, run.checkpoints, run.state.step, stopped,
                       dataset.describe())


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
    target = Path(config.output_dir) / f"{config.name}.safetensors"
    try:
        path = save_adapter(adapter, target, {"ipa_kit.training": json.dumps(info)})
    except OutputError as e:
        raise OutputError(f"{e}. The trained adapter is safe in {final_checkpoint}: after freeing space, run "
                          f"python -m ipa_train convert {final_checkpoint} {target}") from None
    logger.info("wrote %s", path)
    return path
