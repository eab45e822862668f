"""FaceID projections: a face embedding (InsightFace ArcFace, 512 wide) to image tokens, with official key names.

Shapes: B batch, F face-embedding width (512), T tokens, C cross-attention width, L CLIP tokens (257), D CLIP width.

- faceid / faceid-portrait: `norm(proj(e).view(B, T, C))` with `proj = Linear(F, 2F), GELU, Linear(2F, T*C)`;
  T = 4 (faceid) or 16 per face (portrait).
- faceid-plus / plusv2: the same MLP gives the ID tokens x, which are the *queries* of a perceiver over the CLIP
  penultimate states of the aligned face crop: `out = perceiver(latents=x, clip)`; plusv2 returns `x + s * out`.
- faceid-portrait-unnorm: the plus adapters' resampler (16 learned latents) over the raw, unnormalised embedding as a
  sequence of one token [B, 1, F].
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import EncoderMismatchError, IPAKitError
from .config import AdapterConfig, ResamplerConfig
from .modules import Perceiver, Resampler

FACE_EMBEDDING_DIM = 512


def _face_mlp(face_dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(face_dim, hidden), nn.GELU(), nn.Linear(hidden, out))


class FaceMLP(nn.Module):
    """Face embedding [B, F] -> ID tokens [B, T, C] (keys proj.0, proj.2, norm)."""

    def __init__(self, face_dim: int, cross_dim: int, num_tokens: int, hidden: int = 0):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_dim = cross_dim
        self.proj = _face_mlp(face_dim, hidden or 2 * face_dim, cross_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(face).reshape(-1, self.num_tokens, self.cross_dim))


class FacePerceiver(Perceiver):
    """The ID tokens [B, T, C] read the CLIP hidden states [B, L, D] (keys proj_in, layers, proj_out, norm_out)."""

    def forward(self, latents: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        return self.read(latents, clip)


class FacePlus(nn.Module):
    """FaceID-Plus: MLP ID tokens refined by a perceiver over the face crop's CLIP states (keys proj, norm,
    perceiver_resampler.*). `shortcut` (plusv2) adds the ID tokens back: `x + scale * perceiver(x, clip)`."""

    def __init__(self, face_dim: int, clip_dim: int, cross_dim: int, num_tokens: int, cfg: ResamplerConfig,
                 hidden: int = 0):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_dim = cross_dim
        self.proj = _face_mlp(face_dim, hidden or 2 * face_dim, cross_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_dim)
        self.perceiver_resampler = FacePerceiver(clip_dim, cross_dim, cfg)

    def forward(self, face: torch.Tensor, clip: torch.Tensor, shortcut: bool = False, scale: float = 1.0) -> torch.Tensor:
        x = self.norm(self.proj(face).reshape(-1, self.num_tokens, self.cross_dim))  # [B, T, C]
        out = self.perceiver_resampler(x, clip)
        return x + scale * out if shortcut else out


def build_face_projection(c: AdapterConfig) -> nn.Module:
    f = c.face_embedding_dim or FACE_EMBEDDING_DIM
    if c.projection in ("faceid", "faceid-portrait"):
        return FaceMLP(f, c.cross_attention_dim, c.num_tokens, c.face_hidden_dim)
    if c.projection in ("faceid-plus", "faceid-plusv2"):
        assert c.resampler is not None
        return FacePlus(f, c.clip_embedding_dim, c.cross_attention_dim, c.num_tokens, c.resampler, c.face_hidden_dim)
    assert c.resampler is not None  # faceid-portrait-unnorm: the clip width is the face width
    return Resampler(f, c.cross_attention_dim, c.num_tokens, c.resampler)


def _check_face(c: AdapterConfig, face: torch.Tensor) -> None:
    want = c.face_embedding_dim or FACE_EMBEDDING_DIM
    if face.shape[-1] != want or face.dim() not in (1, 2, 3):
        raise EncoderMismatchError(
            f"this {c.variant} adapter needs face embeddings [N, {want}] (InsightFace ArcFace) but got shape "
            f"{tuple(face.shape)}; encode the face with the FaceID encode node (Encode Face (Kit))"
        )


def _check_clip(c: AdapterConfig, clip: torch.Tensor | None, n: int) -> torch.Tensor:
    if clip is None:
        raise IPAKitError(f"this {c.variant} adapter also needs the CLIP vision model ({c.encoder}) for the face crop; "
                          "connect a CLIP vision model to the FaceID encode node")
    if clip.dim() != 3 or clip.shape[-1] != c.clip_embedding_dim:
        raise EncoderMismatchError(
            f"this {c.variant} adapter needs penultimate CLIP hidden states of width {c.clip_embedding_dim} "
            f"({c.encoder}) for the face crop, got shape {tuple(clip.shape)}; load the {c.encoder} CLIP vision model"
        )
    if clip.shape[0] != n:
        clip = clip[:1].expand(n, *clip.shape[1:])
    return clip


def project_face(image_proj: nn.Module, config: AdapterConfig, face: torch.Tensor, clip: torch.Tensor | None = None,
                 shortcut_scale: float = 1.0) -> torch.Tensor:
    """Face embeddings of N faces [N, F] (and their crops' CLIP states [N, L, D] for plus) -> tokens [N, T, C]."""
    _check_face(config, face)
    face = face.reshape(-1, face.shape[-1])
    proj = config.projection
    if proj in ("faceid", "faceid-portrait"):
        return image_proj(face)
    if proj == "faceid-portrait-unnorm":
        return image_proj(face.unsqueeze(1))  # the embedding as a sequence of one token
    clip = _check_clip(config, clip, face.shape[0])
    return image_proj(face, clip.to(face), shortcut=proj == "faceid-plusv2", scale=shortcut_scale)


# --------------------------------------------------------------------------------------------------------
# Measuring a file: image_proj tensors -> (clip_embedding_dim, cross_attention_dim, num_tokens)


def _mlp_sizes(ip: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    face_dim = ip["proj.0.weight"].shape[1]
    cross = ip["norm.weight"].shape[0]
    return face_dim, cross, ip["proj.2.weight"].shape[0] // cross


def _plus_sizes(ip: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    _, cross, tokens = _mlp_sizes(ip)
    return ip["perceiver_resampler.proj_in.weight"].shape[1], cross, tokens


def _unnorm_sizes(ip: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    return ip["proj_in.weight"].shape[1], ip["proj_out.weight"].shape[0], ip["latents"].shape[1]


FACE_MEASURE = {
    "faceid": _mlp_sizes,
    "faceid-portrait": _mlp_sizes,
    "faceid-plus": _plus_sizes,
    "faceid-plusv2": _plus_sizes,
    "faceid-portrait-unnorm": _unnorm_sizes,
}


def face_perceiver_config(ip: dict[str, torch.Tensor]) -> ResamplerConfig:
    """FaceID-Plus perceiver sizes from its keys (depth, 64-wide heads, feed-forward multiple)."""
    pre = "perceiver_resampler."
    dim = ip[pre + "proj_in.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[2]) for k in ip if k.startswith(pre + "layers."))
    inner = ip[pre + "layers.0.0.to_q.weight"].shape[0]
    dim_head = 64 if inner % 64 == 0 else inner
    ff_inner = ip[pre + "layers.0.1.1.weight"].shape[0]
    return ResamplerConfig(dim=dim, depth=depth, heads=inner // dim_head, dim_head=dim_head, ff_mult=ff_inner // dim)


def face_fields(projection: str, ip: dict[str, torch.Tensor]) -> dict:
    """AdapterConfig fields a FaceID file adds: face width, the encoder output it reads, the perceiver sizes."""
    if projection == "faceid-portrait-unnorm":
        return {"face_embedding_dim": ip["proj_in.weight"].shape[1], "clip_output": "none"}
    fields = {"face_embedding_dim": ip["proj.0.weight"].shape[1], "clip_output": "none"}
    hidden = ip["proj.0.weight"].shape[0]
    if hidden != 2 * fields["face_embedding_dim"]:
        fields["face_hidden_dim"] = hidden
    if projection in ("faceid-plus", "faceid-plusv2"):
        fields.update(clip_output="penultimate", resampler=face_perceiver_config(ip))
    return fields
