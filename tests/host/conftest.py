"""Host tests: run against a real ComfyUI checkout named by COMFYUI_PATH; skipped, saying why, otherwise."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")


def pytest_collection_modifyitems(config, items):
    reason = None
    if not COMFYUI_PATH:
        reason = "COMFYUI_PATH is not set: host tests need a ComfyUI checkout (see README, Development)"
    elif not (Path(COMFYUI_PATH) / "comfy").is_dir():
        reason = f"COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout (no comfy/ folder)"
    for item in items:
        if "tests/host" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.host)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process on CPU."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is first imported
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd  # noqa: F401
    import utils.extra_config  # noqa: F401  (keeps ComfyUI's top-level `utils` package importable)

    return comfy


@pytest.fixture(scope="session")
def kit(comfy):
    """This repository imported as the custom-node package ComfyUI would load."""
    name = "ipadapter_kit_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
