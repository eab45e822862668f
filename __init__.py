"""ComfyUI IP-Adapter Kit: registration only. The nodes live in `nodes/`, the host-free library in `ipa_train/`."""


import os
import sys

WEB_DIRECTORY = "./web"

# The nodes import the bundled library as `ipa_train`; ComfyUI puts only custom_nodes/ on sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    import folder_paths  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported outside ComfyUI (tests, tools): nothing to register
    folder_paths = None

if folder_paths is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_folders

    register_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
