"""The node layer without ComfyUI: registration entry point, folder registration, node declarations."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

from .node_specs import load_specs

ROOT = Path(__file__).resolve().parent.parent


def test_package_imports_outside_comfyui():
    """Outside ComfyUI the pack imports without the host and registers nothing; V3 registration only."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './web' and callable(m.comfy_entrypoint)\n"
        "assert not hasattr(m, 'NODE_CLASS_MAPPINGS') and 'comfy_api' not in sys.modules\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def _fake_folder_paths(tmp_path, existing=None):
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.supported_pt_extensions = {".safetensors", ".bin"}
    fp.folder_names_and_paths = {} if existing is None else {"ipadapter": (list(existing), {".safetensors"})}

    def add_model_folder_path(name, path, is_default=False):
        fp.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_output_directory = lambda: str(tmp_path / "output")
    fp.get_filename_list = lambda name: ["a.safetensors", "notes.txt", "b.bin"]
    return fp


def _folders_module():
    """nodes/folders.py alone: it needs no host at import (nodes/__init__.py does)."""
    spec = importlib.util.spec_from_file_location("kit_folders", ROOT / "nodes" / "folders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_folder_registered_only_when_absent(tmp_path, monkeypatch):
    folders = _folders_module()
    fp = _fake_folder_paths(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    folders.register_folders()
    paths, exts = fp.folder_names_and_paths["ipadapter"]
    assert paths == [str(tmp_path / "models" / "ipadapter"), str(tmp_path / "output" / "ipadapter_kit")]
    assert exts == fp.supported_pt_extensions
    assert folders.adapter_files() == ["a.safetensors", "b.bin"]

    other = _fake_folder_paths(tmp_path, existing=["/elsewhere/ipadapter"])  # another pack registered it first
    monkeypatch.setitem(sys.modules, "folder_paths", other)
    folders.register_folders()
    assert other.folder_names_and_paths["ipadapter"][0] == ["/elsewhere/ipadapter", str(tmp_path / "output" / "ipadapter_kit")]


def test_every_node_declares_tooltips_and_prefixed_ids():
    """On the declarations the host serves (tests/data/kit_nodes.json, checked against the host in tests/host)."""
    specs = load_specs()
    assert len(specs) >= 8
    for node_id, spec in specs.items():
        assert node_id.startswith("IPAKit") and spec["name"] == node_id
        assert spec["display_name"].endswith("(Kit)") and spec["description"]
        assert spec["category"].startswith("ipadapter_kit")
        for section in ("required", "optional"):
            for name, decl in spec["input"].get(section, {}).items():
                assert len(decl) == 2 and decl[1].get("tooltip"), f"{node_id}.{name}"
        assert len(spec["output_tooltips"]) == len(spec["output"]) and all(spec["output_tooltips"]), node_id
        assert all(t.startswith("IPAKIT_") or t in CORE_TYPES for t in spec["output"]), node_id
        for section in ("required", "optional"):
            for name, decl in spec["input"].get(section, {}).items():
                typ = decl[0]
                assert isinstance(typ, list) or typ.startswith("IPAKIT_") or typ in CORE_TYPES, f"{node_id}.{name}: {typ}"


CORE_TYPES = {"MODEL", "CLIP", "VAE", "CLIP_VISION", "IMAGE", "MASK", "LATENT", "CONDITIONING", "STRING", "FLOAT", "INT",
              "BOOLEAN", "COMBO"}


def test_new_apply_inputs_are_appended_and_match_the_library():
    """Saved workflows keep loading: the widgets they store are still first, in their order; the new ones are
    optional (an API prompt without them validates) and list exactly the library's values."""
    from ipa_train.adapter.attention import EMBEDS_SCALING
    from ipa_train.adapter.references import COMBINE_METHODS
    from ipa_train.adapter.weight_types import WEIGHT_TYPES

    specs = load_specs()
    before = {"IPAKitApply": ["model", "adapter", "embeds", "mode", "weight", "fusion_lambda", "start_at", "end_at",
                              "layers", "layer_weights"],
              "IPAKitApplySimple": ["model", "adapter", "clip_vision", "image", "weight", "mode"],
              "IPAKitEncodeImage": ["adapter", "clip_vision", "image", "combine", "crop"]}
    for node_id, names in before.items():
        assert list(specs[node_id]["input"]["required"]) == names, node_id
    def options(node_id, name):
        spec = specs[node_id]["input"]
        decl = {**spec.get("required", {}), **spec.get("optional", {})}[name]
        return decl[1]["options"] if decl[0] == "COMBO" else decl[0]

    for node_id in ("IPAKitApply", "IPAKitApplySimple"):
        assert options(node_id, "weight_type") == list(WEIGHT_TYPES)
    for node_id in ("IPAKitApply", "IPAKitApplyStyleComposition"):
        assert options(node_id, "embeds_scaling") == list(EMBEDS_SCALING)
    assert options("IPAKitEncodeImage", "combine") == options("IPAKitApplyStyleComposition", "combine_embeds") == list(COMBINE_METHODS)
    style = specs["IPAKitApplyStyleComposition"]["input"]["required"]
    assert {"image_style", "image_composition", "weight_style", "weight_composition", "expand_style"} <= set(style)
