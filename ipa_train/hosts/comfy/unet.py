"""Image attention in ComfyUI's attn2 *replace* contract, host-free (this module never imports ComfyUI).

ComfyUI calls a replace patch as `patch(q, k, v, extra_options)` with q = to_q(x) [B, HW, inner] and
k/v = to_k/to_v(text) [B, S, inner], and applies `to_out` to what it returns. `extra_options` carries
`cond_or_uncond` (the order of the cond (0) / uncond (1) chunks in the batch), `sigmas`, `original_shape`,
`n_heads` and `transformer_options` entries. The node layer injects the host's own attention function: the
text branch then returns exactly what the unpatched layer computes, and the image branch runs on the same kernel
(ComfyUI's chosen one: sub-quadratic on CPU, SDPA, xformers...), so it rounds as the community pack's does.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...adapter.attention import EMBEDS_SCALING, add_image_attention, mask_for_layer, scale_image_kv
from ...adapter.modules import IPAdapter, multihead_attention
from ...adapter.references import combine_clip, reference_weights, token_weights
from ...adapter.weight_types import LayerPlan
from ...errors import IPAKitError
from .. import frames
from ..placement import DeviceCopies, adapter_on, as_device

TextAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
CALL_KV_KEY = "ipakit_kv"  # transformer_options entry holding per-call image K/V of fused applications


def default_text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    return multihead_attention(q, k, v, extra_options["n_heads"])


@dataclass
class ImageEmbeds:
    """Projected image tokens of one reference (or combined references): cond and uncond, [1, T, C] each.

    groups: how many references' tokens are concatenated (concat); the K+mean(V) scaling takes its mean per group.
    token_weights: optional [T] multiplier of each image token's value (per-reference weights under concat).
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    variant: str
    num_images: int = 1
    groups: int = 1
    token_weights: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"ImageEmbeds({self.variant}, tokens={tuple(self.cond.shape)}, images={self.num_images})"


def encode_embeds(adapter: IPAdapter, cond_clip: torch.Tensor, uncond_clip: torch.Tensor, method: str = "concat",
                  weights: Sequence[float] | torch.Tensor | None = None) -> ImageEmbeds:
    """Project CLIP outputs of N references ([N, D] or [N, L, D]) and of the unconditional side to tokens.

    The unconditional side is combined the same way, with the same weights, so cond and uncond have the same
    token count and a merge of N identical references equals that reference.
    """
    n = cond_clip.shape[0]
    if uncond_clip.shape[0] != n:
        uncond_clip = uncond_clip[:1].expand(n, *uncond_clip.shape[1:])
    w = reference_weights(weights, n)
    merge_w = None if method == "concat" else w
    like = _param_like(adapter)
    with torch.no_grad():  # the CLIP outputs may come in the encoder's dtype (fp16): the adapter's own is used
        cond = adapter.project(combine_clip(cond_clip.to(like), method, merge_w))
        uncond = adapter.project(combine_clip(uncond_clip.to(like), method, merge_w))
    groups = n if method == "concat" else 1
    tw = token_weights(w, cond.shape[1] // groups) if method == "concat" else None
    return ImageEmbeds(cond, uncond, adapter.config.variant, n, groups, tw)


def _param_like(adapter: IPAdapter) -> torch.Tensor:
    """A tensor with the adapter's device and dtype (inputs are brought to it, never the adapter to them)."""
    return next(adapter.parameters())


def _weighted_values(kv: list[tuple[torch.Tensor, torch.Tensor]], tw: torch.Tensor | None) -> list:
    if tw is None:
        return kv
    return [(k, v * tw.to(v).view(1, -1, 1)) for k, v in kv]


def layer_kv(adapter: IPAdapter, embeds: ImageEmbeds, plans: list[LayerPlan], scaling: str = "V only",
             alt: ImageEmbeds | None = None) -> tuple[dict[int, list], list[float]]:
    """Image K/V of every layer for the cond (0) and uncond (1) rows, routed and scaled per layer.

    Returns ({0: [(k, v) | None per layer], 1: [...]}, the weight left to multiply each layer's image term by).
    A layer of weight 0 gets None: it does no image-attention work.
    """
    like = _param_like(adapter)
    with torch.no_grad():
        ref = _weighted_values(adapter.image_kv(embeds.cond.to(like)), embeds.token_weights)
        neutral = _weighted_values(adapter.image_kv(embeds.uncond.to(like)), embeds.token_weights)
        if alt is not None:
            alt_c = _weighted_values(adapter.image_kv(alt.cond.to(like)), alt.token_weights)
            alt_u = _weighted_values(adapter.image_kv(alt.uncond.to(like)), alt.token_weights)
        kv: dict[int, list] = {0: [], 1: []}
        post: list[float] = []
        for i, plan in enumerate(plans):
            if plan.weight == 0:
                kv[0].append(None), kv[1].append(None), post.append(0.0)
                continue
            if plan.route == "alt" and alt is not None:
                pair, groups = (alt_c[i], alt_u[i]), alt.groups
            elif plan.route == "neg":  # the reference acts on the uncond rows only; zero tokens give a zero term
                pair, groups = ((torch.zeros_like(ref[i][0]), torch.zeros_like(ref[i][1])), ref[i]), embeds.groups
            else:
                pair, groups = (ref[i], neutral[i]), embeds.groups
            w_out = plan.weight
            for c, (k, v) in enumerate(pair):
                k, v, w_out = scale_image_kv(k, v, plan.weight, scaling, groups)
                kv[c].append((k, v))
            post.append(w_out)
    return kv, post


class AdapterApplication:
    """One adapter applied to a model: image K/V of every layer, projected once per apply.

    Args:
        adapter: the adapter (its K/V projections are used once here; fused mode keeps it for per-call fusion).
        embeds: projected cond/uncond tokens.
        layer_weights: effective weight of each layer (weight x multipliers), adapter order; or `LayerPlan`s
            (weight and route, from `adapter.weight_types`).
        sigma_start, sigma_end: the image branch is on while sigma_end <= sigma <= sigma_start.
        mask: optional [M, H, W] multiplier of the image branch (M = 1, or one per latent frame).
        frame_weights: optional per-frame weight multipliers [F] (frame i of the latent batch; the last repeats).
        mode: "scaled" or "fused"; in fused mode the cond tokens are fused with the text of each call.
        fusion_lambda: lambda of the fused mode.
        embeds_scaling: where the weight enters the attention (`adapter.attention.EMBEDS_SCALING`).
        embeds_alt: tokens of a second image, for layers routed "alt" (style and composition).
    """

    def __init__(self, adapter: IPAdapter, embeds: ImageEmbeds, layer_weights: list,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, mask: torch.Tensor | None = None,
                 mode: str = "scaled", fusion_lambda: float = 1.0, frame_weights: list[float] | None = None,
                 embeds_scaling: str = "V only", embeds_alt: ImageEmbeds | None = None):
        if len(layer_weights) != adapter.config.cross_attention_layers:
            raise IPAKitError(f"{len(layer_weights)} layer weights for an adapter with {adapter.config.cross_attention_layers} layers")
        if mode not in ("scaled", "fused"):
            raise IPAKitError(f"mode must be 'scaled' or 'fused', got {mode!r}")
        if embeds_scaling not in EMBEDS_SCALING:
            raise IPAKitError(f"embeds_scaling must be one of {', '.join(EMBEDS_SCALING)}; got {embeds_scaling!r}")
        self.uid = uuid.uuid4().hex
        self.plans = [p if isinstance(p, LayerPlan) else LayerPlan(float(p)) for p in layer_weights]
        self.weights = [p.weight for p in self.plans]
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.mask = mask
        self.mode = mode
        self.fusion_lambda = float(fusion_lambda)
        self.fused = mode == "fused" and self.fusion_lambda != 1.0
        self.adapter = adapter if self.fused else None
        self.cond_tokens = embeds.cond
        self.frame_weights = frames.check_frame_weights(frame_weights)  # [frames hook 1] per-frame weights
        self.token_weights = embeds.token_weights
        self.groups = embeds.groups
        self.embeds_scaling = embeds_scaling
        # {0: cond rows, 1: uncond rows} -> [(k, v) [1 or F, T, h] | None] per layer; post[i] multiplies layer i's term.
        # Computed once here on the adapter's device and dtype; calls use copies in their own (see `placement`).
        self.kv, self.post = layer_kv(adapter, embeds, self.plans, embeds_scaling, embeds_alt)
        self._copies = DeviceCopies()

    # ComfyUI deep-copies model_options on every clone: share the tensors, never copy them.
    def __deepcopy__(self, memo: dict) -> AdapterApplication:
        return self

    def to(self, target: Any) -> AdapterApplication:
        """ComfyUI moves patches with the model: `.to(device)` then `.to(model dtype)` at every load, `.to(offload
        device)` at unload. Nothing the patch was given moves: the adapter, embeds, mask and weights are shared with
        other nodes and later prompts. Copies on other devices are dropped; new ones are made at the first call on
        the new device, in the dtype of its query (the compute dtype: fp8-stored weights compute in the manual-cast
        dtype, so the dtype passed here is not used)."""
        if not isinstance(target, torch.dtype):
            self._copies.keep_only(target)
        return self

    def _kv_on(self, device: Any, dtype: Any) -> dict[int, list]:
        """self.kv cast once to (device, dtype)."""
        def make():
            return {c: [None if kv is None else (kv[0].to(device, dtype), kv[1].to(device, dtype)) for kv in layers]
                    for c, layers in self.kv.items()}
        return self._copies.get((as_device(device), dtype, "kv"), make)

    def _tensor_on(self, name: str, tensor: torch.Tensor, device: Any, dtype: Any) -> torch.Tensor:
        return self._copies.get((as_device(device), dtype, name), lambda: tensor.to(device, dtype))

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
        key = (as_device(device), dtype, "batched", index, tuple(cond_or_uncond), batch,
               frames.frames_key(opts, batch, len(cond_or_uncond)))

        def make():
            kv = self._kv_on(device, dtype)
            per_chunk = batch // max(1, len(cond_or_uncond))
            ks, vs = [], []
            for c in cond_or_uncond:
                k, v = kv[1 if c == 1 else 0][index]
                # [frames hook 2] per-frame embeds: row r of the chunk takes the K/V of its frame
                ks.append(frames.select_rows(k, [0], per_chunk, opts))
                vs.append(frames.select_rows(v, [0], per_chunk, opts))
            return torch.cat(ks), torch.cat(vs)
        return self._copies.get(key, make, bounded=True)

    def call_kv(self, text: torch.Tensor, cond_or_uncond: list[int],
                extra_options: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Fused mode, once per model call: fuse the cond tokens with each cond row's text [B, S, C].

        Only layers routed "ref" fuse (None elsewhere: those use the precomputed K/V)."""
        assert self.adapter is not None
        b = text.shape[0]
        per_chunk = b // max(1, len(cond_or_uncond))
        is_cond = torch.tensor([c != 1 for c in cond_or_uncond for _ in range(per_chunk)], device=text.device)
        # the adapter (or its copy on the text's device), in its own dtype: the fusion runs in full precision
        adapter = self._copies.get((as_device(text.device), None, "adapter"), lambda: adapter_on(self.adapter, text.device))
        adapter_dtype = next(adapter.parameters()).dtype
        uncond_kv = self._kv_on(text.device, adapter_dtype)[1]
        token_w = None if self.token_weights is None else self._tensor_on("tw", self.token_weights, text.device, adapter_dtype)
        with torch.no_grad():
            # [frames hook 3] per-frame embeds: each row fuses its own frame's tokens
            tokens = frames.select_rows(self._tensor_on("tokens", self.cond_tokens, text.device, adapter_dtype),
                                        cond_or_uncond, b, extra_options or {})
            fused = adapter.fuse(tokens, text.to(adapter_dtype), self.fusion_lambda)  # [B, T, C]
            cond_kv = _weighted_values(adapter.image_kv(fused), token_w)
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        rows = is_cond.view(-1, 1, 1)
        for plan, (k_c, v_c), uncond in zip(self.plans, cond_kv, uncond_kv):
            if plan.route != "ref" or uncond is None:
                out.append(None)
                continue
            k_c, v_c, _ = scale_image_kv(k_c, v_c, plan.weight, self.embeds_scaling, self.groups)
            k_u = frames.select_rows(uncond[0], cond_or_uncond, b, extra_options or {})
            v_u = frames.select_rows(uncond[1], cond_or_uncond, b, extra_options or {})
            out.append((torch.where(rows, k_c, k_u), torch.where(rows, v_c, v_u)))
        return out

    def image_term_kv(self, index: int, q: torch.Tensor, extra_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        per_call = extra_options.get(CALL_KV_KEY, {}).get(self.uid)
        if per_call is not None and per_call[index] is not None:
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
        key = (as_device(q.device), q.dtype, "mask", hw, q.shape[1], q.shape[0],
               frames.frames_key(extra_options, q.shape[0], len(cond_or_uncond)))

        def make():
            m = mask_for_layer(self.mask.to(q.device, torch.float32), hw, q.shape[1]).to(q.dtype)  # [M, Lq, 1]
            # [frames hook 4] one mask per frame: row r takes its frame's mask (M = 1 broadcasts)
            return frames.select_rows(m, cond_or_uncond, q.shape[0], extra_options)
        return self._copies.get(key, make, bounded=True)

    def add_to(self, out: torch.Tensor, q: torch.Tensor, index: int, extra_options: dict,
               attention: TextAttention | None = None) -> torch.Tensor:
        """`out` + this adapter's image term at layer `index`; `attention` is the host's kernel (as for the text)."""
        if self.weights[index] == 0 or not self.active(extra_options):
            return out  # no image-attention work at all
        k, v = self.image_term_kv(index, q, extra_options)
        weight = self.post[index]
        if self.frame_weights is not None:  # [frames hook 5] per-frame weights, [B] multipliers
            cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
            table = self._tensor_on("frame_weights", self.frame_weights, q.device, torch.float32)
            weight = weight * frames.frame_weight_rows(table, cond_or_uncond, q.shape[0], extra_options)
        attend = None if attention is None else (lambda q_, k_, v_, heads: attention(q_, k_, v_, extra_options))
        return add_image_attention(out, q, k, v, extra_options["n_heads"], weight, self.layer_mask(q, extra_options),
                                   attend)


def _community_active(kwargs: dict, extra_options: dict) -> bool:
    """The sigma gate of an adapter added through the community pack's protocol (its kwargs carry the bounds)."""
    sigmas = extra_options.get("sigmas")
    sigma = float(sigmas.detach().flatten()[0]) if sigmas is not None else float("inf")
    return float(kwargs.get("sigma_end", 0.0)) <= sigma <= float(kwargs.get("sigma_start", float("inf")))


class Attn2Replace:
    """The callable registered for one cross-attention layer; chains every adapter applied to that layer.

    It coexists with the community pack (cubiq/ComfyUI_IPAdapter_plus) on one key, in either order:
    - `base`: a patch of another pack that was on this key when ours came; it computes text attention plus its
      own image terms, and ours are added to its result;
    - `add(callback, **kwargs)`: the protocol that pack uses to chain one more adapter onto whatever patch holds
      the key: in place, `out += callback(out, q, k, v, extra_options, **kwargs)` while its sigma gate holds.
    """

    def __init__(self, text_attention: TextAttention = default_text_attention,
                 entries: tuple[tuple[AdapterApplication, int], ...] = (), base: Callable | None = None,
                 community: list[tuple[Callable, dict]] | None = None):
        self.text_attention = text_attention
        self.entries = tuple(entries)
        self.base = base
        self.community = list(community or [])

    def add(self, app: Any, index: int | None = None, **kwargs: Any) -> Attn2Replace | None:
        """Ours: `add(app, index)` returns a new patch with one more adapter (patches are shared between clones,
        so ours never mutate one). The community pack's `add(callback, **kwargs)` chains in place."""
        if isinstance(app, AdapterApplication):
            return Attn2Replace(self.text_attention, self.entries + ((app, int(index)),), self.base, self.community)
        self.community.append((app, kwargs))
        return None

    def __deepcopy__(self, memo: dict) -> Attn2Replace:
        return Attn2Replace(self.text_attention, self.entries, self.base, self.community)

    def to(self, device: Any) -> Attn2Replace:
        for app, _ in self.entries:
            app.to(device)
        if self.base is not None and hasattr(self.base, "to"):
            self.base.to(device)
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        base = self.base if self.base is not None else self.text_attention
        out = base(q, k, v, extra_options)
        for app, index in self.entries:
            out = app.add_to(out, q, index, extra_options, self.text_attention)
        for callback, kwargs in self.community:
            if _community_active(kwargs, extra_options):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


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




def patch_key(site: Any, depth: int, existing: dict) -> tuple:
    """The attn2 key to patch a site under: ComfyUI looks a layer up by `(section, block_id, block_index)` first,
    then by `(section, block_id)`. A spatial transformer of depth 1 (every SD1.5 layer) is patched under the short
    key, where the community pack patches it, so that neither pack shadows the other; the long key is used for
    deeper ones (SDXL), or when a patch is already there."""
    if depth > 1 or site.key in existing:
        return site.key
    return site.key[:2]


def chain_patches(existing: dict, app: AdapterApplication, sites: list, text_attention: TextAttention) -> dict:
    """New attn2 replace patches, one per site, adding `app` to whatever is already on the site's key.

    Args:
        existing: the model's current `patches_replace["attn2"]` dict (key -> patch).
        sites: `layout.Site`s in adapter order (site.index is the adapter layer).
    Returns:
        key (2 or 3 parts, see `patch_key`) -> Attn2Replace; ours already there is extended (a new object), a
        patch of another pack becomes the new patch's base.
    """
    depth: dict[tuple, int] = {}
    for site in sites:
        depth[site.key[:2]] = depth.get(site.key[:2], 0) + 1
    out = {}
    for site in sites:
        key = patch_key(site, depth[site.key[:2]], existing)
        # the patch ComfyUI calls for this layer now
        current = existing.get(site.key, existing.get(site.key[:2]))
        if isinstance(current, Attn2Replace):
            base = current
        else:
            base = Attn2Replace(text_attention, base=current if callable(current) else None)
        out[key] = base.add(app, site.index)
    return out
