"""Training datasets: captioned images in three layouts, with the reference script's image transforms.

Layouts:
    * a folder of images with same-name `.txt` captions (`cat.jpg` + `cat.txt`; a missing caption is "");
    * the reference JSON list `[{"image_file": "1.png", "text": "A dog"}, ...]` with a root folder;
    * a folder with a `metadata.jsonl` (one `{"file_name": ..., "text": ...}` per line, Hugging Face imagefolder).

Each sample gives the target image resized (short side, bilinear) and cropped to the training resolution,
in [-1, 1], and the CLIP input prepared like transformers' default `CLIPImageProcessor` (bicubic resize of
the short side to 224, centre crop, CLIP mean/std). Unreadable, truncated, oversized or non-image files,
and paths that leave the dataset folder, are skipped with one warning that lists them (as the dataset names
them) and why.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError
from ..images import ImageRejected, open_rgb

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
METADATA_JSONL = "metadata.jsonl"
# Files a dataset folder may hold besides images and captions, never reported as skipped.
_IGNORED_NAMES = {METADATA_JSONL, ".DS_Store", "Thumbs.db", "LICENSES.md", "README.md"}


@dataclass(frozen=True)
class Sample:
    """One training pair: an image file and its caption."""

    path: Path
    caption: str
    has_caption: bool = True
    shown: str = ""  # the path as the dataset gave it (for messages)


@dataclass
class DatasetInfo:
    """What was found when reading a dataset, for logs and the UI."""

    source: str  # "folder" | "json" | "jsonl"
    root: str
    images: int = 0
    captions: int = 0
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "root": self.root, "images": self.images, "captions": self.captions,
                "skipped": len(self.skipped), "skipped_files": list(self.skipped)}


# --------------------------------------------------------------------------------------------------------
# Transforms (PIL + numpy + torch; no torchvision)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_short_side(img: Image.Image, size: int, resample: int, truncate: bool = False) -> Image.Image:
    """Resize so the short side is `size`. `truncate=True` rounds the long side down, as transformers does."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short) if truncate else int(round(size * long / short))
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample=resample)


def crop(img: Image.Image, size: int, top: int, left: int) -> Image.Image:
    return img.crop((left, top, left + size, top + size))


def clip_pixels(img: Image.Image, size: int = CLIP_SIZE, mean_std: tuple = (CLIP_MEAN, CLIP_STD)) -> torch.Tensor:
    """Vision encoder input [3, S, S]: short side to S (bicubic), centre crop, (x - mean) / std. The defaults are
    transformers' default `CLIPImageProcessor` (224); SigLIP so400m-384 uses 384 and 0.5 / 0.5."""
    img = resize_short_side(img.convert("RGB"), size, Image.Resampling.BICUBIC, truncate=True)
    w, h = img.size
    img = crop(img, size, (h - size) // 2, (w - size) // 2)
    x = _to_tensor(img)  # [3, S, S] in [0, 1]
    mean = torch.tensor(mean_std[0]).view(3, 1, 1)
    std = torch.tensor(mean_std[1]).view(3, 1, 1)
    return (x - mean) / std


def target_and_size(img: Image.Image, size: int, random_crop: bool = False, random_flip: bool = False,
                    rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training target [3, size, size] in [-1, 1] (bilinear short-side resize, centre or random crop, optional
    flip) and its SDXL size conditioning [6] = (original height, original width, crop top, crop left, target
    height, target width): the file's size before the resize, and where the crop starts in the resized image as
    the target shows it (mirrored for a flipped target: its left edge in the flipped image)."""
    rng = rng or random
    orig_w, orig_h = img.size
    img = resize_short_side(img.convert("RGB"), size, Image.Resampling.BILINEAR)
    w, h = img.size
    if random_crop:
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = crop(img, size, top, left)
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = w - size - left
    ids = torch.tensor([orig_h, orig_w, top, left, size, size], dtype=torch.float32)
    return _to_tensor(img) * 2.0 - 1.0, ids


def target_pixels(img: Image.Image, size: int, random_crop: bool = False, random_flip: bool = False,
                  rng: random.Random | None = None) -> torch.Tensor:
    """Training target [3, size, size] in [-1, 1]; see `target_and_size`."""
    return target_and_size(img, size, random_crop, random_flip, rng)[0]


# --------------------------------------------------------------------------------------------------------
# Reading the three layouts


def _read_caption(path: Path) -> tuple[str | None, str | None]:
    """(caption or None when there is no caption file, a note when it was not plain UTF-8)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path.name} (caption unreadable: {e.strerror or e})"
    for bom, codec in ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            return raw.decode(codec, errors="replace").strip(), None
    try:
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError:
        # Not UTF-8: most likely a Windows code page; cp1252 maps almost every byte, latin-1 the rest.
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return text.strip(), f"{path.name} (caption not UTF-8: read as Windows-1252; save it as UTF-8)"


def _show(name: str) -> str:
    """A file name as the dataset gave it, quoted when it holds spaces at its ends or unprintable characters."""
    return name if name.isprintable() and name == name.strip() and name else repr(name)


def _inside(root: Path, given: str) -> tuple[Path | None, str | None]:
    """`root / given` when it stays inside `root` (after following links), else None and the reason."""
    if not given or "\x00" in given:
        return None, "empty or invalid file name"
    if Path(given).is_absolute() or given.startswith(("/", "\\")) or (len(given) > 1 and given[1] == ":"):
        return None, "absolute path: give it relative to the dataset folder"
    path = root / given
    try:
        resolved = path.resolve()
        resolved.relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return None, f"outside the dataset folder {str(root)!r}"
    return path, None


def _scan_folder(root: Path) -> tuple[list[Sample], list[str]]:
    samples: list[Sample] = []
    skipped: list[str] = []
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    images = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    for p in files:
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            path, why = _inside(root, p.name)
            if path is None:
                skipped.append(f"{p.name} ({why})")
                continue
            caption, note = _read_caption(p.with_suffix(".txt"))
            if note:
                logger.warning("dataset %s: %s", root, note)
            samples.append(Sample(p, caption or "", caption is not None, p.name))
        elif suffix == ".txt" and p.stem in images:
            continue
        elif p.name not in _IGNORED_NAMES:
            skipped.append(f"{p.name} (not an image)")
    return samples, skipped


def _decode_error(file: Path, e: Exception, example: str) -> DatasetError:
    if isinstance(e, UnicodeDecodeError):
        what = f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8"
    elif isinstance(e, RecursionError):
        what = "nested too deeply to be a captions list"
    elif isinstance(e, json.JSONDecodeError):
        what = f"not valid JSON ({e})"
    else:
        what = f"cannot be read ({getattr(e, 'strerror', None) or e})"
    return DatasetError(f"{file}: {what}; expected {example}")


_JSON_EXAMPLE = '[{"image_file": "1.png", "text": "A dog"}]'
_JSONL_EXAMPLE = 'one {"file_name": "1.png", "text": "A dog"} object per line'


def _entries_from_json(json_file: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(json_file.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _decode_error(json_file, e, _JSON_EXAMPLE) from None
    if not isinstance(data, list):
        raise DatasetError(
            f"{json_file}: expected a JSON list of {{\"image_file\", \"text\"}} objects, found a {type(data).__name__}"
        )
    return data


def _entries_from_jsonl(jsonl: Path) -> list[dict[str, Any]]:
    try:
        text = jsonl.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise _decode_error(jsonl, e, _JSONL_EXAMPLE) from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as e:
            raise _decode_error(Path(f"{jsonl}, line {n}"), e, _JSONL_EXAMPLE) from None
    return entries


def _samples_from_entries(entries: list[Any], root: Path, file_key: str, where: Path) -> tuple[list[Sample], list[str]]:
    samples: list[Sample] = []
    skipped: list[str] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or file_key not in e or not isinstance(e[file_key], str):
            shown = repr(e)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise DatasetError(f"{where}: entry {i} is {shown}; every entry needs a {file_key!r} (a file name) and a "
                               "'text' field")
        given = e[file_key]
        path, why = _inside(root, given)
        if path is None:
            skipped.append(f"{_show(given)} ({why})")
            continue
        text = e.get("text")
        if isinstance(text, (dict, list)):
            raise DatasetError(f"{where}: entry {i} ({given!r}) has a {type(text).__name__} as 'text'; expected the "
                               "caption as a string")
        samples.append(Sample(path, str(text) if text is not None else "", text is not None, _show(given)))
    return samples, skipped


def _check_images(samples: list[Sample], side: int) -> tuple[list[Sample], list[str]]:
    """Keep the samples whose image exists and decodes fully within the size limits of `side`."""
    good: list[Sample] = []
    bad: list[str] = []
    for s in samples:
        shown = s.shown or s.path.name
        if not s.path.is_file():
            bad.append(f"{shown} (missing)")
            continue
        try:
            open_rgb(s.path, side, draft=True).close()
        except ImageRejected as e:
            bad.append(f"{shown} ({e})")
            continue
        good.append(s)
    return good, bad


class CaptionedImages(torch.utils.data.Dataset):
    """Captioned images for IP-Adapter training (the reference image is the target image, as in the reference).

    Args:
        samples: the (image, caption) pairs; build with `load_dataset`.
        info: what was found, returned by `describe()`.
        resolution: side of the square training target in pixels.
        random_crop: random instead of centre crop of the target (the CLIP input stays centre-cropped).
        random_flip: horizontal flip of the target with probability 0.5.
    """

    def __init__(self, samples: list[Sample], info: DatasetInfo, resolution: int = 512,
                 random_crop: bool = False, random_flip: bool = False):
        self.samples = samples
        self.info = info
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def deterministic(self) -> bool:
        """True when the target of a sample is the same every time (its VAE latents can be cached)."""
        return not (self.random_crop or self.random_flip)

    def describe(self) -> dict[str, Any]:
        """Counts for the UI: images, captions found, files skipped (and which)."""
        return self.info.as_dict()

    def open(self, index: int) -> Image.Image:
        """The sample's image as 8-bit RGB (16-bit and float images scaled to their range)."""
        try:
            return open_rgb(self.samples[index].path, max(self.resolution, CLIP_SIZE))
        except ImageRejected as e:  # the file changed since `load_dataset` checked it
            raise DatasetError(f"{self.samples[index].path}: {e}; remove it from the dataset") from None

    def caption(self, index: int) -> str:
        return self.samples[index].caption

    def target(self, index: int, rng: random.Random | None = None) -> torch.Tensor:
        """Target pixels [3, R, R] in [-1, 1]."""
        return self.target_and_size(index, rng)[0]

    def target_and_size(self, index: int, rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Target pixels [3, R, R] in [-1, 1] and their size conditioning [6] (`target_and_size`); the same draws
        from `rng` as `target`."""
        return target_and_size(self.open(index), self.resolution, self.random_crop, self.random_flip, rng)

    def clip_input(self, index: int, spec: Any = None) -> torch.Tensor:
        """Vision encoder input: CLIP [3, 224, 224], or as `spec` (a `backbone.ImageInput`) asks."""
        if spec is None:
            return clip_pixels(self.open(index))
        return clip_pixels(self.open(index), spec.size, (spec.mean, spec.std))

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.open(index)
        return {
            "pixels": target_pixels(img, self.resolution, self.random_crop, self.random_flip),
            "clip_pixels": clip_pixels(img),
            "caption": self.samples[index].caption,
            "index": index,
        }


def load_dataset(path: str | os.PathLike, captions_json: str | os.PathLike | None = None, resolution: int = 512,
                 random_crop: bool = False, random_flip: bool = False) -> CaptionedImages:
    """Read a dataset in any of the three layouts.

    Args:
        path: a folder of images (with `.txt` captions or a `metadata.jsonl`), or the reference JSON file
            (images resolved next to it).
        captions_json: the reference JSON list; `path` is then the image root folder.
        resolution, random_crop, random_flip: see `CaptionedImages`.

    Raises:
        DatasetError: the folder or file does not exist, or no usable image is left.
    """
    root = Path(path)
    if captions_json is None and root.is_file() and root.suffix.lower() == ".json":
        captions_json, root = root, root.parent
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {str(root)!r} does not exist or is not a folder; give the folder holding the training "
            "images (with same-name .txt captions or a metadata.jsonl), or the reference JSON file"
        )
    if captions_json is not None:
        json_file = Path(captions_json)
        if not json_file.is_file():
            raise DatasetError(f"captions JSON {str(json_file)!r} not found; give the path of the "
                               '[{"image_file", "text"}] list')
        samples, skipped = _samples_from_entries(_entries_from_json(json_file), root, "image_file", json_file)
        source = "json"
    elif (root / METADATA_JSONL).is_file():
        jsonl = root / METADATA_JSONL
        samples, skipped = _samples_from_entries(_entries_from_jsonl(jsonl), root, "file_name", jsonl)
        source = "jsonl"
    else:
        try:
            samples, skipped = _scan_folder(root)
        except OSError as e:
            raise DatasetError(f"dataset folder {str(root)!r} cannot be read ({e.strerror or e}); check its "
                               "permissions") from None
        source = "folder"
    samples, bad = _check_images(samples, max(resolution, CLIP_SIZE))
    skipped += bad
    info = DatasetInfo(source, str(root), len(samples), sum(s.has_caption for s in samples), skipped)
    if skipped:
        logger.warning("dataset %s: skipped %d file(s): %s", root, len(skipped), ", ".join(skipped))
    if not samples:
        raise DatasetError(
            f"dataset {str(root)!r} ({source} layout) has no usable image"
            + (f" ({len(skipped)} file(s) skipped: {', '.join(skipped[:5])})" if skipped else "")
            + f"; add images ({', '.join(IMAGE_SUFFIXES)}) with same-name .txt captions, a metadata.jsonl, "
            "or a captions JSON"
        )
    logger.info("dataset %s: %d images, %d captions (%s layout)", root, info.images, info.captions, source)
    return CaptionedImages(samples, info, resolution, random_crop, random_flip)
