"""Image tensor helpers shared by the nodes and the trainer. IMAGE tensors are ComfyUI's [N, H, W, 3] in 0..1."""

from __future__ import annotations

from collections.abc import Sequence

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pad_to_square(image: torch.Tensor, fill: Sequence[float] | None = None) -> torch.Tensor:
    """Pad [N, H, W, 3] to a square, centred, with `fill` (default the CLIP mean colour, which normalises to 0)."""
    n, h, w, c = image.shape
    side = max(h, w)
    if h == w:
        return image
    color = torch.tensor(list(fill or CLIP_MEAN), dtype=image.dtype, device=image.device)
    out = color.view(1, 1, 1, c).expand(n, side, side, c).clone()
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top : top + h, left : left + w] = image
    return out


