"""Finding the user's InsightFace model folder and routing its ONNX files by graph signature (never by file name).

A detector has at least 5 outputs; a recognizer one output and a square input of at least 112 px (a multiple of 16).
The landmark (192 px), gender/age (96 px) and swapper models of the packs are recognised and left unused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FaceError
from .runtime import choose_providers, open_session
from .scrfd import SCRFD, layout_for

logger = logging.getLogger(__name__)

PACKS = {
    "buffalo_l": ("det_10g.onnx, w600k_r50.onnx (and 1k3d68, 2d106det, genderage)",
                  "https://github.com/deepinsight/insightface/releases (model-zoo: buffalo_l.zip)"),
    "antelopev2": ("scrfd_10g_bnkps.onnx, glintr100.onnx (and 1k3d68, 2d106det, genderage)",
                   "https://github.com/deepinsight/insightface/tree/master/python-package (antelopev2.zip)"),
}


def find_model_folder(root: str | os.PathLike, name: str) -> Path:
    """`<root>/models/<name>` (the folder InsightFace and the community pack use), or `<root>/<name>`, including the
    nested `<name>/<name>` a zip often unpacks into; one FaceError naming the folder and the files otherwise."""
    root = Path(root)
    for candidate in (root / "models" / name, root / name):
        for folder in (candidate, candidate / name):
            if folder.is_dir() and any(folder.glob("*.onnx")):
                return folder
    files, page = PACKS.get(name, ("a detector and a recognizer .onnx", "the InsightFace model zoo"))
    raise FaceError(f"face models '{name}' not found: put {files} in {root / 'models' / name} (download from {page}; "
                    "the models are for non-commercial research only)")


def _onnx_node_names(path: str, limit: int = 8) -> list[str]:
    """Names of the first graph nodes, read from the protobuf without the onnx package (ModelProto.graph = field 7,
    GraphProto.node = field 1, NodeProto.name = field 3)."""
    data = memoryview(Path(path).read_bytes())

    def varint(buf: memoryview, i: int) -> tuple[int, int]:
        shift = value = 0
        while True:
            b = buf[i]
            value |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                return value, i
            shift += 7

    def fields(buf: memoryview):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            kind = key & 7
            if kind == 0:
                _, i = varint(buf, i)
                yield key >> 3, None
            elif kind == 2:
                n, i = varint(buf, i)
                yield key >> 3, buf[i : i + n]
                i += n
            elif kind in (1, 5):
                i += 8 if kind == 1 else 4
                yield key >> 3, None
            else:
                return

    names: list[str] = []
    for num, graph in fields(data):
        if num != 7 or graph is None:
            continue
        for gnum, node in fields(graph):
            if gnum == 1 and node is not None:
                names.append(next((bytes(v).decode("utf-8", "replace") for n, v in fields(node) if n == 3 and v is not None), ""))
                if len(names) >= limit:
                    return names
    return names


@dataclass
class ArcFace:
    """A recognizer session: aligned RGB crops [N, S, S, 3] uint8 -> raw embeddings [N, D]."""

    session: Any
    path: str
    size: int
    mean: float
    std: float

    def embed(self, crops: np.ndarray) -> np.ndarray:
        blob = ((crops.astype(np.float32) - np.float32(self.mean)) * np.float32(1.0 / self.std)).transpose(0, 3, 1, 2)
        inp = self.session.get_inputs()[0].name
        return np.concatenate([self.session.run(None, {inp: np.ascontiguousarray(b[None])})[0] for b in blob])


def _recognizer(session: Any, path: str) -> ArcFace | None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape
    if len(outputs) != 1 or len(shape) != 4 or not all(isinstance(s, int) for s in shape[2:]):
        return None
    if shape[2] != shape[3] or shape[2] < 112 or shape[2] % 16 or len(inputs) != 1:
        return None
    names = _onnx_node_names(path)
    # mxnet exports normalise inside the graph (Sub/Mul first nodes): feed raw pixels then
    raw = any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names)
    return ArcFace(session, path, int(shape[2]), 0.0 if raw else 127.5, 1.0 if raw else 127.5)


class FaceModels:
    """The detector and recognizer of one model folder, on the chosen execution provider."""

    def __init__(self, folder: str | os.PathLike, provider: str = "auto", det_threshold: float = 0.5):
        self.folder = Path(folder)
        self.providers = choose_providers(provider)
        self.detector: SCRFD | None = None
        self.recognizer: ArcFace | None = None
        seen: list[str] = []
        for path in sorted(self.folder.glob("*.onnx")):
            session = open_session(str(path), self.providers)
            seen.append(path.name)
            layout = layout_for(len(session.get_outputs()))
            if layout is not None and len(session.get_outputs()) >= 5:
                self.detector = self.detector or SCRFD(session, str(path), layout, det_threshold)
                continue
            rec = _recognizer(session, str(path))
            if rec is not None:
                self.recognizer = self.recognizer or rec
        missing = [what for what, m in (("detector (SCRFD, e.g. det_10g.onnx)", self.detector),
                                        ("recognizer (ArcFace, e.g. w600k_r50.onnx)", self.recognizer)) if m is None]
        if missing:
            raise FaceError(f"face models in {self.folder}: no {' and no '.join(missing)} among {', '.join(seen) or 'no files'}; "
                            "the folder needs the detector and recognizer ONNX files of buffalo_l or antelopev2")
        logger.info("face models from %s: detector %s, recognizer %s, providers %s", self.folder,
                    Path(self.detector.path).name, Path(self.recognizer.path).name, self.providers)
