"""Tiny stand-in face models written with the `onnx` package (nothing binary is committed).

Detector (SCRFD layout, 9 outputs): for strides 8/16/32 the input is average-pooled by the stride; a 1x1 conv scores
each cell as sigmoid(gain * sum of its channels - bias) for 2 anchors (bright cells are "faces"), another gives a
constant box distance of 1.5 strides and a third constant landmark offsets (eyes, nose, mouth corners) in strides.
Recognizer (ArcFace layout): [1, 3, 112, 112] -> 8x8 average pool -> [1, 588] -> fixed random [588, 512] matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

KPS_OFFSETS = np.array([[-0.45, -0.35], [0.45, -0.35], [0.0, 0.1], [-0.35, 0.55], [0.35, 0.55]], np.float32)


def _head(onnx, helper, name: str, pooled: str, weight: np.ndarray, bias: np.ndarray, k: int, sigmoid: bool):
    from onnx import numpy_helper

    inits = [numpy_helper.from_array(weight.astype(np.float32), f"{name}_w"),
             numpy_helper.from_array(bias.astype(np.float32), f"{name}_b"),
             numpy_helper.from_array(np.array([-1, k], np.int64), f"{name}_shape")]
    nodes = [helper.make_node("Conv", [pooled, f"{name}_w", f"{name}_b"], [f"{name}_conv"])]
    last = f"{name}_conv"
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [last], [f"{name}_sig"]))
        last = f"{name}_sig"
    nodes += [helper.make_node("Transpose", [last], [f"{name}_t"], perm=[0, 2, 3, 1]),
              helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name])]
    return nodes, inits


def write_detector(path: Path, gain: float = 1.0, bias: float = 1.0) -> Path:
    """Only the stride-32 cells can fire (the finer strides get a bias no cell overcomes), so a face gives a few
    overlapping 3x3-cell boxes that NMS reduces, as a real detector's do."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for s in (8, 16, 32):
        pooled = f"pool{s}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [pooled], kernel_shape=[s, s], strides=[s, s]))
        heads = {
            "score": (np.full((2, 3, 1, 1), gain), np.full(2, -bias if s == 32 else -100.0), 1, True),
            "bbox": (np.zeros((8, 3, 1, 1)), np.full(8, 1.5), 4, False),
            "kps": (np.zeros((20, 3, 1, 1)), np.tile(KPS_OFFSETS.reshape(-1), 2), 10, False),
        }
        for kind, (w, b, k, sig) in heads.items():
            n, i = _head(onnx, helper, f"{kind}_{s}", pooled, w, b, k, sig)
            nodes += n
            inits += i
            outputs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [f"n{s}", k]))
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              outputs["score"] + outputs["bbox"] + outputs["kps"], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_recognizer(path: Path, seed: int = 0, size: int = 112) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    pooled = 3 * (size // 8) ** 2
    w = np.random.default_rng(seed).normal(0, 1, (pooled, 512)).astype(np.float32)
    nodes = [helper.make_node("AveragePool", ["input.1"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Reshape", ["p", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["683"])]
    inits = [numpy_helper.from_array(np.array([1, pooled], np.int64), "shape"), numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def write_pack(folder: Path) -> Path:
    """`folder` with det_10g.onnx and w600k_r50.onnx stand-ins (the buffalo_l names; routing ignores names)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_detector(folder / "det_10g.onnx")
    write_recognizer(folder / "w600k_r50.onnx")
    return folder


def face_image(h: int = 240, w: int = 320, faces=((64, 96, 96),), seed: int = 0) -> np.ndarray:
    """RGB uint8: dark noise with bright textured squares (top, left, side) the stand-in detector sees as faces."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    for top, left, side in faces:
        img[top : top + side, left : left + side] = rng.integers(170, 256, (side, side, 3), dtype=np.uint8)
    return img
