"""ComfyUI IP-Adapter Kit: registration only. The nodes live in `nodes/`, the host-free library in `ipa_train/`."""

import logging

WEB_DIRECTORY = "./web"

try:
    from .nodes import comfy_entrypoint  # noqa: F401  (ComfyUI's V3 entry point)
except ImportError as e:  # outside ComfyUI (tests, the CLI) the host modules are absent
    if e.name is None or e.name.split(".")[0] not in ("comfy", "comfy_api", "folder_paths", "server", "nodes"):
        logging.getLogger(__name__).warning("IP-Adapter Kit nodes not loaded: %s", e, exc_info=True)

__all__ = ["WEB_DIRECTORY"]
