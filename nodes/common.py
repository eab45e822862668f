"""Host glue shared by the nodes: V3 IO types, the host's attention, CLIP vision calls."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .folders import CATEGORY, FOLDER, TRAINED_SUBDIR, adapter_files, logger

__all__ = ["CATEGORY", "FOLDER", "TRAINED_SUBDIR", "adapter_files", "logger", "Adapter", "Embeds", "Dataset"]

# Our custom IO types, prefixed so they never meet another pack's IPADAPTER / EMBEDS sockets.
Adapter = io.Custom("IPAKIT_ADAPTER")
Embeds = io.Custom("IPAKIT_EMBEDS")
Dataset = io.Custom("IPAKIT_DATASET")


def host_text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """The host's own attention, as the unpatched layer calls it, so an inactive image branch changes nothing."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def clip_outputs(clip_vision, image: torch.Tensor, crop: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [N, H, W, 3] -> (image_embeds [N, P], penultimate hidden states [N, L, D]) with ComfyUI's CLIP vision."""
    from ipa_train.adapter.imageprep import pad_to_square

    if crop == "pad":
        image = pad_to_square(image, getattr(clip_vision, "image_mean", None))
    out = clip_vision.encode_image(image, crop=(crop == "center"))
    return out["image_embeds"].float(), out["penultimate_hidden_states"].float()


def clip_outputs_of_zero_pixels(clip_vision) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP outputs for an all-zero *normalised* pixel tensor (the reference's unconditional image)."""
    import comfy.model_management as mm

    mm.load_model_gpu(clip_vision.patcher)
    size = getattr(clip_vision, "image_size", 224)
    pixels = torch.zeros(1, 3, size, size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    return out[2].float().cpu(), out[1].float().cpu()


def pil_to_image(img) -> torch.Tensor:
    """PIL image -> ComfyUI IMAGE [1, H, W, 3] float in 0..1."""
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(arr)[None]
