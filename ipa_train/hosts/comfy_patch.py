"""Image attention in ComfyUI's attn2 *replace* contract, host-free (this module never imports ComfyUI).

ComfyUI calls a replace patch as `patch(q, k, v, extra_options)` with q = to_q(x) [B, HW, inner] and
k/v = to_k/to_v(text) [B, S, inner], and applies `to_out` to what it returns. `extra_options` carries
`cond_or_uncond` (the order of the cond (0) / uncond (1) chunks in the batch), `sigmas`, `original_shape`,
`n_heads` and `transformer_options` entries. The node layer injects the host's own text-attention function,
so that a patch whose image branch is off returns exactly what the unpatched layer computes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..adapter.attention import add_image_attention, mask_for_layer
from ..adapter.modules import IPAdapter, multihead_attention
from ..errors import IPAKitError
from . import frames

TextAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
CALL_KV_KEY = "ipakit_kv"  # transformer_options entry holding per-call image K/V of fused applications


def default_text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    return multihead_attention(q, k, v, extra_options["n_heads"])


@dataclass
class ImageEmbeds:
    """Projected image tokens of one reference (or combined references): cond and uncond, [1, T, C] each."""

    cond: torch.Tensor
    uncond: torch.Tensor
    variant: str
    num_images: int = 1

    def __repr__(self) -> str:
        return f"ImageEmbeds({self.variant}, tokens={tuple(self.cond.shape)}, images={self.num_images})"


def combine_references(embeds: torch.Tensor, method: str) -> torch.Tensor:
    """Several references [N, ...] of one CLIP output -> the projection input: [1, N, ...] (concat) or [1, ...] (average)."""
    if method == "concat":
        return embeds.unsqueeze(0)
    if method == "average":
        return embeds.mean(dim=0, keepdim=True)
    raise IPAKitError(f"unknown combine method {method!r}; expected 'concat' or 'average'")


def encode_embeds(adapter: IPAdapter, cond_clip: torch.Tensor, uncond_clip: torch.Tensor, method: str = "concat") -> ImageEmbeds:
    """Project CLIP outputs of N references ([N, D] or [N, L, D]) and of the unconditional side to tokens.

    The unconditional side is combined the same way, so cond and uncond have the same token count.
    """
    n = cond_clip.shape[0]
    if uncond_clip.shape[0] != n:
        uncond_clip = uncond_clip[:1].expand(n, *uncond_clip.shape[1:])
    with torch.no_grad():
        cond = adapter.project(combine_references(cond_clip, method))
        uncond = adapter.project(combine_references(uncond_clip, method))
    return ImageEmbeds(cond, uncond, adapter.config.variant, n)


class AdapterApplication:
    """One adapter applied to a model: image K/V of every layer, projected once per apply.

    Args:
        adapter: the adapter (its K/V projections are used once here; fused mode keeps it for per-call fusion).
        embeds: projected cond/uncond tokens.
        layer_weights: effective weight of each layer (weight x preset multiplier), adapter order.
        sigma_start, sigma_end: the image branch is on while sigma_end <= sigma <= sigma_start.
        mask: optional [M, H, W] multiplier of the image branch (M = 1, or one per latent frame).
        frame_weights: optional per-frame weight multipliers [F] (frame i of the latent batch; the last repeats).
        mode: "scaled" or "fused"; in fused mode the cond tokens are fused with the text of each call.
        fusion_lambda: lambda of the fused mode.
    """

    def __init__(self, adapter: IPAdapter, embeds: ImageEmbeds, layer_weights: list[float],
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, mask: torch.Tensor | None = None,
                 mode: str = "scaled", fusion_lambda: float = 1.0, frame_weights: list[float] | None = None):
        if len(layer_weights) != adapter.config.cross_attention_layers:
            raise IPAKitError(f"{len(layer_weights)} layer weights for an adapter with {adapter.config.cross_attention_layers} layers")
        if mode not in ("scaled", "fused"):
            raise IPAKitError(f"mode must be 'scaled' or 'fused', got {mode!r}")
        self.uid = uuid.uuid4().hex
        self.weights = [float(w) for w in layer_weights]
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.mask = mask
        self.mode = mode
        self.fusion_lambda = float(fusion_lambda)
        self.fused = mode == "fused" and self.fusion_lambda != 1.0
        self.adapter = adapter if self.fused else None
        self.cond_tokens = embeds.cond
        self.frame_weights = frames.check_frame_weights(frame_weights)  # [frames hook 1] per-frame weights
        with torch.no_grad():
            self.kv = {0: adapter.image_kv(embeds.cond), 1: adapter.image_kv(embeds.uncond)}  # [(k, v) [1, T, h]] per layer
        self._cache: dict[Any, Any] = {}

    # ComfyUI deep-copies model_options on every clone: share the tensors, never copy them.
    def __deepcopy__(self, memo: dict) -> AdapterApplication:
        return self

    def to(self, device: Any) -> AdapterApplication:
        self.kv = {c: [(k.to(device), v.to(device)) for k, v in layers] for c, layers in self.kv.items()}
        self.cond_tokens = self.cond_tokens.to(device)
        if self.adapter is not None:
            self.adapter.to(device)
        if self.mask is not None:
            self.mask = self.mask.to(device)
        if self.frame_weights is not None:
            self.frame_weights = self.frame_weights.to(device)
        self._cache.clear()
        return self

    def active(self, extra_options: dict) -> bool:
        sigmas = extra_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.detach().flatten()[0])
        return self.sigma_end <= sigma <= self.sigma_start

    def _batched(self, index: int, cond_or_uncond: list[int], batch: int, device: Any, dtype: Any,
                 extra_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of layer `index` in the batch's chunk order: [B, T, h] each."""
        opts = extra_options or {}
        key = (index, tuple(cond_or_uncond), batch, device, dtype, frames.frames_key(opts, batch, len(cond_or_uncond)))
        hit = self._cache.get(key)
        if hit is None:
            per_chunk = batch // max(1, len(cond_or_uncond))
            ks, vs = [], []
            for c in cond_or_uncond:
                k, v = self.kv[1 if c == 1 else 0][index]
                # [frames hook 2] per-frame embeds: row r of the chunk takes the K/V of its frame
                ks.append(frames.select_rows(k, [0], per_chunk, opts))
                vs.append(frames.select_rows(v, [0], per_chunk, opts))
            hit = (torch.cat(ks).to(device, dtype), torch.cat(vs).to(device, dtype))
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def call_kv(self, text: torch.Tensor, cond_or_uncond: list[int],
                extra_options: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fused mode, once per model call: fuse the cond tokens with each cond row's text [B, S, C]."""
        assert self.adapter is not None
        b = text.shape[0]
        per_chunk = b // max(1, len(cond_or_uncond))
        is_cond = torch.tensor([c != 1 for c in cond_or_uncond for _ in range(per_chunk)], device=text.device)
        adapter_dtype = next(self.adapter.parameters()).dtype
        with torch.no_grad():
            # [frames hook 3] per-frame embeds: each row fuses its own frame's tokens
            tokens = frames.select_rows(self.cond_tokens.to(text.device, adapter_dtype), cond_or_uncond, b, extra_options or {})
            fused = self.adapter.fuse(tokens, text.to(adapter_dtype), self.fusion_lambda)  # [B, T, C]
            cond_kv = self.adapter.image_kv(fused)
        out = []
        for (k_c, v_c), (k_u, v_u) in zip(cond_kv, self.kv[1]):
            rows = is_cond.view(-1, 1, 1)
            k_u = frames.select_rows(k_u, cond_or_uncond, b, extra_options or {})
            v_u = frames.select_rows(v_u, cond_or_uncond, b, extra_options or {})
            out.append((torch.where(rows, k_c, k_u.to(k_c)), torch.where(rows, v_c, v_u.to(v_c))))
        return out

    def image_term_kv(self, index: int, q: torch.Tensor, extra_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per_call = extra_options.get(CALL_KV_KEY, {}).get(self.uid)
        if per_call is not None:
            k, v = per_call[index]
            return k.to(q), v.to(q)
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
        return self._batched(index, cond_or_uncond, q.shape[0], q.device, q.dtype, extra_options)

    def layer_mask(self, q: torch.Tensor, extra_options: dict) -> torch.Tensor | None:
        if self.mask is None:
            return None
        shape = extra_options.get("original_shape")
        hw = (int(shape[-2]), int(shape[-1])) if shape is not None else None
        if hw is None:
            return None
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
        key = ("mask", hw, q.shape[1], q.shape[0], q.device, q.dtype,
               frames.frames_key(extra_options, q.shape[0], len(cond_or_uncond)))
        hit = self._cache.get(key)
        if hit is None:
            m = mask_for_layer(self.mask.to(q.device), hw, q.shape[1]).to(q.dtype)  # [M, Lq, 1]
            # [frames hook 4] one mask per frame: row r takes its frame's mask (M = 1 broadcasts)
            hit = self._cache[key] = frames.select_rows(m, cond_or_uncond, q.shape[0], extra_options)
        return hit

    def add_to(self, out: torch.Tensor, q: torch.Tensor, index: int, extra_options: dict) -> torch.Tensor:
        weight = self.weights[index]
        if weight == 0 or not self.active(extra_options):
            return out
        k, v = self.image_term_kv(index, q, extra_options)
        if self.frame_weights is not None:  # [frames hook 5] per-frame weights, [B] multipliers
            cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
            weight = weight * frames.frame_weight_rows(self.frame_weights, cond_or_uncond, q.shape[0], extra_options)
        return add_image_attention(out, q, k, v, extra_options["n_heads"], weight, self.layer_mask(q, extra_options))


class Attn2Replace:
    """The callable registered for one cross-attention layer; chains every adapter applied to that layer."""

    def __init__(self, text_attention: TextAttention = default_text_attention,
                 entries: tuple[tuple[AdapterApplication, int], ...] = ()):
        self.text_attention = text_attention
        self.entries = tuple(entries)

    def add(self, app: AdapterApplication, index: int) -> Attn2Replace:
        """A new patch with one more adapter (patches are shared between clones, so never mutate one)."""
        return Attn2Replace(self.text_attention, self.entries + ((app, index),))

    def __deepcopy__(self, memo: dict) -> Attn2Replace:
        return Attn2Replace(self.text_attention, self.entries)

    def to(self, device: Any) -> Attn2Replace:
        for app, _ in self.entries:
            app.to(device)
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        out = self.text_attention(q, k, v, extra_options)
        for app, index in self.entries:
            out = app.add_to(out, q, index, extra_options)
        return out


class FusionWrapper:
    """APPLY_MODEL wrapper: computes a fused application's image K/V once per model call (not once per layer)."""

    def __init__(self, app: AdapterApplication):
        self.app = app

    def __deepcopy__(self, memo: dict) -> FusionWrapper:
        return self

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None,
                 control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> Any:
        opts = dict(transformer_options or {})
        if c_crossattn is not None and self.app.fused:
            cond_or_uncond = list(opts.get("cond_or_uncond") or [0])
            per_call = dict(opts.get(CALL_KV_KEY, {}))
            per_call[self.app.uid] = self.app.call_kv(c_crossattn, cond_or_uncond, opts)  # [frames hook 6]
            opts[CALL_KV_KEY] = per_call
        return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)




def chain_patches(existing: dict, app: AdapterApplication, sites: list, text_attention: TextAttention) -> dict:
    """New attn2 replace patches, one per site key, adding `app` to whatever of ours is already there.

    Args:
        existing: the model's current `patches_replace["attn2"]` dict (key -> patch).
        sites: `layout.Site`s in adapter order (site.index is the adapter layer).
    Returns:
        key -> Attn2Replace for every site; a foreign patch already on a key is replaced (the caller warns).
    """
    out = {}
    for site in sites:
        current = existing.get(site.key)
        base = current if isinstance(current, Attn2Replace) else Attn2Replace(text_attention)
        out[site.key] = base.add(app, site.index)
    return out
