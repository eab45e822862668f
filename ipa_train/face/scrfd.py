"""SCRFD face detection on an onnxruntime session: letterbox, decode, threshold and NMS as InsightFace does.

The detector's outputs are, for each stride s of its pyramid, scores [A*h*w, 1], box distances [A*h*w, 4] and (with
landmarks) keypoint offsets [A*h*w, 10], all in units of s; A anchors share each cell, whose centre is its top-left
corner (x*s, y*s). 6/9 outputs: strides 8, 16, 32 with 2 anchors; 10/15 outputs: strides 8..128 with 1 anchor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .align import resize_bilinear

INPUT_MEAN, INPUT_STD = 127.5, 128.0
NMS_IOU = 0.4


@dataclass(frozen=True)
class Layout:
    strides: tuple[int, ...]
    anchors: int
    keypoints: bool


_LAYOUTS = {6: Layout((8, 16, 32), 2, False), 9: Layout((8, 16, 32), 2, True),
            10: Layout((8, 16, 32, 64, 128), 1, False), 15: Layout((8, 16, 32, 64, 128), 1, True)}


def layout_for(num_outputs: int) -> Layout | None:
    return _LAYOUTS.get(num_outputs)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """RGB uint8 [H, W, 3] resized into the top-left of a zero canvas of size (width, height), aspect kept."""
    h, w = image.shape[:2]
    if h / w > size[1] / size[0]:
        new_h = size[1]
        new_w = int(new_h / (h / w))
    else:
        new_w = size[0]
        new_h = int(new_w * (h / w))
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resize_bilinear(image, max(new_w, 1), max(new_h, 1))
    return canvas, new_h / h


def _anchor_centres(h: int, w: int, stride: int, anchors: int) -> np.ndarray:
    grid = np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32)  # [h, w, (x, y)]
    centres = (grid * stride).reshape(-1, 2)
    return np.repeat(centres, anchors, axis=0) if anchors > 1 else centres


def nms(dets: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Greedy NMS on [N, 5] (x1, y1, x2, y2, score), with InsightFace's +1 pixel area convention."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(overlap <= iou)[0] + 1]
    return keep


class SCRFD:
    """A detector session. `detect(rgb, size)` -> boxes [N, 5] (x1, y1, x2, y2, score) and keypoints [N, 5, 2]."""

    def __init__(self, session: Any, path: str, layout: Layout, threshold: float = 0.5):
        self.session = session
        self.path = path
        self.layout = layout
        self.threshold = threshold
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in session.get_outputs()]
        shape = inp.shape
        fixed = isinstance(shape[2], int) and isinstance(shape[3], int)
        self.fixed_size = (int(shape[3]), int(shape[2])) if fixed else None  # (width, height)
        self.batched = len(session.get_outputs()[0].shape) == 3

    def _candidates(self, image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        canvas, scale = letterbox(image, size)
        blob = ((canvas.astype(np.float32) - INPUT_MEAN) / INPUT_STD).transpose(2, 0, 1)[None]  # RGB NCHW
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob, dtype=np.float32)})
        n = len(self.layout.strides)
        scores, boxes, kpss = [], [], []
        for i, stride in enumerate(self.layout.strides):
            pick = (lambda o: o[0]) if self.batched else (lambda o: o)
            score = pick(outs[i]).reshape(-1)
            centres = _anchor_centres(size[1] // stride, size[0] // stride, stride, self.layout.anchors)
            dist = pick(outs[i + n]).reshape(-1, 4) * stride
            keep = np.where(score >= self.threshold)[0]
            box = np.concatenate([centres - dist[:, :2], centres + dist[:, 2:]], axis=1)
            scores.append(score[keep])
            boxes.append(box[keep])
            if self.layout.keypoints:
                off = pick(outs[i + 2 * n]).reshape(-1, 10) * stride
                kps = (np.tile(centres, 5) + off).reshape(-1, 5, 2)
                kpss.append(kps[keep])
        score = np.concatenate(scores)
        order = np.argsort(-score, kind="stable")
        dets = np.hstack([np.concatenate(boxes) / scale, score[:, None]]).astype(np.float32)[order]
        kps = (np.concatenate(kpss) / scale)[order] if self.layout.keypoints else np.zeros((len(score), 5, 2), np.float32)
        return dets, kps

    def detect(self, image: np.ndarray, size: tuple[int, int] = (640, 640)) -> tuple[np.ndarray, np.ndarray]:
        size = self.fixed_size or size
        dets, kps = self._candidates(image, size)
        if not len(dets):
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        order = np.argsort(-dets[:, 4], kind="stable")
        dets, kps = dets[order], kps[order]
        keep = nms(dets)
        return dets[keep], kps[keep]
