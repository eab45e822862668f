"""Face embeddings of a training set, computed once with the kit's face pipeline and cached as safetensors.

The reference FaceID training script reads pickled numpy embeddings with `torch.load`; here the cache is one
`face_embeds.safetensors`: `embeds` [N, 512] raw ArcFace embeddings (normalise with `normed()`), `kps` [N, 5, 2],
`bbox` [N, 4], `det_score` [N], optionally `crops` [N, S, S, 3] uint8 (the aligned crops the plus variants read),
and the metadata: the image paths in order (JSON), the recognizer file and its sha256, the crop size, the images
skipped and the settings it was made with (`cached_face_embeddings` reuses a cache only when they all agree). Images
without a face are left out with one warning naming each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..errors import DatasetError
from ..outputs import atomic_write

logger = logging.getLogger(__name__)

CACHE_NAME = "face_embeds.safetensors"


@dataclass
class FaceCache:
    files: list[str]  # image paths, as given, one per row
    embeds: torch.Tensor  # [N, 512] raw
    kps: torch.Tensor
    bbox: torch.Tensor
    det_score: torch.Tensor
    crops: torch.Tensor | None
    recognizer: str
    skipped: list[str] = field(default_factory=list)  # "path (why)" of each image left out

    def normed(self) -> torch.Tensor:
        return torch.nn.functional.normalize(self.embeds, dim=-1)

    def index(self) -> dict[str, int]:
        return {f: i for i, f in enumerate(self.files)}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def cache_settings(images: Sequence[str | os.PathLike], analyzer, crop_size: int | None) -> str:
    """What the cached embeddings depend on, as JSON: the images, both models, the detection and the crop."""
    models = analyzer.models
    return json.dumps({
        "files": [os.fspath(p) for p in images], "recognizer_sha256": _sha256(models.recognizer.path),
        "detector": os.path.basename(models.detector.path), "det_threshold": float(models.detector.threshold),
        "pick": analyzer.pick, "retry_sizes": list(analyzer.retry_sizes), "crop_size": int(crop_size or 0)})


def cached_face_embeddings(images: Sequence[str | os.PathLike], analyzer, out: str | os.PathLike,
                           crop_size: int | None = None) -> tuple[FaceCache, list[str]]:
    """The cache at `out` when it was made from these images with these settings, else a new one; also the
    images skipped (warned about again when the cache is reused)."""
    settings = cache_settings(images, analyzer, crop_size)
    if Path(out).is_file():
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(out), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception:  # a damaged cache is simply made again
            meta = {}
        if meta.get("settings") == settings:
            skipped = json.loads(meta.get("skipped", "[]"))
            if skipped:
                logger.warning("face embeddings: %d image(s) skipped: %s", len(skipped), "; ".join(skipped))
            logger.info("face embeddings read from %s", out)
            return load_face_cache(out), skipped
    cache = build_face_cache(images, analyzer, out, crop_size, settings)
    return cache, cache.skipped


def build_face_cache(images: Sequence[str | os.PathLike], analyzer, out: str | os.PathLike,
                     crop_size: int | None = None, settings: str = "") -> FaceCache:
    """Detect and embed one face per image (the analyzer's pick), write the cache atomically, return it."""
    rows, files, skipped = [], [], []
    for path in images:
        name = os.fspath(path)
        try:
            face = analyzer.analyze(_read_rgb(name), (crop_size,) if crop_size else (), what=name)
        except (OSError, ValueError) as e:
            skipped.append(f"{name} ({' '.join(str(e).split())[:80]})")
            continue
        if face is None:
            skipped.append(f"{name} (no face found)")
            continue
        rows.append(face)
        files.append(name)
    if skipped:
        logger.warning("face embeddings: %d image(s) skipped: %s", len(skipped), "; ".join(skipped))
    if not rows:
        raise DatasetError(f"face embeddings: no face found in any of the {len(images)} images; FaceID training needs "
                           "pictures with one visible face each")
    rec = analyzer.models.recognizer.path
    tensors = {
        "embeds": torch.from_numpy(np.stack([f.embedding for f in rows])).float(),
        "kps": torch.from_numpy(np.stack([f.kps for f in rows])).float(),
        "bbox": torch.from_numpy(np.stack([f.bbox for f in rows])).float(),
        "det_score": torch.tensor([f.score for f in rows], dtype=torch.float32),
    }
    if crop_size:
        tensors["crops"] = torch.from_numpy(np.stack([f.crops[crop_size] for f in rows]))
    metadata = {"files": json.dumps(files), "recognizer": os.path.basename(rec), "recognizer_sha256": _sha256(rec),
                "crop_size": str(crop_size or 0), "embedding": "raw ArcFace (normalise for faceid/plus/portrait)",
                "skipped": json.dumps(skipped), "settings": settings}
    atomic_write(Path(out), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return load_face_cache(out)


def load_face_cache(path: str | os.PathLike) -> FaceCache:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(os.fspath(path))
        files = json.loads(meta["files"])
    except Exception as e:  # a damaged or foreign file
        raise DatasetError(f"{os.fspath(path)}: not a face-embedding cache of this kit ({' '.join(str(e).split())[:80]}); "
                           "delete it to compute the embeddings again") from None
    if len(files) != tensors["embeds"].shape[0]:
        raise DatasetError(f"{os.fspath(path)}: {len(files)} files but {tensors['embeds'].shape[0]} embeddings; "
                           "delete it to compute the embeddings again")
    return FaceCache(files, tensors["embeds"], tensors["kps"], tensors["bbox"], tensors["det_score"],
                     tensors.get("crops"), meta.get("recognizer", ""), json.loads(meta.get("skipped", "[]")))
