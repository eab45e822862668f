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

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter.config import AdapterConfig, ClipOutput, ResamplerConfig
from ..adapter.formats import load_adapter, save_adapter
from ..adapter.modules import IPAdapter
from ..errors import TrainConfigError
from .data import CaptionedImages

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"


# --------------------------------------------------------------------------------------------------------
# Configuration


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Options of one training run. Every field is also a `python -m ipa_train train` flag (`--field-name`)."""

    output_dir: str = field(default="ipa_output", metadata=_help("folder for checkpoints and the final adapter"))
    name: str = field(default="ip-adapter", metadata=_help("file name of the final adapter (without extension)"))
    projection: Literal["plain", "plus"] = field(
        default="plain", metadata=_help("plain: CLIP image_embeds -> tokens; plus: Resampler over penultimate hidden states"))
    num_tokens: int = field(default=0, metadata=_help("image tokens; 0 = 4 for plain, 16 for plus"))
    fusion: bool = field(default=False, metadata=_help("train fused mode: image tokens attend to the prompt (fusion weights trained)"))
    fusion_lambda: float = field(default=0.5, metadata=_help("lambda of the fused forward during training (0.5 as the original fused work)"))
    steps: int = field(default=1000, metadata=_help("optimizer steps"))
    batch_size: int = field(default=1, metadata=_help("samples per micro-batch (per process)"))
    gradient_accumulation: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    lr: float = field(default=1e-4, metadata=_help("AdamW learning rate"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=0, metadata=_help("linear learning-rate warm-up steps"))
    max_grad_norm: float = field(default=0.0, metadata=_help("gradient clipping norm; 0 disables it (as the reference)"))
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata=_help("autocast dtype on GPU (the UNet and adapter weights stay fp32); CPU always runs fp32"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute UNet activations in backward (less memory, slower)"))
    drop_text: float = field(default=0.05, metadata=_help("probability to train with the empty prompt"))
    drop_image: float = field(default=0.05, metadata=_help("probability to train without the image (zero CLIP input)"))
    drop_both: float = field(default=0.05, metadata=_help("probability to drop both text and image"))
    seed: int = field(default=0, metadata=_help("random seed (data order, drops, noise, timesteps)"))
    save_every: int = field(default=500, metadata=_help("write a checkpoint every N steps (0: only at the end)"))
    log_every: int = field(default=10, metadata=_help("log the loss every N steps"))
    resolution: int = field(default=512, metadata=_help("training resolution in pixels (square)"))
    random_crop: bool = field(default=False, metadata=_help("random instead of centre crop of the target (disables the latent cache)"))
    random_flip: bool = field(default=False, metadata=_help("random horizontal flip of the target (disables the latent cache)"))
    cache_limit: int = field(default=2000, metadata=_help("cache embeddings and latents when the dataset has at most N images (0: never)"))
    init_adapter: str | None = field(default=None, metadata=_help("adapter file to fine-tune instead of starting from scratch"))
    resume: str | None = field(default=None, metadata=_help("checkpoint folder to resume from, or 'latest' in output_dir"))

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.projection in ("plain", "plus"), f"projection must be 'plain' or 'plus', got {self.projection!r}"),
            (self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}"),
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.gradient_accumulation >= 1, f"gradient_accumulation must be at least 1, got {self.gradient_accumulation}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.num_tokens >= 0, f"num_tokens must be >= 0 (0 = default), got {self.num_tokens}"),
            (0.0 <= self.fusion_lambda <= 1.0, f"fusion_lambda must be in [0, 1], got {self.fusion_lambda}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.resolution >= 8 and self.resolution % 8 == 0,
             f"resolution must be a multiple of 8 (VAE downscale), got {self.resolution}"),
            (bool(self.name) and os.sep not in self.name, f"name must be a plain file name, got {self.name!r}"),
        ]
        for rate_name in ("drop_text", "drop_image", "drop_both"):
            rate = getattr(self, rate_name)
            checks.append((0.0 <= rate <= 1.0, f"{rate_name} must be in [0, 1], got {rate}"))
        total = self.drop_text + self.drop_image + self.drop_both
        checks.append((total <= 1.0, f"drop_text + drop_image + drop_both must be <= 1, got {total:g}"))
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(f"training option: {message}")

    @property
    def tokens(self) -> int:
        return self.num_tokens or (4 if self.projection == "plain" else 16)

    @property
    def clip_output(self) -> ClipOutput:
        return "image_embeds" if self.projection == "plain" else "penultimate"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------------------
# Backbone interface


@dataclass
class TextCondition:
    """Text conditioning of a batch: hidden states [B, S, C] plus model-specific extras (e.g. SDXL pooled
    `text_embeds` [B, P] and `time_ids` [B, 6]), every extra with the batch as first dimension."""

    hidden: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, index: torch.Tensor | list[int]) -> TextCondition:
        return TextCondition(self.hidden[index], {k: v[index] for k, v in self.extra.items()})

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.hidden.to(device), {k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def cat(items: list[TextCondition]) -> TextCondition:
        keys = items[0].extra.keys()
        return TextCondition(torch.cat([i.hidden for i in items]), {k: torch.cat([i.extra[k] for i in items]) for k in keys})


class Backbone(Protocol):
    """What training needs from a base model. `ipa_train.hosts.backbone_diffusers.DiffusersBackbone` implements it
    for diffusers folders; a host (ComfyUI) can implement it over its own model objects.

    Encoders are frozen and run without gradients; `predict` runs the frozen UNet with the installed adapter
    and must let gradients reach `ip_tokens` (and the adapter's image K/V weights).
    """

    device: torch.device
    prediction_type: str  # "epsilon" | "v_prediction"
    num_train_timesteps: int
    cross_attention_dim: int

    def clip_embedding_dim(self, output: ClipOutput) -> int:
        """Width of the image encoder's `image_embeds` or penultimate hidden states."""
        ...

    def layer_hidden_sizes(self) -> list[int]:
        """Inner width of every cross-attention layer, in diffusers processor order."""
        ...

    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B, 3, H, W] in [-1, 1] -> (mean, std) of the *scaled* latent distribution, [B, c, h, w] each."""
        ...

    def encode_text(self, captions: list[str]) -> TextCondition:
        """Captions -> text conditioning (hidden states [B, S, C] and extras)."""
        ...

    def encode_image(self, clip_pixels: torch.Tensor, output: ClipOutput) -> torch.Tensor:
        """CLIP input [B, 3, 224, 224] -> image_embeds [B, D] or penultimate hidden states [B, L, D]."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
        ...

    def init_adapter(self, adapter: IPAdapter) -> None:
        """Initialise the adapter's image K/V from each cross-attention layer's to_k/to_v."""
        ...

    def attach(self, adapter: IPAdapter) -> None:
        """Install the adapter's image K/V into the UNet for `predict`."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCondition,
                ip_tokens: torch.Tensor) -> torch.Tensor:
        """Model output [B, c, h, w] for `noisy` latents, text conditioning and image tokens [B, T, C]."""
        ...

    def release(self, parts: tuple[str, ...]) -> None:
        """Free encoders no longer needed: any of "vae", "text", "image"."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        ...


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
# Conditioning: cached or encoded per batch


@dataclass
class Batch:
    latents: torch.Tensor  # [B, c, h, w], scaled
    text: TextCondition  # hidden [B, S, C]
    clip: torch.Tensor  # [B, D] or [B, L, D]


def drop_decisions(n: int, config: TrainConfig, rng: random.Random) -> list[tuple[bool, bool]]:
    """(drop_image, drop_text) per sample: one uniform draw r; r < i image, r < i+t text, r < i+t+b both."""
    out = []
    i, t, b = config.drop_image, config.drop_text, config.drop_both
    for _ in range(n):
        r = rng.random()
        if r < i:
            out.append((True, False))
        elif r < i + t:
            out.append((False, True))
        elif r < i + t + b:
            out.append((True, True))
        else:
            out.append((False, False))
    return out


class Conditioning:
    """Gives training batches, from caches built once (small datasets) or by running the encoders per batch.

    Every image is encoded once for the cache; the empty prompt and the dropped-image CLIP input are
    encoded once too. Encoders no longer needed afterwards are released.
    """

    def __init__(self, backbone: Backbone, dataset: CaptionedImages, config: TrainConfig, chunk: int = 8):
        self.backbone = backbone
        self.dataset = dataset
        self.config = config
        self.output = config.clip_output
        use_cache = 0 < len(dataset) <= config.cache_limit
        self.moments: tuple[torch.Tensor, torch.Tensor] | None = None
        self.clip: torch.Tensor | None = None
        self.text: dict[str, TextCondition] | None = None
        with torch.no_grad():
            self.empty_text = backbone.encode_text([""]).to("cpu")
            self.dropped_clip = self._dropped_clip()
            if use_cache:
                self._build_cache(chunk)
        self._release(use_cache)

    def _dropped_clip(self) -> torch.Tensor:
        if self.output == "image_embeds":
            return torch.zeros(self.backbone.clip_embedding_dim("image_embeds"))  # [D]
        zeros = torch.zeros(1, 3, 224, 224)  # a zero *normalized* pixel tensor, as the reference drops plus
        return self.backbone.encode_image(zeros, self.output)[0].float().cpu()  # [L, D]

    def _build_cache(self, chunk: int) -> None:
        n = len(self.dataset)
        started = time.perf_counter()
        clip, means, stds = [], [], []
        for lo in range(0, n, chunk):
            idx = range(lo, min(n, lo + chunk))
            clip.append(self.backbone.encode_image(torch.stack([self.dataset.clip_input(i) for i in idx]),
                                                   self.output).float().cpu())
            if self.dataset.deterministic:
                mean, std = self.backbone.encode_latents(torch.stack([self.dataset.target(i) for i in idx]))
                means.append(mean.float().cpu())
                stds.append(std.float().cpu())
        self.clip = torch.cat(clip)  # [N, D] or [N, L, D]
        if means:
            self.moments = (torch.cat(means), torch.cat(stds))  # [N, c, h, w] each
        captions = sorted({self.dataset.caption(i) for i in range(n)})
        text = [self.backbone.encode_text(captions[lo:lo + chunk]).to("cpu") for lo in range(0, len(captions), chunk)]
        cat = TextCondition.cat(text)
        self.text = {c: cat.rows([j]) for j, c in enumerate(captions)}
        logger.info("cached embeddings of %d images and %d captions%s in %.1f s", n, len(captions),
                    " and their VAE latents" if means else " (latents not cached: random crop/flip changes them every step)",
                    time.perf_counter() - started)

    def _release(self, cached: bool) -> None:
        parts = ("text", "image") + (("vae",) if self.moments is not None else ())
        if cached:
            self.backbone.release(parts)
            logger.info("released the %s encoder(s): every embedding is cached", "/".join(parts))

    def batch(self, indices: list[int], rng: random.Random) -> Batch:
        """A batch with the reference drop semantics; draws drops (and crops) from `rng`, latents from torch."""
        drops = drop_decisions(len(indices), self.config, rng)
        device = self.backbone.device
        with torch.no_grad():
            if self.moments is not None:
                mean, std = self.moments[0][indices], self.moments[1][indices]
            else:
                pixels = torch.stack([self.dataset.target(i, rng) for i in indices])
                mean, std = (t.float().cpu() for t in self.backbone.encode_latents(pixels))
            latents = mean + std * torch.randn(mean.shape)  # sampled on CPU: same draws on every device
            text = TextCondition.cat([self._text(i, drop_text) for i, (_, drop_text) in zip(indices, drops)])
            clip = torch.stack([self._clip(i, drop_image) for i, (drop_image, _) in zip(indices, drops)])
        return Batch(latents.to(device), text.to(device), clip.to(device))

    def _text(self, index: int, drop: bool) -> TextCondition:
        if drop:
            return self.empty_text
        caption = self.dataset.caption(index)
        if self.text is not None:
            return self.text[caption]
        return self.backbone.encode_text([caption]).to("cpu")

    def _clip(self, index: int, drop: bool) -> torch.Tensor:
        if drop:
            return self.dropped_clip
        if self.clip is not None:
            return self.clip[index]
        return self.backbone.encode_image(self.dataset.clip_input(index)[None], self.output)[0].float().cpu()


def sample_indices(n: int, batch: int, micro_step: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Indices of micro-batch `micro_step` of process `rank`: an endless stream of per-epoch permutations.

    A pure function of its arguments, so a resumed run reads the same samples as an uninterrupted one.
    """
    out = []
    for j in range(micro_step * batch, (micro_step + 1) * batch):
        k = j * world + rank  # position in the global stream
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


# --------------------------------------------------------------------------------------------------------
# Devices, precision and processes


class Engine:
    """Backward, optimizer step, autocast and process handling, through accelerate when it is given.

    Without an accelerator: one process, autocast and a GradScaler (fp16) on CUDA only.
    """

    def __init__(self, config: TrainConfig, device: torch.device, accelerator: Any = None):
        self.accelerator = accelerator
        self.device = torch.device(accelerator.device) if accelerator is not None else device
        precision = config.mixed_precision
        if precision != "no" and self.device.type != "cuda":
            logger.warning("mixed_precision=%s needs a GPU; training on %s in fp32", precision, self.device.type)
            precision = "no"
        self.precision = precision
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = None
        if accelerator is None and precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")
        self.max_grad_norm = config.max_grad_norm

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.accelerator is not None:
            return self.accelerator.autocast()
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def sync(self, model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.accelerator is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: Any, params: list[nn.Parameter]) -> None:
        if self.max_grad_norm > 0:
            if self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
            else:
                if self.scaler is not None:
                    self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def scaler_state(self) -> dict[str, Any] | None:
        scaler = self.scaler if self.accelerator is None else getattr(self.accelerator, "scaler", None)
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        scaler = self.scaler if self.accelerator is None else getattr(self.accelerator, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_state(optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer: Any, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            per_param.setdefault(int(pid), {})[name] = t
    for pid, values in state["scalars"].items():
        per_param.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


@dataclass
class LoopState:
    """Progress saved in checkpoints."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


def save_checkpoint(folder: Path, adapter: IPAdapter, optimizer: Any, scheduler: Any, engine: Engine,
                    state: LoopState, config: TrainConfig) -> Path:
    """Write a checkpoint folder atomically: built under a temporary name, then renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, opt_state = _optimizer_state(optimizer)
    rng_tensors, rng_state = _rng_state()
    save_adapter(adapter, tmp / ADAPTER_FILE, {"ipa_kit.train_step": str(state.step)})
    save_file({**tensors, **rng_tensors}, str(tmp / STATE_TENSORS_FILE))
    meta = {
        "format": 1, "step": state.step, "losses": state.losses, "config": config.to_dict(),
        "adapter_config": adapter.config.to_dict(), "optimizer": opt_state,
        "scheduler": _json_safe(scheduler.state_dict()), "rng": rng_state, "scaler": engine.scaler_state(),
    }
    (tmp / STATE_JSON_FILE).write_text(json.dumps(meta))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if folder.exists():
        old = folder.parent / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def find_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint folder named by `config.resume` ("latest" = newest in output_dir/checkpoints)."""
    assert config.resume
    if config.resume != "latest":
        path = Path(config.resume)
    else:
        found = sorted(Path(config.output_dir, CHECKPOINTS_DIR).glob("checkpoint-*"))
        if not found:
            raise TrainConfigError(f"resume=latest: no checkpoint-* folder in {Path(config.output_dir, CHECKPOINTS_DIR)}; "
                                   "start without --resume or give a checkpoint folder")
        path = found[-1]
    if not (path / STATE_JSON_FILE).is_file():
        raise TrainConfigError(f"{path}: not a training checkpoint (no {STATE_JSON_FILE}); give a checkpoint-N folder "
                               f"written by this kit, under {Path(config.output_dir, CHECKPOINTS_DIR)}")
    return path


def load_checkpoint(path: Path, adapter: IPAdapter, optimizer: Any, scheduler: Any, engine: Engine,
                    config: TrainConfig) -> LoopState:
    """Restore adapter, optimizer, scheduler, RNG and loop state from a checkpoint folder."""
    meta = json.loads((path / STATE_JSON_FILE).read_text())
    saved = AdapterConfig.from_dict(meta["adapter_config"])
    if saved != adapter.config:
        raise TrainConfigError(f"{path}: the checkpoint holds a {saved.variant} adapter ({saved.num_tokens} tokens, "
                               f"fusion={saved.fusion}) but the options build a {adapter.config.variant} adapter "
                               f"({adapter.config.num_tokens} tokens, fusion={adapter.config.fusion}); resume with the "
                               "options of the original run")
    adapter.load_state_dict(load_adapter(path / ADAPTER_FILE).state_dict())
    tensors = load_file(str(path / STATE_TENSORS_FILE))
    _load_optimizer_state(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    engine.load_scaler_state(meta.get("scaler"))
    _set_rng_state(tensors, meta["rng"])
    logger.info("resumed from %s at step %d", path, meta["step"])
    return LoopState(int(meta["step"]), [float(x) for x in meta["losses"]])


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
