"""What the Flux and MMDiT patches share: one applied DiT adapter, its image tokens per cond/uncond row, the sigma
window, per-block weights, and chaining onto a patch already registered at the same block.

ComfyUI calls a `dit` block patch as `patch(args, extra)`; `args["transformer_options"]` carries `sigmas` (the
call's sigma per row) and `cond_or_uncond` (the order of the cond (0) / uncond (1) chunks of the batch), and
`extra["original_block"](args)` runs the unpatched block.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...adapter.dit_attention import flux_image_kv
from ...adapter.dit_modules import DitAdapter
from ...adapter.references import combine_clip, reference_weights, token_weights
from ...errors import IPAKitError
from ..placement import adapter_on, as_device
from .dit_call import CallInfo, call_info, fuse_rows, row_factor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DitEmbeds:
    """Encoder outputs of the references for a DiT adapter, projected by the apply (SD3.5's projection depends on
    the step). cond [N, ...] (N references), uncond [N or 1, ...]; `method` combines the N references."""

    cond: torch.Tensor
    uncond: torch.Tensor
    format: str
    method: str = "concat"
    weights: tuple[float, ...] | None = None

    def __repr__(self) -> str:
        return f"DitEmbeds({self.format}, {tuple(self.cond.shape)}, {self.method})"


def project(adapter: DitAdapter, feats: torch.Tensor, method: str, weights: Sequence[float] | None,
            timestep: torch.Tensor | None = None,
            memo: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """References' encoder outputs [N, ...] -> (tokens [1, N*T or T, C], temb [1, E] or None, value weights [N*T]).

    memo: a dict kept across calls with the same `feats` (a sampler's steps): holds the SD3.5 resampler's input
    projection, which does not depend on the step."""
    n = feats.shape[0]
    w = reference_weights(weights, n)
    combined = combine_clip(feats, method, None if method == "concat" else w)
    x = combined[0] if method == "concat" else combined  # concat: each reference projected on its own
    p = adapter.image_proj
    proj_dtype = next(p.parameters()).dtype
    x = x.to(proj_dtype)
    if timestep is None:
        tokens, temb = p(x), None
    else:
        if memo is not None and "proj_in" not in memo:
            memo["proj_in"] = p.proj_in(x)
        tokens, temb = p(x, timestep.to(x.device).expand(x.shape[0]), None if memo is None else memo["proj_in"])
        temb = temb[:1]  # the time embedding does not depend on the image
    tw = token_weights(w, tokens.shape[1]) if method == "concat" else None
    return tokens.reshape(1, -1, tokens.shape[-1]), temb, tw


def sigma_of(transformer_options: dict) -> float:
    sigmas = transformer_options.get("sigmas")
    return float("inf") if sigmas is None else float(sigmas.detach().flatten()[0])


def chunks_of(transformer_options: dict, batch: int) -> list[int]:
    """cond (0) / uncond (1) label of each batch row of this call."""
    cou = list(transformer_options.get("cond_or_uncond") or [0])
    per = batch // len(cou)
    if per * len(cou) != batch:
        raise IPAKitError(f"a model call of batch {batch} cannot be split into {len(cou)} cond/uncond chunks")
    return [c for c in cou for _ in range(per)]


def row_tensor(per_side: dict[int, torch.Tensor], labels: list[int]) -> torch.Tensor:
    """{0: t_cond [1, ...], 1: t_uncond [1, ...]} -> [B, ...] following the row labels."""
    if all(lab == labels[0] for lab in labels):
        t = per_side[labels[0]]
        return t.expand(len(labels), *t.shape[1:])
    return torch.cat([per_side[lab] for lab in labels])


class DitApplication:
    """One DiT adapter applied to a model.

    Args:
        adapter: the loaded adapter; block j of the adapter patches the model block `block_of[j]`.
        embeds: the references' encoder outputs.
        weight: global weight; `block_weights[j]` multiplies it for adapter block j (0: that block is skipped).
        sigma_start, sigma_end: the branch is on while sigma_end <= sigma <= sigma_start.
        heads: the model's attention heads.
        mask: optional [1, H, W] multiplier of the image term over the generated image (all zeros: off).
        mode, fusion_lambda: "fused" with lambda < 1 fuses the cond rows' image tokens with their prompt per call.
    """

    def __init__(self, adapter: DitAdapter, embeds: DitEmbeds, weight: float, block_weights: Sequence[float],
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, heads: int = 1,
                 mask: torch.Tensor | None = None, mode: str = "scaled", fusion_lambda: float = 1.0):
        if mode not in ("scaled", "fused"):
            raise IPAKitError(f"mode must be 'scaled' or 'fused', got {mode!r}")
        self.adapter, self.embeds, self.heads = adapter, embeds, heads
        self.format = adapter.config.format
        self.uid = uuid.uuid4().hex
        off = mask is not None and not bool((mask != 0).any())  # a mask of zeros: the unpatched model exactly
        self.weights = [0.0 if off else float(weight) * float(b) for b in block_weights]
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self.mask = mask
        self.fusion_lambda = float(fusion_lambda)
        self.fused = mode == "fused" and self.fusion_lambda != 1.0
        self._kv: dict[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._tokens: dict[Any, Any] = {}
        self._factors: dict[Any, torch.Tensor | None] = {}
        self._memo: dict[Any, dict[int, dict]] = {}  # (device, dtype) -> side -> `project`'s step-independent parts

    def __deepcopy__(self, memo: dict) -> DitApplication:
        return self  # holds the adapter and its K/V: model clones share it, nothing in it changes per model

    def block_weight(self, j: int, transformer_options: dict) -> float:
        """The weight of adapter block j in this call (0 outside the sigma window)."""
        w = self.weights[j]
        if w == 0 or not self.sigma_end <= sigma_of(transformer_options) <= self.sigma_start:
            return 0.0
        return w

    def _projected(self, device: torch.device, dtype: torch.dtype, timestep: torch.Tensor | None = None):
        """{0: (tokens, temb, value weights), 1: ...}; Flux: once per apply, SD3.5: once per step (by sigma)."""
        key = (device, dtype, None if timestep is None else float(timestep))
        if key not in self._tokens:
            if timestep is None or len(self._tokens) > 4:
                self._tokens = {k: v for k, v in self._tokens.items() if k[2] is None}
            e = self.embeds
            n = e.cond.shape[0]  # the uncond side is combined as the N references, so both have as many tokens
            uncond = e.uncond if e.uncond.shape[0] == n else e.uncond[:1].expand(n, *e.uncond.shape[1:])
            with torch.no_grad():
                adapter = self.on(device)
                like = next(adapter.parameters())
                memo = self._memo.setdefault((device, like.dtype), {0: {}, 1: {}})
                out = {c: project(adapter, feats.to(like), e.method, e.weights, timestep, memo[c])
                       for c, feats in ((0, e.cond), (1, uncond))}
            self._tokens[key] = {c: (t.to(dtype), None if te is None else te.to(dtype), tw)
                                 for c, (t, te, tw) in out.items()}
        return self._tokens[key]

    def fused_tokens(self, text: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        """Fused mode, once per model call: per-row image tokens [B, T, C] (fp32), the cond rows fused with their
        prompt `text` [B, S, C] (SD3.5: the tokens of this step)."""
        labels = chunks_of(transformer_options, text.shape[0])
        sigma = sigma_of(transformer_options)
        timestep = None if self.format != "instantx-sd3" else torch.tensor([sigma * 1000.0], device=text.device)
        toks = self._projected(text.device, torch.float32, timestep)
        with torch.no_grad():
            return fuse_rows(row_tensor({c: v[0] for c, v in toks.items()}, labels), text, labels, self.fusion_lambda)

    def call_tokens(self, info: CallInfo | None) -> torch.Tensor | None:
        return None if info is None else info.fused.get(self.uid)

    def factor(self, info: CallInfo | None, rows: int, lead: int, batch: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor | None:
        """The per-row multiplier of this application's image term (`dit_call.row_factor`), cached per call shape."""
        key = (device, dtype, rows, lead, batch, None if info is None else info.grid)
        if key not in self._factors:
            if len(self._factors) > 64:
                self._factors.clear()
            self._factors[key] = row_factor(self.mask, info, rows, lead, batch, device, dtype)
        return self._factors[key]

    def flux_kv(self, j: int, labels: list[int], device: torch.device, dtype: torch.dtype,
                info: CallInfo | None = None):
        """Image K/V of adapter block j for the rows of this call: [B, H, T, D] each (computed once per apply;
        in fused mode from this call's fused tokens)."""
        fused = self.call_tokens(info)
        if fused is not None:
            tw = self._projected(device, torch.float32)[0][2]
            block = self.on(device).blocks[j]
            with torch.no_grad():
                k, v = _weighted(flux_image_kv(block, fused.to(next(block.parameters())), self.heads, self.format), tw)
            return k.to(device, dtype), v.to(device, dtype)
        key = (j, device, dtype)
        if key not in self._kv:
            # projected and multiplied in the adapter's own dtype (fp32), cast once to the call's compute dtype
            block = self.on(device).blocks[j]
            toks = self._projected(device, next(block.parameters()).dtype)
            with torch.no_grad():
                self._kv[key] = {c: tuple(x.to(dtype) for x in _weighted(flux_image_kv(block, t, self.heads,
                                                                                       self.format), tw))
                                 for c, (t, _, tw) in toks.items()}
        kv = self._kv[key]
        return row_tensor({c: kv[c][0] for c in kv}, labels), row_tensor({c: kv[c][1] for c in kv}, labels)

    def sd3_tokens(self, sigma: float, labels: list[int], device: torch.device, dtype: torch.dtype,
                   info: CallInfo | None = None):
        """Resampler tokens [B, T, C] and time embedding [B, E] of this step, and the value weights (per sigma);
        in fused mode the tokens are this call's fused ones."""
        toks = self._projected(device, dtype, torch.tensor([sigma * 1000.0], device=device))
        fused = self.call_tokens(info)
        tokens = row_tensor({c: v[0] for c, v in toks.items()}, labels) if fused is None else fused.to(device, dtype)
        temb = row_tensor({c: v[1] for c, v in toks.items()}, labels)
        return tokens, temb, toks[0][2]

    def on(self, device: Any) -> DitAdapter:
        """The adapter on `device`: itself, or a shared frozen copy there; the one given is never moved or cast."""
        return adapter_on(self.adapter, device)

    def to(self, target: Any) -> DitApplication:
        """ComfyUI moves patches with the model (`.to(device)`, `.to(model dtype)`): nothing given moves; the cached
        tokens and K/V of another device are dropped, new ones are made in the dtype of the first call's query."""
        if not isinstance(target, torch.dtype):
            device = as_device(target)
            for cache in (self._kv, self._tokens, self._factors, self._memo):
                for key in [k for k in cache if _device_of(k) not in (None, device)]:
                    del cache[key]
        return self


def _device_of(key: Any) -> torch.device | None:
    parts = key if isinstance(key, tuple) else (key,)
    return next((as_device(p) for p in parts if isinstance(p, torch.device)), None)


def _weighted(kv: tuple[torch.Tensor, torch.Tensor], tw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-reference weights under concat scale that reference's image values (its share of the attention)."""
    k, v = kv
    return (k, v) if tw is None else (k, v * tw.to(v).view(1, 1, -1, 1))


class BlockPatch:
    """A `dit` block patch holding every one of our applications at that block, on top of an optional base patch.

    A patch registered there before us (another pack's, at the same patch point) keeps running: it receives our
    patched block as its `original_block`. Several of our applies share one patch, so the block is recomputed once.
    """

    def __init__(self, run: Callable[[Any, list, dict, dict], dict], block: Any, entries: tuple = (), base: Any = None):
        self.run, self.block, self.entries, self.base = run, block, tuple(entries), base
        self._told = False

    def holds(self, app: DitApplication) -> bool:
        return any(a is app for a, _ in self.entries) or (isinstance(self.base, BlockPatch) and self.base.holds(app))

    def with_entry(self, entry: Any) -> BlockPatch:
        return type(self)(self.run, self.block, self.entries + (entry,), self.base)

    def __call__(self, args: dict, extra: dict) -> dict:
        if self.base is None:
            return self._ours(args, extra)
        saved = _streams(args)  # ComfyUI's Flux blocks add into their inputs in place; a base may run one on them
        called = []

        def ours(a: dict) -> dict:
            called.append(True)
            return self._ours(a, extra)

        out = self.base(args, {**extra, "original_block": ours})
        if called:
            return out
        return self._add_our_difference(out, {**args, **saved}, extra)

    def _add_our_difference(self, out: dict, args: dict, extra: dict) -> dict:
        """The base patch recomputed the block itself and never called the block it was given (the InstantX SD3
        pack does so): our adapters are added as the change they make to the unpatched block, to first order the
        same as both terms inside one attention (exact up to the block's MLP on the shifted stream)."""
        to = args.get("transformer_options") or {}
        if not any(app.block_weight(j, to) != 0 for app, j in self.entries):
            return out
        if not self._told:
            logger.info("a dit block patch of another node pack does not call the block it is given; the IP-Adapter "
                        "Kit adds its adapters' change to that block on top of that pack's result")
            self._told = True
        ours = self._ours({**args, **_streams(args)}, extra)
        plain = extra["original_block"]({**args, **_streams(args)})
        return {k: out[k] + (ours[k] - plain[k]) if isinstance(out.get(k), torch.Tensor) else out.get(k) for k in out}

    def _ours(self, args: dict, extra: dict) -> dict:
        to = args.get("transformer_options") or {}
        active = [(app, j, w) for app, j in self.entries if (w := app.block_weight(j, to)) != 0]
        info = call_info(to)
        if info is not None:
            active = [(app, j, w) for app, j, w in active if (app.uid, j) not in info.ran]
            info.ran.update((app.uid, j) for app, j, _ in active)
        if not active:
            return extra["original_block"](args)
        return self.run(self.block, active, args, extra)

    def __deepcopy__(self, memo: dict) -> BlockPatch:
        return type(self)(self.run, self.block, self.entries, self.base)

    def to(self, device: Any) -> BlockPatch:
        for app, _ in self.entries:
            app.to(device)
        if self.base is not None and hasattr(self.base, "to"):
            self.base.to(device)
        return self


def _streams(args: dict) -> dict:
    """Copies of a block call's img / txt streams."""
    return {k: args[k].clone() for k in ("img", "txt") if isinstance(args.get(k), torch.Tensor)}


def add_to(existing: Any, run: Callable, block: Any, entry: tuple) -> BlockPatch:
    """The patch to register at a block: ours extended, or a new one over whatever was there."""
    if isinstance(existing, BlockPatch) and existing.run is run and existing.block is block:
        return existing.with_entry(entry)
    return BlockPatch(run, block, (entry,), existing)


def restorer(app: DitApplication, patches: dict) -> Callable[[dict], dict | None]:
    """For the per-call wrapper: a pack that registers its patch at one of our blocks after us replaces ours; at each
    call, put ours back on top of it (`add_to`). -> the `dit` patches to use, or None when ours are all there."""
    sites = {key: (p.run, p.block, p.entries[-1]) for key, p in patches.items()}

    def restore(dit: dict) -> dict | None:
        missing = {key: add_to(dit.get(key), run, block, entry) for key, (run, block, entry) in sites.items()
                   if not (isinstance(dit.get(key), BlockPatch) and dit[key].holds(app))}
        return {**dit, **missing} if missing else None
    return restore


def block_function(block: Any, name: str, transformer_options: dict) -> Callable:
    """The host's function `name` for this block (`host_function`), or the one this call replaces it with
    (`CallInfo.functions`: training swaps in differentiable attention)."""
    info = call_info(transformer_options)
    if info is not None and name in info.functions:
        return info.functions[name]
    return host_function(block, name)


def host_function(block: Any, name: str) -> Callable:
    """A function of the module that defines the host's block class (its attention, its modulation helper), so
    the recomputed block uses exactly the host's own code; the host is never imported here."""
    fn = getattr(sys.modules.get(type(block).__module__), name, None)
    if fn is None:
        raise IPAKitError(f"this ComfyUI's {type(block).__name__} module has no '{name}'; the DiT IP-Adapter patch "
                          "needs ComfyUI 0.8.0 or newer: update ComfyUI")
    return fn
