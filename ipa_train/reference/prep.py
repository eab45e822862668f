"""Reference preparation: square crop at a position (or pad/squash), resize with a chosen filter, sharpen.

Images are ComfyUI IMAGE tensors [N, H, W, 3] in 0..1. The result is exactly `size` x `size`, so the CLIP
vision preprocessing that follows does no further resize (ComfyUI only resizes when the side differs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..adapter.imageprep import CLIP_MEAN, pad_to_square
from ..errors import IPAKitError

CROP_POSITIONS = ("center", "top", "bottom", "left", "right", "pad", "squash")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def crop_box(height: int, width: int, position: str) -> tuple[int, int, int]:
    """(top, left, side) of the largest square at `position` ("center", "top", "bottom", "left", "right")."""
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    if position == "top":
        top = 0
    elif position == "bottom":
        top = height - side
    elif position == "left":
        left = 0
    elif position == "right":
        left = width - side
    elif position != "center":
        raise IPAKitError(f"crop position {position!r} is not one of {', '.join(CROP_POSITIONS[:5])}")
    return top, left, side


def square(image: torch.Tensor, position: str, fill: Sequence[float] | None = None) -> torch.Tensor:
    """[N, H, W, 3] -> [N, S, S, 3]: crop at `position`, "pad" to a square with `fill`, or "squash" (unchanged here)."""
    if position not in CROP_POSITIONS:
        raise IPAKitError(f"crop {position!r} is not one of {', '.join(CROP_POSITIONS)}")
    if position == "squash":
        return image
    if position == "pad":
        return pad_to_square(image, fill or CLIP_MEAN)
    top, left, side = crop_box(image.shape[1], image.shape[2], position)
    return image[:, top : top + side, left : left + side]


def _lanczos_matrix(n_in: int, n_out: int, a: int = 3) -> torch.Tensor:
    """[n_out, n_in] Lanczos-a resampling weights (widened by the scale when shrinking, which anti-aliases)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5  # output pixel centres in input coords
    x = (torch.arange(n_in, dtype=torch.float64)[None, :] - centers[:, None]) / support
    w = torch.sinc(x) * torch.sinc(x / a) * (x.abs() < a)
    return (w / w.sum(dim=1, keepdim=True)).float()


def resize(image: torch.Tensor, height: int, width: int, interpolation: str = "bicubic") -> torch.Tensor:
    """[N, H, W, C] -> [N, height, width, C] with nearest, bilinear, bicubic (anti-aliased) or Lanczos-3; clamped 0..1."""
    if interpolation not in INTERPOLATIONS:
        raise IPAKitError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if image.shape[1] == height and image.shape[2] == width:
        return image
    x = image.movedim(-1, 1).float()  # [N, C, H, W]
    if interpolation == "lanczos":
        wh = _lanczos_matrix(x.shape[2], height).to(x.device)
        ww = _lanczos_matrix(x.shape[3], width).to(x.device)
        out = torch.einsum("oh,nchw,pw->ncop", wh, x, ww)
    elif interpolation == "nearest":
        out = F.interpolate(x, size=(height, width), mode="nearest-exact")
    else:
        out = F.interpolate(x, size=(height, width), mode=interpolation, antialias=True, align_corners=False)
    return out.clamp(0, 1).movedim(1, -1).to(image.dtype)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, H, W, C] (reflect padding); sigma 0 returns the input."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = image.movedim(-1, 1).float()  # [N, C, H, W]
    c = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[2] - 1), min(radius, x.shape[3] - 1)
    x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect" if pad_h and pad_w else "replicate")
    kh = k[radius - pad_h : radius + pad_h + 1]
    kw = k[radius - pad_w : radius + pad_w + 1]
    x = F.conv2d(x, (kh / kh.sum()).view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    x = F.conv2d(x, (kw / kw.sum()).view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return x.movedim(1, -1).to(image.dtype)


def sharpen(image: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """Unsharp mask: image + amount * (image - blur(image)), clamped to 0..1; amount 0 returns the input."""
    if amount == 0:
        return image
    return (image + amount * (image - gaussian_blur(image, sigma))).clamp(0, 1)


def prepare(image: torch.Tensor, size: int = 224, crop: str = "center", interpolation: str = "bicubic",
            sharpening: float = 0.0, fill: Sequence[float] | None = None) -> torch.Tensor:
    """A reference ready for CLIP vision: [N, H, W, 3] -> [N, size, size, 3].

    Args:
        crop: "center", "top", "bottom", "left", "right" (a square at that position), "pad" (to a square with
            `fill`, default the CLIP mean colour, which normalises to 0) or "squash" (the whole image, stretched).
        interpolation: resize filter, one of INTERPOLATIONS.
        sharpening: unsharp-mask amount applied after the resize (0 = none; 0.3-1 is a useful range).
    """
    if image.dim() != 4 or image.shape[-1] < 3:
        raise IPAKitError(f"reference image has shape {tuple(image.shape)}; expected an IMAGE [N, H, W, 3]")
    out = resize(square(image[..., :3], crop, fill), size, size, interpolation)
    return sharpen(out, sharpening)
