"""onnxruntime, imported lazily: whichever distribution the user has (onnxruntime, onnxruntime-gpu, -directml, ...)
provides the `onnxruntime` module, so the pack never requires one of them by name."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import FaceError

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "FaceID needs onnxruntime to run the face models: install it into ComfyUI's Python with "
    "`python -m pip install onnxruntime` (or `onnxruntime-gpu` on NVIDIA, `onnxruntime-directml` on Windows "
    "with DirectML; keep only one of them), or `pip install comfyui-ipadapter-kit[face]`"
)
# Preferred order when the user leaves the choice to us: accelerators first, the CPU always last.
PREFERRED = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
             "OpenVINOExecutionProvider", "CPUExecutionProvider")
# Short names users type or pick in a node.
ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider",
           "directml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def ort() -> Any:
    """The onnxruntime module, or one FaceError saying what to install."""
    try:
        import onnxruntime
    except ImportError:
        raise FaceError(INSTALL_HINT) from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(ort().get_available_providers())


def choose_providers(provider: str = "auto") -> list[str]:
    """`auto`: every available provider in PREFERRED order; a name (`cuda`, `CPUExecutionProvider`): it, then CPU."""
    available = available_providers()
    if provider in ("", "auto", None):
        chosen = [p for p in PREFERRED if p in available] or available
        return chosen
    name = ALIASES.get(provider.lower(), provider)
    if name not in available:
        raise FaceError(f"face models: execution provider {provider!r} is not offered by this onnxruntime (it offers "
                        f"{', '.join(available)}); pick one of these or 'auto'")
    return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" and "CPUExecutionProvider" in available else [])


def open_session(path: str, providers: list[str]) -> Any:
    """An InferenceSession, or one FaceError naming the file when it is not a readable ONNX model."""
    rt = ort()
    options = rt.SessionOptions()
    options.log_severity_level = 3
    try:
        return rt.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = " ".join(str(e).split())[:160]
        raise FaceError(f"{path}: cannot be opened as an ONNX model ({first}); the file is truncated or damaged: "
                        "download the face models again") from None
