"""ComfyUI IP-Adapter Kit: registration only. The nodes live in `nodes/`, the host-free library in `ipa_train/`.

ComfyUI (V3 node API) calls `comfy_entrypoint`; nothing else registers nodes, so importing this package outside
ComfyUI (tests, tools) is harmless.
"""

import os
import sys

WEB_DIRECTORY = "./web"

# The nodes import the bundled library as `ipa_train`; ComfyUI puts only custom_nodes/ on sys.path.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


async def comfy_entrypoint():
    """-> the pack's ComfyExtension (its node list); registers the `ipadapter` model folder first."""
    from .nodes import IPAKitExtension
    from .nodes.folders import register_folders

    register_folders()
    return IPAKitExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
