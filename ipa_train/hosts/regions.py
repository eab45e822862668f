"""Regions: an image prompt limited to a mask, and the text conditioning limited to the same mask.

ComfyUI conditioning is a list of [tensor, options]; a mask in the options (as the core ConditioningSetMask
writes it) makes the sampler apply that prompt only inside the mask. Several regions on one model are several
masked applications chained on it; their image terms add up, each inside its own mask.
"""

from __future__ import annotations

import torch

from ..errors import IPAKitError


def region_mask(mask: torch.Tensor) -> torch.Tensor:
    """A MASK [H, W] or [N, H, W] in 0..1 as [N, H, W] float (checked, so a bad mask fails before sampling)."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or mask.shape[-1] < 1 or mask.shape[-2] < 1:
        raise IPAKitError(f"region mask has shape {tuple(mask.shape)}; expected a MASK [H, W] or [N, H, W]")
    return mask.float().clamp(0, 1)


def mask_conditioning(conditioning: list, mask: torch.Tensor, strength: float = 1.0) -> list:
    """A copy of `conditioning` whose every entry applies only inside `mask` (the core ConditioningSetMask keys)."""
    mask = region_mask(mask)
    out = []
    for entry in conditioning:
        tensor, options = entry[0], dict(entry[1])
        options.update({"mask": mask, "set_area_to_bounds": False, "mask_strength": float(strength)})
        out.append([tensor, options])
    return out
