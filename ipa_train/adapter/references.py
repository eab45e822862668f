"""Several reference images: how their CLIP outputs combine, and how a weight per reference acts.

The methods and their math are the community pack's (combine_embeds and its combine node): concat keeps every
reference's tokens; add, subtract (first minus the mean of the others), average, norm average (mean of the
embeddings divided by their norm over the references), max and min merge the CLIP outputs into one before the
projection. A weight per reference multiplies its CLIP output before a merge (what the community pack's encoder
weight does); with concat it multiplies the values of that reference's image tokens instead, i.e. its share of the
image attention (scaling a CLIP output before the projection's final LayerNorm would do almost nothing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import IPAKitError

COMBINE_METHODS = ("concat", "add", "subtract", "average", "norm average", "max", "min")


def reference_weights(weights: Sequence[float] | torch.Tensor | None, n: int) -> torch.Tensor | None:
    """One weight per reference as a float tensor [n], or None when there are none (all 1).

    One value applies to every reference; otherwise there must be exactly one per reference image.
    """
    if weights is None:
        return None
    w = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() == 0:
        return None
    if w.numel() == 1:
        return w.expand(n).clone()
    if w.numel() != n:
        raise IPAKitError(
            f"{w.numel()} reference weights for {n} reference images; give one weight per image of the batch "
            "(or a single weight for all)"
        )
    return w


def parse_weight_list(text: str) -> list[float]:
    """`"1.0, 0.5"` -> [1.0, 0.5]; an empty string -> []; anything else a clear error."""
    out = []
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        if not part.strip():
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise IPAKitError(
                f"reference weights: cannot read {part.strip()!r}; write numbers separated by commas, one per "
                "reference image, for example '1.0, 0.5'"
            ) from None
    return out


def combine_clip(embeds: torch.Tensor, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Merge N references' CLIP outputs [N, ...] into the projection input.

    Returns [1, N, ...] for concat (projected per image, tokens concatenated) and [1, ...] for the others.
    """
    if method not in COMBINE_METHODS:
        raise IPAKitError(f"unknown combine method {method!r}; expected one of: {', '.join(COMBINE_METHODS)}")
    if method == "concat":
        return embeds.unsqueeze(0)
    if weights is not None:
        embeds = embeds * weights.to(embeds).view(-1, *([1] * (embeds.dim() - 1)))
    if embeds.shape[0] == 1:
        return embeds
    if method == "add":
        out = embeds.sum(dim=0)
    elif method == "subtract":
        out = embeds[0] - embeds[1:].mean(dim=0)
    elif method == "average":
        out = embeds.mean(dim=0)
    elif method == "norm average":
        out = (embeds / torch.norm(embeds, dim=0, keepdim=True)).mean(dim=0)
    elif method == "max":
        out = embeds.max(dim=0).values
    else:
        out = embeds.min(dim=0).values
    return out.unsqueeze(0)


def token_weights(weights: torch.Tensor | None, tokens_per_reference: int) -> torch.Tensor | None:
    """Concat: a weight per reference -> a weight per image token [N*T] (reference i owns tokens i*T..(i+1)*T-1)."""
    if weights is None or bool((weights == 1).all()):
        return None
    return weights.repeat_interleave(tokens_per_reference)
