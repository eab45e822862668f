"""Modules of the Flux and SD3.5 IP-Adapters: the three image projections and the per-block K/V weights.

Module names follow the official files' keys (after `image_proj.` / `ip_adapter_proj_model.` and the block
prefix), so a file's tensors load with `strict=True`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IPAKitError
from .dit_formats import DitConfig, block_keys, detect_dit_config, dit_info, image_proj_prefix
from .files import _fail, state_mismatch

logger = logging.getLogger(__name__)


@dataclass
class ImageTokens:
    """What a DiT adapter's projection gives the transformer: tokens [B, T, C] and, for SD3.5's time-conditioned
    resampler, its timestep embedding temb [B, E] (the blocks' adaptive norm reads it; None for Flux). `weight`
    scales the image attention's output where the training processors sample with it (0: left out exactly)."""

    tokens: torch.Tensor
    temb: torch.Tensor | None = None
    weight: float = 1.0


class MLPProjection(nn.Module):
    """InstantX Flux: SigLIP pooled [B, 1152] -> Linear, GELU, Linear -> [B, N, C] -> LayerNorm."""

    def __init__(self, cfg: DitConfig):
        super().__init__()
        self.num_tokens, self.dim = cfg.num_tokens, cfg.context_dim
        self.proj = nn.Sequential(nn.Linear(cfg.clip_embedding_dim, cfg.proj_hidden), nn.GELU(),
                                  nn.Linear(cfg.proj_hidden, cfg.context_dim * cfg.num_tokens))
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.num_tokens, self.dim))


class LinearProjection(nn.Module):
    """XLabs: CLIP image_embeds [B, 768] -> Linear -> [B, N, C] -> LayerNorm (diffusers `ImageProjection`)."""

    def __init__(self, cfg: DitConfig):
        super().__init__()
        self.num_tokens, self.dim = cfg.num_tokens, cfg.context_dim
        self.proj = nn.Linear(cfg.clip_embedding_dim, cfg.context_dim * cfg.num_tokens)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.num_tokens, self.dim))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t (0..1000) [B] -> [B, dim], cos half first (flip_sin_to_cos, no frequency shift)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResamplerAttention(nn.Module):
    """The resampler's latents attend to cat(image features, latents); q and k each scaled by d^-1/4."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        x = self.norm1(x)
        lat = self.norm2(latents) * (1 + scale[:, None]) + shift[:, None]
        q = self.to_q(lat)
        k, v = self.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
        s = 1 / math.sqrt(math.sqrt(self.dim_head))
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        out = (w @ v).transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)
        return self.to_out(out)


class TimeResampler(nn.Module):
    """InstantX SD3.5: SigLIP penultimate [B, 729, 1152] and t (sigma*1000) -> tokens [B, N, C] and temb [B, 1280].

    Each layer is (attention, feed-forward LN->Linear->GELU->Linear, adaLN SiLU->Linear giving shift/scale of
    the attention and of the feed-forward), as the official keys `layers.{l}.{0,1,2}` lay them out.
    """

    def __init__(self, cfg: DitConfig):
        super().__init__()
        dim = cfg.resampler_dim
        self.timestep_in_dim = cfg.timestep_in_dim
        self.latents = nn.Parameter(torch.zeros(1, cfg.num_tokens, dim))
        self.proj_in = nn.Linear(cfg.clip_embedding_dim, dim)
        self.time_embedding = TimestepMLP(cfg.timestep_in_dim, cfg.timestep_emb_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                ResamplerAttention(dim, cfg.resampler_heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(),
                              nn.Linear(4 * dim, dim, bias=False)),
                nn.Sequential(nn.SiLU(), nn.Linear(cfg.timestep_emb_dim, 4 * dim)),
            ])
            for _ in range(cfg.resampler_depth)
        )
        self.proj_out = nn.Linear(dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)

    def forward(self, feats: torch.Tensor, timestep: torch.Tensor,
                embedded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """embedded: `proj_in(feats)` when the caller kept it (it does not depend on t, so a sampler's steps share it)."""
        temb = self.time_embedding(timestep_embedding(timestep, self.timestep_in_dim).to(feats.dtype))  # [B, 1280]
        x = (self.proj_in(feats) if embedded is None else embedded) + temb[:, None]
        lat = self.latents.repeat(feats.shape[0], 1, 1)
        for attn, ff, ada in self.layers:
            shift_msa, scale_msa, shift_mlp, scale_mlp = ada(temb).chunk(4, dim=1)
            lat = lat + attn(x, lat, shift_msa, scale_msa)
            norm, *rest = ff
            h = norm(lat) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            for m in rest:
                h = m(h)
            lat = lat + h
        return self.norm_out(self.proj_out(lat)), temb


class HeadRMSNorm(nn.Module):
    """RMS norm over the head width, with a learned scale (InstantX SD3.5's norm_q / norm_k / norm_ip_k)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and hasattr(F, "rms_norm"):
            # the same math in one fused pass (half precision keeps the two roundings below, as diffusers);
            # its output is contiguous, which SDPA prefers
            return F.rms_norm(x, x.shape[-1:], self.weight.float(), self.eps)
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class AdaNorm(nn.Module):
    """Time-conditioned LayerNorm of the SD3.5 image tokens: shift, scale = linear(SiLU(temb))."""

    def __init__(self, temb_dim: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(temb_dim, 2 * dim)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)
        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
        return normed * (1 + scale[:, None]) + shift[:, None]


class DitBlock(nn.Module):
    """Per-block image K/V weights; SD3.5 blocks add the token adaNorm and the three head RMS norms."""

    def __init__(self, cfg: DitConfig):
        super().__init__()
        bias = cfg.format == "xlabs-flux"
        self.to_k_ip = nn.Linear(cfg.context_dim, cfg.hidden_size, bias=bias)
        self.to_v_ip = nn.Linear(cfg.context_dim, cfg.hidden_size, bias=bias)
        if cfg.format == "instantx-sd3":
            self.norm_ip = AdaNorm(cfg.timestep_emb_dim, cfg.context_dim)
            self.norm_q = HeadRMSNorm(cfg.head_dim)
            self.norm_k = HeadRMSNorm(cfg.head_dim)
            self.norm_ip_k = HeadRMSNorm(cfg.head_dim)


_PROJECTIONS = {"instantx-flux": MLPProjection, "xlabs-flux": LinearProjection, "instantx-sd3": TimeResampler}


class DitAdapter(nn.Module):
    """A Flux or SD3.5 IP-Adapter: `image_proj` and one `DitBlock` per patched block, in the file's order."""

    def __init__(self, cfg: DitConfig):
        super().__init__()
        self.config = cfg
        self.image_proj = _PROJECTIONS[cfg.format](cfg)
        self.blocks = nn.ModuleList(DitBlock(cfg) for _ in range(cfg.blocks))
        self.lora: dict[str, torch.Tensor] = {}  # never used: the same attribute as `IPAdapter` for the trainer

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def image_tokens(self, embeds: torch.Tensor, sigmas: torch.Tensor) -> ImageTokens:
        """The projection with gradients: encoder output (Flux: [B, D]; SD3.5: [B, L, D]) and the step's sigmas
        [B] in (0, 1) -> `ImageTokens` (tokens [B, T, C]; SD3.5 also temb [B, E], its resampler reading
        t = sigma * 1000 as diffusers' SD3 transformer gives it)."""
        if self.config.format == "instantx-sd3":
            tokens, temb = self.image_proj(embeds, sigmas.to(embeds.device).float() * 1000)
            return ImageTokens(tokens, temb)
        return ImageTokens(self.image_proj(embeds))

    def trainable_parameters(self, include_fusion: bool = False) -> list[nn.Parameter]:
        """Everything the official layout stores: the projection and every block's image K/V (and SD3.5's
        adaptive norms and head RMS norms). DiT adapters have no fusion weights (`include_fusion` is ignored)."""
        return list(self.parameters())

    def _not_here(self, *args, **kwargs):
        raise IPAKitError(f"this node does not take the {self.config.format} ({self.config.family}) adapter yet; use "
                          "Encode Reference Image (Kit) and Apply IP-Adapter (Kit), or Apply IP-Adapter Simple (Kit)")

    # The SD1.5/SDXL-only nodes call these on a UNet adapter; a DiT adapter stops there in one line.
    check_clip_input = project = image_kv = fuse = _not_here


def module_state(cfg: DitConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under the module names of `DitAdapter` (unknown keys are kept to be reported)."""
    prefix = image_proj_prefix(cfg.format)
    file_to_module = {key: f"blocks.{j}.{name}" for j in range(cfg.blocks)
                      for name, key in block_keys(cfg.format, j).items()}
    out = {}
    for key, t in tensors.items():
        if key in file_to_module:
            out[file_to_module[key]] = t
        elif key.startswith(prefix):
            out["image_proj." + key[len(prefix):]] = t
        else:
            out[key] = t
    return out


def file_state(adapter: DitAdapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the official file's flat keys (the inverse of `module_state`), on CPU."""
    cfg = adapter.config
    prefix = image_proj_prefix(cfg.format)
    module_to_file = {f"blocks.{j}.{name}": key for j in range(cfg.blocks)
                      for name, key in block_keys(cfg.format, j).items()}
    out = {}
    for name, t in adapter.state_dict().items():
        key = module_to_file.get(name) or prefix + name[len("image_proj."):]
        out[key] = t.detach().to("cpu").contiguous()
    return out


def build_dit_adapter(cfg: DitConfig, tensors: dict[str, torch.Tensor], path: str) -> DitAdapter:
    """A `DitAdapter` holding the file's tensors; a key or shape that does not fit is one `AdapterFormatError`."""
    with torch.device("meta"):
        adapter = DitAdapter(cfg)
    sd = module_state(cfg, tensors)
    mismatch = state_mismatch(adapter.state_dict(), sd)
    if mismatch:
        raise _fail(path, f"does not match a {cfg.format} adapter: " + mismatch +
                    ". The file is incomplete or damaged: download it again")
    adapter.load_state_dict(sd, strict=True, assign=True)
    return adapter


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def load_dit(tensors: dict[str, torch.Tensor], path: str,
             metadata: dict[str, str] | None = None) -> tuple[DitAdapter, dict]:
    """-> (adapter, `inspect --json` info) for the tensors (and safetensors metadata) of a DiT adapter file."""
    cfg = detect_dit_config(tensors, path, metadata)
    adapter = build_dit_adapter(cfg, tensors, path)
    bad = non_finite_tensors(tensors)
    if bad:
        logger.warning("%s: %d tensor(s) hold NaN or infinite values (%s); this adapter will produce black or NaN "
                       "images: download it again", path, len(bad), ", ".join(bad[:3]))
    return adapter, dit_info(cfg, tensors, path, bad)


@torch.no_grad()
def init_for_training(adapter: DitAdapter) -> DitAdapter:
    """A from-scratch start: every block's image values zero, so the untrained adapter adds nothing to Flux's
    blocks (XLabs zeroes keys and biases too, as its published processor); SD3.5's adaptive norms start as the
    plain LayerNorm (zero shift and scale) and its resampler latents at N(0, 1/dim). Projections keep PyTorch's
    default initialisation (drawn from torch's generator: seeded runs are reproducible)."""
    fmt = adapter.config.format
    for block in adapter.blocks:
        nn.init.zeros_(block.to_v_ip.weight)
        if fmt == "xlabs-flux":
            nn.init.zeros_(block.to_k_ip.weight)
            nn.init.zeros_(block.to_k_ip.bias)
            nn.init.zeros_(block.to_v_ip.bias)
        if fmt == "instantx-sd3":
            nn.init.zeros_(block.norm_ip.linear.weight)
            nn.init.zeros_(block.norm_ip.linear.bias)
    if fmt == "instantx-sd3":
        proj = adapter.image_proj
        proj.latents.copy_(torch.randn(proj.latents.shape) / proj.latents.shape[-1] ** 0.5)
    return adapter
