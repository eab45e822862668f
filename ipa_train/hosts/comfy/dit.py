"""What the Flux and MMDiT patches share: one applied DiT adapter, its image tokens per cond/uncond row, the sigma
window, per-block weights, and chaining onto a patch already registered at the same block.

ComfyUI calls a `dit` block patch as `patch(args, extra)`; `args["transformer_options"]` carries `sigmas` (the
call's sigma per row) and `cond_or_uncond` (the order of the cond (0) / uncond (1) chunks of the batch), and
`extra["original_block"](args)` runs the unpatched block.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...adapter.dit_attention import flux_image_kv
from ...adapter.dit_modules import DitAdapter
from ...adapter.references import combine_clip, reference_weights, token_weights
from ...errors import IPAKitError

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
            timestep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """References' encoder outputs [N, ...] -> (tokens [1, N*T or T, C], temb [1, E] or None, value weights [N*T])."""
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
        tokens, temb = p(x, timestep.to(x.device).expand(x.shape[0]))
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
    """

    def __init__(self, adapter: DitAdapter, embeds: DitEmbeds, weight: float, block_weights: Sequence[float],
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, heads: int = 1):
        self.adapter, self.embeds, self.heads = adapter, embeds, heads
        self.format = adapter.config.format
        self.weights = [float(weight) * float(b) for b in block_weights]
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self._kv: dict[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._tokens: dict[Any, Any] = {}

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
            with torch.no_grad():
                out = {c: project(self.adapter, feats.to(device), e.method, e.weights, timestep)
                       for c, feats in ((0, e.cond), (1, e.uncond))}
            self._tokens[key] = {c: (t.to(dtype), None if te is None else te.to(dtype), tw)
                                 for c, (t, te, tw) in out.items()}
        return self._tokens[key]

    def flux_kv(self, j: int, labels: list[int], device: torch.device, dtype: torch.dtype):
        """Image K/V of adapter block j for the rows of this call: [B, H, T, D] each (computed once per apply)."""
        key = (j, device, dtype)
        if key not in self._kv:
            toks = self._projected(device, dtype)
            with torch.no_grad():
                self._kv[key] = {c: _weighted(flux_image_kv(self.adapter.blocks[j], t, self.heads, self.format), tw)
                                 for c, (t, _, tw) in toks.items()}
        kv = self._kv[key]
        return row_tensor({c: kv[c][0] for c in kv}, labels), row_tensor({c: kv[c][1] for c in kv}, labels)

    def sd3_tokens(self, sigma: float, labels: list[int], device: torch.device, dtype: torch.dtype):
        """Resampler tokens [B, T, C] and time embedding [B, E] of this step, and the value weights (per sigma)."""
        toks = self._projected(device, dtype, torch.tensor([sigma * 1000.0], device=device))
        tokens = row_tensor({c: v[0] for c, v in toks.items()}, labels)
        temb = row_tensor({c: v[1] for c, v in toks.items()}, labels)
        return tokens, temb, toks[0][2]

    def to(self, device: Any) -> DitApplication:
        self.adapter.to(device)
        return self


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

    def with_entry(self, entry: Any) -> BlockPatch:
        return type(self)(self.run, self.block, self.entries + (entry,), self.base)

    def __call__(self, args: dict, extra: dict) -> dict:
        if self.base is None:
            return self._ours(args, extra)
        return self.base(args, {**extra, "original_block": lambda a: self._ours(a, extra)})

    def _ours(self, args: dict, extra: dict) -> dict:
        to = args.get("transformer_options") or {}
        active = [(app, j, w) for app, j in self.entries if (w := app.block_weight(j, to)) != 0]
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


def add_to(existing: Any, run: Callable, block: Any, entry: tuple) -> BlockPatch:
    """The patch to register at a block: ours extended, or a new one over whatever was there."""
    if isinstance(existing, BlockPatch) and existing.run is run and existing.block is block:
        return existing.with_entry(entry)
    return BlockPatch(run, block, (entry,), existing)


def host_function(block: Any, name: str) -> Callable:
    """A function of the module that defines the host's block class (its attention, its modulation helper), so
    the recomputed block uses exactly the host's own code; the host is never imported here."""
    fn = getattr(sys.modules.get(type(block).__module__), name, None)
    if fn is None:
        raise IPAKitError(f"this ComfyUI's {type(block).__name__} module has no '{name}'; the DiT IP-Adapter patch "
                          "needs ComfyUI 0.8.0 or newer: update ComfyUI")
    return fn
