"""Options of a training run (`TrainConfig`): every field is a CLI flag; values are checked before any work."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from ..adapter.config import ClipOutput
from ..errors import TrainConfigError

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

