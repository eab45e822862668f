"""Opening image files safely: size limits before decoding, a full decode check, and correct 16-bit/float conversion.

An image file's header states its size; decoding and resizing cost memory in proportion to it. The limits
below follow from the resolution actually needed: the decoded image (at most `max_pixels`) and the image
after the short-side resize every consumer does (at most `MAX_RESIZED_PIXELS`, which bounds the aspect ratio),
so a few hundred bytes of PNG cannot ask for gigabytes.
"""

from __future__ import annotations

import os
import re
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

# The short-side resize to `side` of a w x h image makes side * side * (long / short) pixels: keep it bounded.
MAX_RESIZED_PIXELS = 16_000_000
# Decoded pixels allowed: 8x the needed side in each dimension, and never less than 8192 x 8192 (camera photos).
MIN_MAX_PIXELS = 8192 * 8192
_CLIP_SIDE = 224


class ImageRejected(ValueError):
    """The file is not a usable image; the message says why in a few words (for skip lists)."""


def max_pixels(side: int) -> int:
    return max(MIN_MAX_PIXELS, (8 * side) ** 2)


def check_size(width: int, height: int, side: int) -> None:
    """Refuse sizes whose decode or short-side resize to `side` (and to the CLIP 224) would need too much memory."""
    if width < 1 or height < 1:
        raise ImageRejected(f"{width} x {height} pixels: empty image")
    if width * height > max_pixels(side):
        raise ImageRejected(f"{width} x {height} pixels, more than the {max_pixels(side) / 1e6:.0f} MP allowed "
                            f"at resolution {side}: downscale it first")
    short, long = min(width, height), max(width, height)
    need = max(side, _CLIP_SIDE)
    if need * need * long / short > MAX_RESIZED_PIXELS:
        limit = MAX_RESIZED_PIXELS / (need * need)
        raise ImageRejected(f"{width} x {height} pixels: aspect ratio 1:{long / short:.0f} is beyond the 1:{limit:.0f} "
                            f"that resizing to {need} px allows; crop it")


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy. 16-bit and 32-bit integer grey map their full range to 0-255 (PIL's own convert
    clips them to white); float images map [0, 1] (or [0, 255] when larger values occur) to 0-255."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)  # [H, W]
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        top = float(arr.max()) if arr.size else 0.0
        if mode == "F":
            scale = 1.0 if top <= 1.0 else (255.0 if top <= 255.0 else 65535.0)
        else:
            scale = 65535.0 if top > 255 or mode.startswith("I;16") else 255.0
        grey = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike, side: int, draft: bool = False) -> Image.Image:
    """Open, size-check, fully decode and convert an image to RGB.

    Args:
        path: the image file.
        side: the largest side length the image will be resized to (training resolution, or 224 for CLIP).
        draft: let JPEG decode at a reduced scale (at least `side`): a cheaper full-decode check.

    Raises:
        ImageRejected: not an image, truncated, a decompression bomb, or too large/narrow for `side`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_size(im.width, im.height, side)
                if draft and im.format == "JPEG":
                    im.draft("RGB", (side, side))
                im.load()
                return to_rgb(im)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(claimed.group(1)) / 1e6:.0f} MP" if claimed else "too many pixels"
        raise ImageRejected(f"decompression bomb: the header claims {pixels}; downscale it first") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower() or isinstance(e, EOFError):
            raise ImageRejected("truncated: the file ends before the image data does") from None
        raise ImageRejected(f"cannot be decoded ({reason})") from None
