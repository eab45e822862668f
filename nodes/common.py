"""Host glue shared by the nodes: folders, IO type names, the host's attention, CLIP vision calls."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("ipadapter_kit")

CATEGORY = "ipadapter_kit"
ADAPTER = "IPAKIT_ADAPTER"
EMBEDS = "IPAKIT_EMBEDS"
DATASET = "IPAKIT_DATASET"
FOLDER = "ipadapter"
TRAINED_SUBDIR = "ipadapter_kit"  # under ComfyUI's output folder: where training writes adapters


def register_folders() -> None:
    """Register models/ipadapter only when no other pack did (they share the same files), and add our
    training output folder to it so trained adapters show up in every loader."""
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = (
            [os.path.join(folder_paths.models_dir, FOLDER)],
            folder_paths.supported_pt_extensions,
        )
    trained = os.path.join(folder_paths.get_output_directory(), TRAINED_SUBDIR)
    folder_paths.add_model_folder_path(FOLDER, trained)


def adapter_files() -> list[str]:
    import folder_paths

    return sorted(f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")))


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
