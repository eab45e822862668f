"""Noise negatives: an image for the unconditional side that shares the reference's colours but not its content.

Every draw comes from a `torch.Generator` seeded with the caller's `seed`, so the same inputs always give the same
image and nothing depends on (or changes) the global random state.
"""

from __future__ import annotations

import torch

from ..errors import IPAKitError
from .prep import gaussian_blur, resize

NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle")


def _shuffle_pixels(base: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Swap a `strength` share of the pixel positions among themselves (per image, all channels together)."""
    n, h, w, c = base.shape
    flat = base.reshape(n, h * w, c).clone()
    count = int(round(strength * h * w))
    if count < 2:
        return base
    for i in range(n):
        chosen = torch.randperm(h * w, generator=gen)[:count]
        flat[i, chosen] = flat[i, chosen[torch.randperm(count, generator=gen)]]
    return flat.reshape(n, h, w, c)


def noise_image(noise_type: str, width: int, height: int, strength: float = 0.5, blur: float = 0.0,
                seed: int = 0, reference: torch.Tensor | None = None, interpolation: str = "bilinear") -> torch.Tensor:
    """An IMAGE [N, height, width, 3] in 0..1 (N = the reference batch, or 1 without a reference).

    Args:
        noise_type: "fade" (blend towards uniform noise by `strength`), "dissolve" (replace a `strength` share of
            pixels with noise), "gaussian" (add Gaussian noise of std `strength`), "shuffle" (swap a `strength`
            share of the pixel positions).
        blur: Gaussian blur sigma in pixels applied last (0 = none).
        reference: optional IMAGE resized to width x height as the base; without it the base is uniform noise.
    """
    if noise_type not in NOISE_TYPES:
        raise IPAKitError(f"noise type {noise_type!r} is not one of {', '.join(NOISE_TYPES)}")
    if not 0.0 <= strength <= 1.0:
        raise IPAKitError(f"noise strength {strength} is outside 0..1")
    if width < 1 or height < 1:
        raise IPAKitError(f"noise image size {width}x{height} must be at least 1x1")
    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    if reference is not None:
        base = resize(reference[..., :3].float().cpu(), height, width, interpolation)
    else:
        base = torch.rand(1, height, width, 3, generator=gen)
    n = base.shape[0]
    if noise_type == "fade":
        out = base * (1 - strength) + torch.rand(n, height, width, 3, generator=gen) * strength
    elif noise_type == "dissolve":
        keep = torch.rand(n, height, width, 1, generator=gen) >= strength
        out = torch.where(keep, base, torch.rand(n, height, width, 3, generator=gen))
    elif noise_type == "gaussian":
        out = base + torch.randn(n, height, width, 3, generator=gen) * strength
    else:
        out = _shuffle_pixels(base, strength, gen)
    return gaussian_blur(out.clamp(0, 1), blur).clamp(0, 1)
