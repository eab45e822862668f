"""The node layer without ComfyUI: registration shim, folder registration, node declarations."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

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


def fake_comfy_samplers(mp: pytest.MonkeyPatch) -> None:
    """`comfy.samplers.KSampler.SAMPLERS/SCHEDULERS` (read by IPAKitWeightSweep.INPUT_TYPES), from the core snapshot."""
    import json

    core = json.loads((ROOT / "tests" / "data" / "core_nodes.json").read_text())["KSampler"]["input"]["required"]
    comfy, samplers = types.ModuleType("comfy"), types.ModuleType("comfy.samplers")
    samplers.KSampler = type("KSampler", (), {"SAMPLERS": core["sampler_name"][0], "SCHEDULERS": core["scheduler"][0]})
    comfy.samplers = samplers
    mp.setitem(sys.modules, "comfy", comfy)
    mp.setitem(sys.modules, "comfy.samplers", samplers)


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
    fake_comfy_samplers(monkeypatch)
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


class FakeClipVision:
    """ComfyUI's CLIP_VISION as the evaluate node uses it: encode_image(image, crop=True)["image_embeds"]."""

    def __init__(self):
        self.crops = []

    def encode_image(self, image, crop=True):
        self.crops.append(crop)
        return {"image_embeds": image.mean(dim=(1, 2)) - 0.5}  # [N, 3]: mean colour minus grey


def _evaluate_node(tmp_path, monkeypatch):
    fp = _fake_folder_paths(tmp_path)
    fp.get_filename_list = lambda name: []
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return _load_pack("pack_eval").NODE_CLASS_MAPPINGS["IPAKitEvaluate"]


def _solid(r, g, b):
    import torch

    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 1, 1, 3).expand(1, 8, 8, 3).clone()


def test_evaluate_node_with_clip_vision_only(tmp_path, monkeypatch):
    import json

    import torch

    node = _evaluate_node(tmp_path, monkeypatch)()
    clip_vision = FakeClipVision()
    ref = _solid(1.0, 0.5, 0.5)
    report, combined, grade = node.run(ref.repeat(2, 1, 1, 1), ref, "a red square", "", clip_vision, save_as="run1")
    data = json.loads(report)
    assert combined == pytest.approx(100.0) and grade == "A+"
    assert data["scores"]["prompt_following"] is None and data["scores"]["diversity"] == pytest.approx(0.0)
    assert any("prompt following skipped" in n for n in data["notes"])
    assert clip_vision.crops and all(c is True for c in clip_vision.crops)
    saved = tmp_path / "output" / "ipadapter_kit" / "evaluations" / "run1.json"
    assert json.loads(saved.read_text()) == data

    images = torch.cat([_solid(1.0, 0.5, 0.5), _solid(0.5, 1.0, 0.5)])  # one matches, one is orthogonal
    _, combined, grade = node.run(images, ref, "x", "", clip_vision)
    assert combined == pytest.approx(50.0) and grade == "F"


def test_evaluate_node_with_transformers_clip(tmp_path, monkeypatch, tiny_clip_dir):
    import json

    node = _evaluate_node(tmp_path, monkeypatch)()
    ref = _solid(0.2, 0.7, 0.4)
    report, combined, grade = node.run(ref.repeat(3, 1, 1, 1), ref, "a green square", str(tiny_clip_dir))
    s = json.loads(report)["scores"]
    assert s["preservation"] == pytest.approx(100.0, abs=1e-3) and 0 <= s["prompt_following"] <= 100
    assert combined == pytest.approx((s["preservation"] + s["prompt_following"]) / 2) and grade == s["grade"]
    assert not (tmp_path / "output").exists()  # nothing written without save_as


def test_evaluate_node_needs_a_model(tmp_path, monkeypatch):
    from ipa_train.errors import IPAKitError

    node = _evaluate_node(tmp_path, monkeypatch)()
    with pytest.raises(IPAKitError, match="no CLIP model"):
        node.run(_solid(1, 1, 1), _solid(1, 1, 1), "x", "  ")
    with pytest.raises(IPAKitError, match="not a file name"):
        node.run(_solid(1, 1, 1), _solid(1, 1, 1), "x", "", FakeClipVision(), save_as="..")
