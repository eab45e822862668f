"""Our nodes' declarations as ComfyUI serves them (/object_info), for the host-free tests.

The node classes use ComfyUI's V3 schema and import `comfy_api`, so without a host the tests read
`tests/data/kit_nodes.json`: each node's /object_info entry, written from the real host by
`tests/host/test_host_node_specs.py` (which fails when the file no longer matches the code; regenerate it with
`IPAKIT_UPDATE_NODE_SPECS=1 COMFYUI_PATH=... pytest tests/host/test_host_node_specs.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

SPEC_FILE = Path(__file__).resolve().parent / "data" / "kit_nodes.json"
# /object_info fields the tests and the frontend rely on; the rest (python_module, api_node, ...) is host detail.
FIELDS = ("input", "input_order", "output", "output_is_list", "output_name", "output_tooltips", "name", "display_name",
          "description", "category", "output_node")
# combo inputs whose options are the user's files: listed empty, as on a fresh install
FILE_COMBOS = {("IPAKitLoadAdapter", "adapter_file"), ("IPAKitLoadEmbeds", "embeds_file")}


def normalise(node_id: str, info: dict) -> dict:
    """An /object_info entry -> the stored form (JSON types; file lists emptied)."""
    entry = json.loads(json.dumps({k: info.get(k) for k in FIELDS}))
    for section in ("required", "optional"):
        for name, decl in entry["input"].get(section, {}).items():
            if (node_id, name) in FILE_COMBOS:
                if decl[0] == "COMBO":
                    decl[1]["options"] = []
                else:
                    decl[0] = []
    return entry


def load_specs() -> dict[str, dict]:
    return json.loads(SPEC_FILE.read_text())
