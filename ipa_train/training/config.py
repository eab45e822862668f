"""Options of a training run (`TrainConfig`): every field is a CLI flag; values are checked before any work."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..adapter.config import ClipOutput
from ..errors import TrainConfigError

# Configuration


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


# Integer options: (smallest, largest). The seed must fit the generators' 64-bit range.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "num_tokens": (0, 1024), "steps": (1, 10**9), "batch_size": (1, 4096), "gradient_accumulation": (1, 4096),
    "warmup_steps": (0, 10**9), "seed": (0, 2**64 - 1), "save_every": (0, 10**9), "log_every": (0, 10**9),
    "resolution": (8, 8192), "cache_limit": (0, 10**9), "keep_checkpoints": (0, 10**6), "lora_rank": (1, 4096),
}
# Float options: (smallest, largest, smallest excluded). Infinity and NaN are never accepted.
_FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, 1e30, True), "weight_decay": (0.0, 1e30, False), "max_grad_norm": (0.0, 1e30, False),
    "fusion_lambda": (0.0, 1.0, False), "drop_text": (0.0, 1.0, False), "drop_image": (0.0, 1.0, False),
    "drop_both": (0.0, 1.0, False), "logit_std": (0.0, 100.0, True), "logit_mean": (-100.0, 100.0, False),
    "flow_shift": (0.0, 1000.0, False), "guidance": (0.0, 1000.0, False),
}
_NAME_FORBIDDEN = set('/\\:*?"<>|')
ADAPTER_SUFFIX = ".safetensors"
TRAIN_PROJECTIONS = ("plain", "plus", "faceid", "faceid-plus", "faceid-plusv2")
# DiT adapter layouts a run can write: format -> (family, encoder output it reads)
DIT_TRAIN_FORMATS = {"instantx-flux": ("flux", "siglip_pooled"), "xlabs-flux": ("flux", "image_embeds"),
                     "instantx-sd3": ("sd3", "penultimate")}
# The format a DiT run writes when --format is auto
DEFAULT_DIT_FORMAT = {"flux": "xlabs-flux", "sd3": "instantx-sd3"}
# FaceID-Plus reads the CLIP states of the face aligned at this size (tencent's norm_crop at 224)
FACE_PLUS_CROP = 224


def _int_check(name: str, value: Any, lo: int, hi: int) -> tuple[bool, str]:
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    return ok, f"{name} must be a whole number from {lo} to {hi}, got {value!r}"


def _float_check(name: str, value: Any, lo: float, hi: float, lo_open: bool) -> tuple[bool, str]:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > lo if lo_open else value >= lo) and value <= hi)
    return ok, f"{name} must be a finite number {'above' if lo_open else 'from'} {lo:g} {'and at most' if lo_open else 'to'} {hi:g}, got {value!r}"


def normalise_name(name: Any) -> str:
    """The adapter's file name without extension: spaces and a trailing `.safetensors` removed; names that would
    be hidden, leave the output folder or be invalid on Windows are refused."""
    n = str(name).strip()
    if n.lower().endswith(ADAPTER_SUFFIX):
        n = n[: -len(ADAPTER_SUFFIX)].rstrip()
    if (not n or n.startswith(".") or n.endswith(".") or len(n) > 200
            or any(c in _NAME_FORBIDDEN or not c.isprintable() for c in n)):
        raise TrainConfigError(f"training option: name {name!r} must be a plain file name (no folders, no leading "
                               'dot, none of / \\ : * ? " < > |), e.g. my-ip-adapter')
    return n


@dataclass
class TrainConfig:
    """Options of one training run. Every field is also a `python -m ipa_train train` flag (`--field-name`)."""

    output_dir: str = field(default="ipa_output", metadata=_help("folder for checkpoints and the final adapter"))
    name: str = field(default="ip-adapter", metadata=_help("file name of the final adapter (without extension)"))
    projection: Literal["plain", "plus", "faceid", "faceid-plus", "faceid-plusv2"] = field(
        default="plain", metadata=_help("plain: CLIP image_embeds -> tokens; plus: Resampler over penultimate hidden states; "
                                        "faceid: face embedding -> 4 tokens, with a LoRA on every attention layer; "
                                        "faceid-plus / faceid-plusv2: also the CLIP states of the aligned face"))
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
    keep_checkpoints: int = field(default=3, metadata=_help("keep the newest N checkpoints, removing older ones after each "
                                                            "successful save (0: keep all)"))
    lora_rank: int = field(default=128, metadata=_help("FaceID: rank of the LoRA trained on every attention layer (128 as "
                                                       "the official FaceID files)"))
    face_models: str | None = field(default=None, metadata=_help(
        "FaceID: folder of the InsightFace detector and recognizer ONNX files (models/insightface/models/buffalo_l), "
        "or the insightface folder holding models/buffalo_l"))
    face_provider: str = field(default="auto", metadata=_help("FaceID: onnxruntime execution provider (auto, cpu, cuda, "
                                                              "directml, coreml, ...)"))
    face_pick: Literal["score", "largest"] = field(default="score", metadata=_help(
        "FaceID: the face used when an image has several: highest detection score or largest"))
    format: Literal["auto", "instantx-flux", "xlabs-flux", "instantx-sd3"] = field(default="auto", metadata=_help(
        "Flux / SD3.5: the official layout to train and write (instantx-flux: SigLIP pooled, 128 tokens, every "
        "block; xlabs-flux: CLIP ViT-L image_embeds, 4 tokens (--num-tokens 16 for v2), double blocks; "
        "instantx-sd3: SigLIP penultimate, time resampler, 64 tokens); auto: xlabs-flux for Flux, instantx-sd3 "
        "for SD3.5, the UNet layout otherwise"))
    timestep_sampling: Literal["auto", "logit_normal", "uniform"] = field(default="auto", metadata=_help(
        "Flux / SD3.5: how sigma is drawn before the shift (auto: logit-normal, as the families' fine-tuning)"))
    logit_mean: float = field(default=0.0, metadata=_help("Flux / SD3.5: mean of the logit-normal sigma draw"))
    logit_std: float = field(default=1.0, metadata=_help("Flux / SD3.5: standard deviation of the logit-normal draw"))
    flow_shift: float = field(default=0.0, metadata=_help(
        "Flux / SD3.5: sigma shift s (sigma = s u / (1 + (s - 1) u)); 0: the family's (SD3.5 3.0; Flux from the "
        "image's token count, 0.5..1.15 in log)"))
    guidance: float = field(default=1.0, metadata=_help(
        "Flux dev: the guidance input of the guidance-distilled transformer during training (1.0 as XLabs)"))

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.projection in TRAIN_PROJECTIONS,
             f"projection must be one of {', '.join(TRAIN_PROJECTIONS)}, got {self.projection!r}"),
            (self.face_pick in ("score", "largest"), f"face_pick must be 'score' or 'largest', got {self.face_pick!r}"),
            (self.format in ("auto", *DIT_TRAIN_FORMATS),
             f"format must be auto or one of {', '.join(DIT_TRAIN_FORMATS)}, got {self.format!r}"),
            (self.timestep_sampling in ("auto", "logit_normal", "uniform"),
             f"timestep_sampling must be auto, logit_normal or uniform, got {self.timestep_sampling!r}"),
            (not (self.format in DIT_TRAIN_FORMATS and (self.is_faceid or self.fusion)),
             f"format {self.format} trains the official {self.format} layout: --projection faceid* and --fusion "
             "are UNet options; leave them out"),
            (self.mixed_precision in ("no", "fp16", "bf16"),
             f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}"),
        ]
        checks += [_int_check(name, getattr(self, name), lo, hi) for name, (lo, hi) in _INT_RANGES.items()]
        checks += [_float_check(name, getattr(self, name), lo, hi, lo_open)
                   for name, (lo, hi, lo_open) in _FLOAT_RANGES.items()]
        checks.append((self.resolution % 8 == 0, f"resolution must be a multiple of 8 (VAE downscale), got {self.resolution}"))
        total = self.drop_text + self.drop_image + self.drop_both
        checks.append((total <= 1.0, f"drop_text + drop_image + drop_both must be <= 1, got {total:g}"))
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(f"training option: {message}")
        self.name = normalise_name(self.name)

    @property
    def is_faceid(self) -> bool:
        return self.projection.startswith("faceid")

    @property
    def tokens(self) -> int:
        if self.is_dit:
            return self.num_tokens or {"instantx-flux": 128, "xlabs-flux": 4, "instantx-sd3": 64}[self.format]
        return self.num_tokens or (16 if self.projection == "plus" else 4)

    @property
    def is_dit(self) -> bool:
        return self.format in DIT_TRAIN_FORMATS

    @property
    def clip_output(self) -> ClipOutput:
        if self.is_dit:
            return DIT_TRAIN_FORMATS[self.format][1]  # type: ignore[return-value]
        if self.projection == "faceid":
            return "none"
        return "image_embeds" if self.projection == "plain" else "penultimate"

    @property
    def face_crop(self) -> int:
        """Side of the aligned face crop the CLIP encoder reads (plus variants), 0 when none is read."""
        return FACE_PLUS_CROP if self.projection in ("faceid-plus", "faceid-plusv2") else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

