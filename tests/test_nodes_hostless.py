"""The node layer without ComfyUI: registration shim, folder registration, node declarations."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_pack(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_package_imports_outside_comfyui():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
        "assert m.NODE_CLASS_MAPPINGS == {} and m.WEB_DIRECTORY == './web'\n"
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
    return fp


def test_folder_registered_only_when_absent(tmp_path, monkeypatch):
    fp = _fake_folder_paths(tmp_path)
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    pack = _load_pack("pack_folders")  # inside "ComfyUI" (folder_paths importable) the shim registers the folder
    register_folders = pack.nodes.register_folders
    paths, exts = fp.folder_names_and_paths["ipadapter"]
    assert paths == [str(tmp_path / "models" / "ipadapter"), str(tmp_path / "output" / "ipadapter_kit")]
    assert exts == fp.supported_pt_extensions

    other = _fake_folder_paths(tmp_path, existing=["/elsewhere/ipadapter"])  # another pack registered it first
    monkeypatch.setitem(sys.modules, "folder_paths", other)
    register_folders()
    assert other.folder_names_and_paths["ipadapter"][0] == ["/elsewhere/ipadapter", str(tmp_path / "output" / "ipadapter_kit")]


def test_every_node_declares_tooltips_and_prefixed_ids(tmp_path, monkeypatch):
    fp = _fake_folder_paths(tmp_path)
    fp.get_filename_list = lambda name: ["a.safetensors", "notes.txt"]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    pack = _load_pack("pack_decl")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS

    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("IPAKit")
        spec = cls.INPUT_TYPES()
        for key, section in spec.items():
            if key == "hidden":
                continue
            for name, decl in section.items():
                assert len(decl) == 2 and decl[1].get("tooltip"), f"{node_id}.{name}"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert all(t.startswith("IPAKIT_") or t.isupper() for t in cls.RETURN_TYPES)
        assert cls.CATEGORY.startswith("ipadapter_kit")
    files = NODE_CLASS_MAPPINGS["IPAKitLoadAdapter"].INPUT_TYPES()["required"]["adapter_file"][0]
    assert files == ["a.safetensors"]
