"""ComfyUI IP-Adapter Kit: registration only. The nodes live in `nodes/`, the host-free library in `ipa_train/`."""


WEB_DIRECTORY = "./web"
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
