"""Host-free face pipeline for FaceID on onnxruntime alone: SCRFD detection, 5-point alignment, ArcFace embedding.

It reads the user's InsightFace model folders (buffalo_l, antelopev2: `models/insightface/models/<name>/*.onnx`) and
needs neither insightface nor OpenCV; onnxruntime is imported only when a model is opened.
"""

from .align import estimate_norm, norm_crop, similarity_transform, warp_affine
from .analysis import Face, FaceAnalyzer
from .models import FaceModels, find_model_folder
from .runtime import available_providers

__all__ = [
    "Face", "FaceAnalyzer", "FaceModels", "available_providers", "estimate_norm", "find_model_folder", "norm_crop",
    "similarity_transform", "warp_affine",
]
