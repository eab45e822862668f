"""Adapter modules in plain PyTorch, with the parameter names of the official IP-Adapter files.

Shapes use B (batch), N (reference images per sample), L (CLIP tokens, 257 for a 224 px ViT/14),
T (image tokens after projection), S (text tokens), C (cross-attention width), D (CLIP width).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EncoderMismatchError
from .config import AdapterConfig, ResamplerConfig, encoder_for, encoder_spec


class PlainProjection(nn.Module):
    """`image_embeds` [B, D] -> T tokens [B, T, C]: one linear layer and a LayerNorm (keys proj.*, norm.*)."""

    def __init__(self, clip_dim: int, cross_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_dim = cross_dim
        self.proj = nn.Linear(clip_dim, num_tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds).reshape(-1, self.num_tokens, self.cross_dim)  # [B, T, C]
        return self.norm(tokens)


class FullProjection(nn.Module):
    """Penultimate hidden states [B, L, D] -> [B, L, C], one token per CLIP token (keys proj.0, proj.2, proj.3)."""

    def __init__(self, clip_dim: int, cross_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(clip_dim, clip_dim),
            nn.GELU(),
            nn.Linear(clip_dim, cross_dim),
            nn.LayerNorm(cross_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """Latents attend to [image tokens; latents]. Keys norm1, norm2, to_q, to_kv, to_out (no biases)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)  # [B, L, dim]
        latents = self.norm2(latents)  # [B, Q, dim]
        q = self.to_q(latents)  # [B, Q, inner]
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # [B, L+Q, inner] each
        out = multihead_attention(q, k, v, self.heads)  # [B, Q, inner]
        return self.to_out(out)


class _FeedForward(nn.Sequential):
    """LayerNorm, Linear (no bias), GELU, Linear (no bias): keys 0, 1, 3 as in the official files."""

    def __init__(self, dim: int, mult: int):
        inner = dim * mult
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class Perceiver(nn.Module):
    """Latents [B, Q, dim] read hidden states [B, L, D] through perceiver layers -> [B, Q, C]
    (keys proj_in, layers, proj_out, norm_out)."""

    def __init__(self, clip_dim: int, cross_dim: int, cfg: ResamplerConfig):
        super().__init__()
        self.proj_in = nn.Linear(clip_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cross_dim)
        self.norm_out = nn.LayerNorm(cross_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), _FeedForward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )

    def read(self, latents: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden)  # [B, L, dim]
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # [B, Q, C]


class Resampler(Perceiver):
    """The *plus* projection: Q learned latents read the CLIP hidden states [B, L, D] -> [B, Q, C]."""

    def __init__(self, clip_dim: int, cross_dim: int, num_tokens: int, cfg: ResamplerConfig):
        super().__init__(clip_dim, cross_dim, cfg)
        self.latents = nn.Parameter(torch.randn(1, num_tokens, cfg.dim) / cfg.dim**0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.read(self.latents.repeat(hidden.shape[0], 1, 1), hidden)


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head. q [B, Lq, H*d], k/v [B, Lk, H*d] -> [B, Lq, H*d]."""
    b, lq, inner = q.shape
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)  # [B, H, Lq, d]
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)  # [B, H, Lk, d]
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, Lq, d]
    return out.transpose(1, 2).reshape(b, lq, inner)


class TextImageFusion(nn.Module):
    """Fused mode: image tokens attend to the prompt, then are mixed back with weight lambda.

    Q = W_q(ip) [B, T, C], K = W_k(text), V = W_v(text) [B, S, C]; single-head attention scaled by 1/sqrt(C);
    output `lam * ip + (1 - lam) * attn`. With `trainable=False` the three projections are identities
    (the parameter-free form used for files that carry no fusion weights).
    """

    def __init__(self, dim: int, trainable: bool = True):
        super().__init__()
        self.dim = dim
        self.trainable = trainable
        if trainable:
            self.query = nn.Linear(dim, dim)
            self.key = nn.Linear(dim, dim)
            self.value = nn.Linear(dim, dim)
            # Start as identity maps: an untrained module then behaves like the parameter-free form,
            # and fine-tuning departs from a sensible point instead of random text projections.
            for lin in (self.query, self.key, self.value):
                nn.init.eye_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, ip_tokens: torch.Tensor, text: torch.Tensor, lam: float) -> torch.Tensor:
        if text.shape[-1] != self.dim:
            raise EncoderMismatchError(
                f"fusion expects text hidden states of width {self.dim} (the cross-attention width), got "
                f"{tuple(text.shape)}; the prompt must come from the text encoder of the adapter's base model"
            )
        if text.shape[0] != ip_tokens.shape[0]:
            if ip_tokens.shape[0] == 1:
                ip_tokens = ip_tokens.expand(text.shape[0], -1, -1)
            elif text.shape[0] == 1:
                text = text.expand(ip_tokens.shape[0], -1, -1)
        if lam == 1.0:
            return ip_tokens
        text = text.to(ip_tokens.dtype)
        if self.trainable:
            q, k, v = self.query(ip_tokens), self.key(text), self.value(text)
        else:
            q, k, v = ip_tokens, text, text
        # [B, T, C] x [B, S, C]: one head over the full width, scale 1/sqrt(C)
        attn = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return lam * ip_tokens + (1.0 - lam) * attn


class IPLayer(nn.Module):
    """Image key/value projections of one cross-attention layer: [B, T, C] -> [B, T, hidden]."""

    def __init__(self, cross_dim: int, hidden: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, hidden, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, hidden, bias=False)


def layer_key(index: int) -> str:
    """Official key of cross-attention layer `index` (0-based, diffusers processor order): 1, 3, 5, ..."""
    return str(2 * index + 1)


class IPAdapter(nn.Module):
    """An IP-Adapter: projection model, per-layer image K/V, optional fusion weights.

    `state_dict()` keys are exactly the official flat layout (`image_proj.*`, `ip_adapter.{2k+1}.to_{k,v}_ip.weight`)
    plus `fusion.{query,key,value}.*` when the adapter carries fusion weights.
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        c = config
        if c.is_faceid:
            from .faceid import build_face_projection

            self.image_proj: nn.Module = build_face_projection(c)
        elif c.projection == "plain":
            self.image_proj = PlainProjection(c.clip_embedding_dim, c.cross_attention_dim, c.num_tokens)
        elif c.projection == "full":
            self.image_proj = FullProjection(c.clip_embedding_dim, c.cross_attention_dim)
        else:
            assert c.resampler is not None
            self.image_proj = Resampler(c.clip_embedding_dim, c.cross_attention_dim, c.num_tokens, c.resampler)
        self.ip_adapter = nn.ModuleDict(
            {layer_key(i): IPLayer(c.cross_attention_dim, h) for i, h in enumerate(c.layer_hidden_sizes)}
        )
        self.fusion = TextImageFusion(c.cross_attention_dim) if c.fusion else None
        self._free_fusion = TextImageFusion(c.cross_attention_dim, trainable=False)
        # FaceID: the file's LoRA (`{i}.to_X_lora.{down,up}.weight`), applied to the UNet by the host, not here.
        self.lora: dict[str, torch.Tensor] = {}

    @property
    def layers(self) -> list[IPLayer]:
        return list(self.ip_adapter.values())  # type: ignore[arg-type]

    def check_clip_input(self, embeds: torch.Tensor, source: str = "CLIP vision output") -> None:
        """Raise EncoderMismatchError naming the needed encoder when `embeds` cannot come from it."""
        c = self.config
        if c.is_faceid:
            raise EncoderMismatchError(
                f"this {c.variant} adapter reads face embeddings, not a CLIP vision output; encode the reference with "
                "the FaceID encode node (Encode Face (Kit)) instead")
        want = c.clip_embedding_dim
        got = int(embeds.shape[-1])
        penultimate = c.clip_output == "penultimate"
        bad_rank = (penultimate and embeds.dim() < 3) or (not penultimate and embeds.dim() not in (2, 3))
        if got == want and not bad_rank:
            return
        need = c.encoder if c.encoder != "unknown" else f"an encoder with {c.clip_output} width {want}"
        given = encoder_for(c.clip_output, got)
        other = encoder_for("penultimate" if not penultimate else "image_embeds", got)
        given_txt = given if given != "unknown" else (other if other != "unknown" else f"width {got}")
        hint = ""
        spec = encoder_spec(c.encoder)
        if spec is not None:
            hint = f" Load the {spec.name} CLIP vision model (usually {spec.file_hint}) instead."
        what = "penultimate hidden states [B, tokens, width]" if penultimate else "image_embeds [B, width]"
        raise EncoderMismatchError(
            f"this {c.variant} adapter needs {need} ({what}, width {want}) but the {source} has shape "
            f"{tuple(embeds.shape)} ({given_txt}).{hint}"
        )

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """CLIP output -> image tokens [B, N*T, C].

        Args:
            embeds: `image_embeds` [B, D] or [B, N, D] (plain), or penultimate hidden states [B, L, D] or
                [B, N, L, D] (plus, full). N reference images are projected separately and their tokens
                concatenated, as diffusers does.
        """
        self.check_clip_input(embeds)
        per_image_rank = 1 if self.config.projection == "plain" else 2
        lead = embeds.shape[: embeds.dim() - per_image_rank]
        b = lead[0] if len(lead) else 1
        flat = embeds.reshape(-1, *embeds.shape[embeds.dim() - per_image_rank :])  # [B*N, ...]
        tokens = self.image_proj(flat)  # [B*N, T, C]
        return tokens.reshape(b, -1, tokens.shape[-1])  # [B, N*T, C]

    def project_face(self, face: torch.Tensor, clip: torch.Tensor | None = None, shortcut_scale: float = 1.0) -> torch.Tensor:
        """FaceID: face embeddings [N, 512] (+ the crops' CLIP hidden states [N, L, D] for plus) -> tokens [N, T, C]."""
        from .faceid import project_face

        if not self.config.is_faceid:
            raise EncoderMismatchError(
                f"this {self.config.variant} adapter is not a FaceID adapter and cannot use face embeddings; encode "
                "the reference with Encode Reference Image (Kit), or load a FaceID adapter")
        return project_face(self.image_proj, self.config, face, clip, shortcut_scale)

    def fuse(self, ip_tokens: torch.Tensor, text: torch.Tensor, lam: float) -> torch.Tensor:
        """Fused mode: mix the image tokens with their attention over the prompt (trained weights if present)."""
        module = self.fusion if self.fusion is not None else self._free_fusion
        return module(ip_tokens, text, lam)

    def image_kv(self, ip_tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Image keys/values of every layer: [B, T, C] -> [(k [B, T, hidden], v [B, T, hidden]), ...]."""
        return [(layer.to_k_ip(ip_tokens), layer.to_v_ip(ip_tokens)) for layer in self.layers]

    def trainable_parameters(self, include_fusion: bool = True) -> list[nn.Parameter]:
        params = list(self.image_proj.parameters()) + list(self.ip_adapter.parameters())
        if include_fusion and self.fusion is not None:
            params += list(self.fusion.parameters())
        return params

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.state_dict().values())
