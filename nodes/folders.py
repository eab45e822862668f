"""Model folders and names the pack shares with ComfyUI; importable without the host (no comfy_api at import)."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ipadapter_kit")

CATEGORY = "ipadapter_kit"
FOLDER = "ipadapter"
TRAINED_SUBDIR = "ipadapter_kit"  # under ComfyUI's output folder: where training writes adapters
ADAPTER_EXTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


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

    return sorted(f for f in folder_paths.get_filename_list(FOLDER) if f.lower().endswith(ADAPTER_EXTS))
