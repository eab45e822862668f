"""Where a patch's tensors live: its own copies on the device and in the dtype the model computes in.

A host caches node outputs between prompts and hands the same objects to every node and prompt that uses them:
the loaded adapter, the encoded embeds, a mask, a weight list. It also moves patches with the model (ComfyUI calls
`patch.to(device)` and then `patch.to(model dtype)` each time it loads the model, `patch.to(offload device)` when
it unloads it). So a patch never moves or casts what it was given: it copies what a call needs, once per device
and dtype, and keeps the copies for the following steps and runs. The dtype is the one of the call's query, not
the one the host passes: fp8-stored weights compute in their manual-cast dtype (fp16, bf16 or fp32).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

# adapter -> {device: copy}, weakly held on both sides: a copy lives while a patch holds it
_ADAPTER_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_device(device: Any) -> torch.device:
    """A comparable device: `cuda` without an index is the current CUDA device, as tensors report it."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return d


def _versions(module: torch.nn.Module) -> tuple[int, ...]:
    """In-place updates (an optimizer step) bump a tensor's version: a copy made before them is stale."""
    return tuple(p._version for p in module.parameters())


def adapter_on(adapter: torch.nn.Module, device: Any) -> torch.nn.Module:
    """`adapter` itself when its weights are on `device`; otherwise a frozen copy there, shared by every patch of the
    same adapter on that device (held weakly: it is freed with the last patch that uses it) and made again when the
    adapter's weights changed (training). The copy keeps the adapter's own dtype (fp32 for loaded and trained
    adapters), so the per-call fusion stays in full precision."""
    device = as_device(device)
    first = next(adapter.parameters(), None)
    if first is None or as_device(first.device) == device:
        return adapter
    copies = _ADAPTER_COPIES.get(adapter)
    if copies is None:
        copies = _ADAPTER_COPIES[adapter] = weakref.WeakValueDictionary()
    versions = _versions(adapter)
    hit = copies.get(str(device))
    if hit is None or getattr(hit, "_ipakit_versions", None) != versions:
        with torch.no_grad():
            hit = copy.deepcopy(adapter).to(device).eval().requires_grad_(False)
        hit._ipakit_versions = versions
        copies[str(device)] = hit
    return hit


class DeviceCopies:
    """Copies of a patch's tensors keyed by (device, dtype, what, ...), each made once; `keep_only(device)` drops
    those on other devices (the model left them), so a patch never holds a second set per sampling run.

    Per-call-shape entries (`bounded=True`: one per layer, chunk order, batch and frame window) are capped at
    `limit`, dropped together when it is reached (a long animation's sliding windows would otherwise keep every
    window's K/V); the few per-apply copies (the K/V of every layer, the tokens, the adapter) are kept.
    """

    def __init__(self, limit: int = 512):
        self.limit = limit
        self._items: dict[tuple, Any] = {}
        self._bounded: set[tuple] = set()

    def get(self, key: tuple, make, bounded: bool = False) -> Any:
        """key = (device, dtype, ...): the cached value, else make() stored under it."""
        hit = self._items.get(key)
        if hit is None:
            if bounded:
                if len(self._bounded) >= self.limit:
                    for k in self._bounded:
                        self._items.pop(k, None)
                    self._bounded.clear()
                self._bounded.add(key)
            hit = self._items[key] = make()
        return hit

    def keep_only(self, device: Any) -> None:
        device = as_device(device)
        self._items = {k: v for k, v in self._items.items() if as_device(k[0]) == device}
        self._bounded &= set(self._items)

    def clear(self) -> None:
        self._items.clear()
        self._bounded.clear()

    def __len__(self) -> int:
        return len(self._items)
