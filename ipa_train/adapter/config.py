"""Typed configuration of an adapter, stored as JSON in the metadata of every file the kit writes."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import AdapterFormatError

Family = Literal["sd15", "sdxl", "unknown"]
Projection = Literal["plain", "plus", "full", "faceid", "faceid-plus", "faceid-plusv2", "faceid-portrait",
                     "faceid-portrait-unnorm"]
ClipOutput = Literal["image_embeds", "penultimate", "none"]
PROJECTIONS = ("plain", "plus", "full", "faceid", "faceid-plus", "faceid-plusv2", "faceid-portrait",
               "faceid-portrait-unnorm")
# Projections fed by a face embedding (InsightFace ArcFace, 512 wide); the plus ones also read CLIP hidden states.
FACE_PROJECTIONS = PROJECTIONS[3:]
RESAMPLER_PROJECTIONS = ("plus", "faceid-portrait-unnorm")

CONFIG_METADATA_KEY = "ipa_kit.config"
FORMAT_METADATA_KEY = "ipa_kit.format"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class EncoderSpec:
    """A CLIP vision encoder the official adapters were trained with."""

    name: str
    hidden_size: int  # width of hidden_states (penultimate), per token
    projection_dim: int  # width of image_embeds (visual_projection output)
    file_hint: str  # the file name users are asked to use in ComfyUI/models/clip_vision


ENCODERS: tuple[EncoderSpec, ...] = (
    EncoderSpec("ViT-H/14", 1280, 1024, "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    EncoderSpec("ViT-bigG/14", 1664, 1280, "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"),
    EncoderSpec("ViT-L/14", 1024, 768, "clip-vit-large-patch14.safetensors"),
)


def encoder_for(clip_output: str, dim: int) -> str:
    """Name of the encoder whose `clip_output` has width `dim`, "none" when no CLIP output is used, or "unknown"."""
    if clip_output == "none":
        return "none"
    for enc in ENCODERS:
        width = enc.projection_dim if clip_output == "image_embeds" else enc.hidden_size
        if width == dim:
            return enc.name
    return "unknown"


def encoder_spec(name: str) -> EncoderSpec | None:
    return next((e for e in ENCODERS if e.name == name), None)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    cross_attention_dim: int
    cross_attention_layers: int
    label: str


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("sd15", 768, 16, "Stable Diffusion 1.5"),
    FamilySpec("sdxl", 2048, 70, "Stable Diffusion XL"),
)


def family_for(cross_attention_dim: int, num_layers: int) -> str:
    for fam in FAMILIES:
        if fam.cross_attention_dim == cross_attention_dim and fam.cross_attention_layers == num_layers:
            return fam.name
    return "unknown"


def family_label(name: str) -> str:
    return next((f.label for f in FAMILIES if f.name == name), "an unknown base model")


@dataclass(frozen=True)
class ResamplerConfig:
    """Perceiver resampler of the *plus* projection (tencent `Resampler`, no positional embedding)."""

    dim: int = 768
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to rebuild an adapter's modules without reading its weights.

    `layer_hidden_sizes[k]` is the inner width of cross-attention layer k, in diffusers processor order
    (down_blocks, up_blocks, mid_block); its weights are stored under the official key `2k+1`.
    """

    projection: Projection
    num_tokens: int
    clip_embedding_dim: int
    cross_attention_dim: int
    layer_hidden_sizes: tuple[int, ...]
    clip_output: ClipOutput = "image_embeds"
    fusion: bool = False
    variant: str = ""
    resampler: ResamplerConfig | None = None
    family: str = field(default="")
    encoder: str = field(default="")
    # FaceID: width of the face embedding (0 for CLIP-only adapters) and rank of the LoRA the file carries (0: none).
    face_embedding_dim: int = 0
    lora_rank: int = 0
    face_hidden_dim: int = 0  # width of the face MLP's hidden layer; 0: twice the face width, as every official file

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise AdapterFormatError(f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        if self.clip_output not in ("image_embeds", "penultimate", "none"):
            raise AdapterFormatError(
                f"clip_output must be 'image_embeds', 'penultimate' or 'none', got {self.clip_output!r}"
            )
        if self.projection in RESAMPLER_PROJECTIONS and self.resampler is None:
            object.__setattr__(self, "resampler", ResamplerConfig(dim=self.cross_attention_dim))
        if self.projection in ("faceid-plus", "faceid-plusv2") and self.resampler is None:
            # tencent's FacePerceiverResampler: width = cross-attention width, 64-wide heads
            heads = max(1, self.cross_attention_dim // 64)
            object.__setattr__(self, "resampler", ResamplerConfig(dim=self.cross_attention_dim, heads=heads))
        object.__setattr__(self, "layer_hidden_sizes", tuple(int(h) for h in self.layer_hidden_sizes))
        if not self.family:
            object.__setattr__(self, "family", family_for(self.cross_attention_dim, len(self.layer_hidden_sizes)))
        if not self.encoder:
            object.__setattr__(self, "encoder", encoder_for(self.clip_output, self.clip_embedding_dim))
        if not self.variant:
            object.__setattr__(self, "variant", self.projection)

    @property
    def is_faceid(self) -> bool:
        return self.projection in FACE_PROJECTIONS

    @property
    def cross_attention_layers(self) -> int:
        return len(self.layer_hidden_sizes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_hidden_sizes"] = list(self.layer_hidden_sizes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("resampler") is not None:
            d["resampler"] = ResamplerConfig(**d["resampler"])
        d["layer_hidden_sizes"] = tuple(d.get("layer_hidden_sizes", ()))
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)
