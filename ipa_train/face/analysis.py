"""Detect, pick, align and embed one face per image; a batch where some image has no face stops naming it, or skips it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import FaceError
from .align import norm_crop
from .models import FaceModels

logger = logging.getLogger(__name__)

# Detection sizes tried in turn until a face is found (a face filling the frame is often missed at 640).
RETRY_SIZES = (640, 576, 512, 448, 384, 320)
PICKS = ("score", "largest")
MIN_SIDE = 32


@dataclass
class Face:
    """One detected face: box [x1, y1, x2, y2], score, 5 landmarks [5, 2], ArcFace embedding (raw and L2-normalised),
    aligned crops by size, and the detection size that found it."""

    bbox: np.ndarray
    score: float
    kps: np.ndarray
    embedding: np.ndarray
    crops: dict[int, np.ndarray] = field(default_factory=dict)
    det_size: int = 640

    @property
    def normed_embedding(self) -> np.ndarray:
        return self.embedding / np.linalg.norm(self.embedding)


def to_rgb_uint8(image: np.ndarray, what: str = "image") -> np.ndarray:
    """[H, W] gray, [H, W, 1|3|4] uint8 or float 0..1 -> [H, W, 3] uint8 RGB (alpha dropped, gray repeated);
    floats are truncated to 0..255 as ComfyUI's IMAGE-to-uint8 conversions do."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise FaceError(f"{what}: expected an image [height, width, channels] with 1, 3 or 4 channels, got shape "
                        f"{tuple(np.asarray(image).shape)}")
    if a.shape[0] < MIN_SIDE or a.shape[1] < MIN_SIDE:
        raise FaceError(f"{what} is {a.shape[1]}x{a.shape[0]} pixels: too small to find a face in (at least "
                        f"{MIN_SIDE}x{MIN_SIDE}); give a larger picture of the face")
    if a.dtype != np.uint8:
        a = np.clip(a.astype(np.float32) * 255.0, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


class FaceAnalyzer:
    """models: a FaceModels; pick: "score" (highest detection score, as InsightFace orders them) or "largest"."""

    def __init__(self, models: FaceModels, pick: str = "score", retry_sizes: Sequence[int] = RETRY_SIZES):
        if pick not in PICKS:
            raise FaceError(f"face pick {pick!r}: expected one of {', '.join(PICKS)}")
        self.models = models
        self.pick = pick
        self.retry_sizes = tuple(retry_sizes)

    def detect(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """All faces at the first detection size that finds any: boxes [N, 5], landmarks [N, 5, 2], the size."""
        assert self.models.detector is not None
        for size in self.retry_sizes:
            dets, kps = self.models.detector.detect(rgb, (size, size))
            if len(dets):
                if size != self.retry_sizes[0]:
                    logger.info("face found at detection size %d (none at %d)", size, self.retry_sizes[0])
                return dets, kps, size
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32), self.retry_sizes[-1]

    def _choose(self, dets: np.ndarray) -> int:
        if self.pick == "largest":
            area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
            return int(np.argmax(area))
        return 0  # detections are sorted by score

    def analyze(self, image: np.ndarray, crop_sizes: Sequence[int] = (), what: str = "image") -> Face | None:
        """The chosen face of one image (None when there is none), with its embedding and the requested crops."""
        rgb = to_rgb_uint8(image, what)
        dets, kps, size = self.detect(rgb)
        if not len(dets):
            return None
        if len(dets) > 1:
            logger.warning("%s: %d faces found, using the %s one; crop the image to the face you mean, or switch "
                           "pick between score and largest", what, len(dets),
                           "highest-scoring" if self.pick == "score" else "largest")
        i = self._choose(dets)
        assert self.models.recognizer is not None
        rec = self.models.recognizer
        aligned = norm_crop(rgb, kps[i], rec.size)
        embedding = rec.embed(aligned[None])[0].astype(np.float32)
        crops = {s: (aligned if s == rec.size else norm_crop(rgb, kps[i], s)) for s in crop_sizes}
        return Face(dets[i, :4].copy(), float(dets[i, 4]), kps[i].copy(), embedding, crops, size)

    def analyze_batch(self, images: Sequence[np.ndarray], crop_sizes: Sequence[int] = (), skip_missing: bool = False,
                      what: str = "image") -> list[Face | None]:
        """One Face per image. An image without a face stops the batch with one line naming it (0-based index k),
        or, with skip_missing, gives None there and one warning naming every skipped image."""
        faces = [self.analyze(img, crop_sizes, f"{what} {k}") for k, img in enumerate(images)]
        missing = [k for k, f in enumerate(faces) if f is None]
        if missing and not skip_missing:
            k = missing[0]
            raise FaceError(f"no face found in {what} {k} of the batch (tried detection sizes "
                            f"{', '.join(map(str, self.retry_sizes))}); use a picture where the face is visible and "
                            "not cut off, pad the image if the face fills it, or turn on skipping images without a face")
        if missing:
            logger.warning("no face found in %s %s of the batch: skipped", what, ", ".join(map(str, missing)))
        return faces
