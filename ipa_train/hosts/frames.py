"""Animation batches: which per-frame embeds row, weight and mask row goes with which batch row of a model call.

A model call's batch is `len(cond_or_uncond)` chunks (cond 0 / uncond 1) of equal size; inside a chunk, row r is
one latent frame. Without a context window, row r is frame r. With one, the chunk holds only the window's frames
and the host says which:
  * ComfyUI's context windows (comfy/context_windows.py) put the window object in
    `transformer_options["context_window"]`; its `index_list` holds the frame indices and `dim` the axis they
    index (0 = the batch, as for SD1.5/SDXL animation; other axes are not batch rows and are ignored here).
  * AnimateDiff-Evolved puts `transformer_options["ad_params"] = {"full_length", "context_length", "sub_idxs"}`;
    `sub_idxs` is the list of frame indices of the current sub-batch, or None when it samples every frame.
Both reach the attention patch through `extra_options` (ComfyUI copies every transformer_options entry into it).
Per-frame tables shorter than the frame count repeat their last row, so one reference (or weight) serves all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..errors import IPAKitError


def window_frames(extra_options: dict, per_chunk: int) -> list[int]:
    """Frame index (in the whole latent batch) of each of the `per_chunk` rows of one cond/uncond chunk."""
    window = extra_options.get("context_window")
    if window is not None and int(getattr(window, "dim", 0)) == 0:
        idx = [int(i) for i in getattr(window, "index_list", [])]
        if len(idx) == per_chunk:
            return idx
    ad = extra_options.get("ad_params")
    if isinstance(ad, dict) and ad.get("sub_idxs") is not None:
        idx = [int(i) for i in ad["sub_idxs"]]
        if len(idx) == per_chunk:
            return idx
    return list(range(per_chunk))


def batch_rows(count: int, cond_or_uncond: Sequence[int], batch: int, extra_options: dict) -> list[int]:
    """For a per-frame table of `count` rows: the row of each of the `batch` rows of this call ([B] list)."""
    chunks = max(1, len(cond_or_uncond))
    per_chunk = batch // chunks
    frames = [min(f, count - 1) for f in window_frames(extra_options, per_chunk)]
    return frames * chunks


def select_rows(table: torch.Tensor, cond_or_uncond: Sequence[int], batch: int, extra_options: dict) -> torch.Tensor:
    """[count, ...] per-frame table -> [batch, ...] rows for this call (count 1: expanded, no copy)."""
    if table.shape[0] == 1:
        return table.expand(batch, *table.shape[1:])
    rows = batch_rows(table.shape[0], cond_or_uncond, batch, extra_options)
    return table[torch.tensor(rows, device=table.device)]


def frame_weight_rows(weights: torch.Tensor | None, cond_or_uncond: Sequence[int], batch: int,
                      extra_options: dict) -> torch.Tensor | float:
    """Per-frame weights [F] -> [batch] multipliers for this call; 1.0 when there are none."""
    if weights is None:
        return 1.0
    return select_rows(weights, cond_or_uncond, batch, extra_options)


def frames_key(extra_options: dict, batch: int, chunks: int) -> tuple[int, ...]:
    """Cache key part: the frames this call sees (different windows must not share cached K/V)."""
    return tuple(window_frames(extra_options, batch // max(1, chunks)))


def check_frame_weights(weights: Sequence[float] | None) -> torch.Tensor | None:
    if weights is None:
        return None
    values = [float(w) for w in weights]
    if not values:
        raise IPAKitError("frame weights are empty; connect a schedule with at least one frame")
    return torch.tensor(values, dtype=torch.float32)


def encode_per_frame(adapter: Any, clip_chunks: Iterable[torch.Tensor], uncond_clip: torch.Tensor,
                     progress: Callable[[int], None] | None = None):
    """Project references one frame each, chunk by chunk: CLIP outputs [n, ...] per chunk -> ImageEmbeds [N, T, C].

    Only the projected tokens are kept between chunks, so hundreds of frames need the memory of one chunk of
    CLIP hidden states. `uncond_clip` [1 or N, ...] gives the unconditional tokens ([1, T, C] or [N, T, C]).
    """
    from .comfy.unet import ImageEmbeds

    conds, done = [], 0
    with torch.no_grad():
        for chunk in clip_chunks:
            adapter.check_clip_input(chunk, source="CLIP vision model's output")
            conds.append(adapter.project(chunk).cpu())  # [n, T, C]: each frame projected on its own
            done += chunk.shape[0]
            if progress is not None:
                progress(done)
        if not conds:
            raise IPAKitError("no reference frames to encode; connect an IMAGE batch with at least one image")
        uncond = adapter.project(uncond_clip).cpu()
    return ImageEmbeds(torch.cat(conds), uncond, adapter.config.variant, done)
