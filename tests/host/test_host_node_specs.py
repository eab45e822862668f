"""tests/data/kit_nodes.json is what the real host serves for our nodes (the host-free tests rely on it)."""

from __future__ import annotations

import asyncio
import json
import os

from ..node_specs import SPEC_FILE, load_specs, normalise


def live_specs(kit) -> dict[str, dict]:
    extension = asyncio.run(kit.comfy_entrypoint())
    nodes = asyncio.run(extension.get_node_list())
    return {cls.GET_SCHEMA().node_id: normalise(cls.GET_SCHEMA().node_id, cls.GET_NODE_INFO_V1()) for cls in nodes}


def test_stored_node_specs_match_the_host(kit):
    live = live_specs(kit)
    if os.environ.get("IPAKIT_UPDATE_NODE_SPECS"):
        # input order matters (widget values map onto it): only the node ids are sorted
        SPEC_FILE.write_text(json.dumps(dict(sorted(live.items())), indent=1) + "\n")
    stored = load_specs()
    assert sorted(stored) == sorted(live), "node list changed: regenerate (see tests/node_specs.py)"
    for node_id in live:
        assert stored[node_id] == live[node_id], f"{node_id} changed: regenerate tests/data/kit_nodes.json (see tests/node_specs.py)"


def test_registration_is_v3_only(kit):
    """One registration path: comfy_entrypoint; ComfyUI would ignore it if NODE_CLASS_MAPPINGS were present."""
    assert not hasattr(kit, "NODE_CLASS_MAPPINGS") and callable(kit.comfy_entrypoint)
    from comfy_api.latest import io

    nodes = asyncio.run(asyncio.run(kit.comfy_entrypoint()).get_node_list())
    assert nodes and all(issubclass(cls, io.ComfyNode) for cls in nodes)
