"""scripts/host_env.py without building anything: the requirement filter, the writable copy, the tree lookup."""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def host_env():
    spec = importlib.util.spec_from_file_location("ipakit_host_env", ROOT / "scripts" / "host_env.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_requirements_drop_torch_family(tmp_path, host_env):
    (tmp_path / "requirements.txt").write_text(
        "comfyui-frontend-package==1.35.9\ntorch\ntorchvision>=0.20\n torchaudio ; sys_platform=='linux'\n"
        "#non essential\nkornia>=0.7.1  # comment\nnumpy>=1.25.0\n\n")
    assert host_env._requirements(tmp_path) == ["comfyui-frontend-package==1.35.9", "kornia>=0.7.1", "numpy>=1.25.0"]


def test_copy_of_read_only_tree_is_writable_and_recopied(tmp_path, host_env):
    src = tmp_path / "src"
    (src / "comfy").mkdir(parents=True)
    (src / "main.py").write_text("x = 1\n")
    (src / "comfy" / "a.py").write_text("y = 2\n")
    for p in [src / "main.py", src / "comfy" / "a.py", src / "comfy", src]:
        p.chmod(stat.S_IRUSR | stat.S_IXUSR if p.is_dir() else stat.S_IRUSR)
    try:
        dst = tmp_path / "dst"
        host_env._copy_tree(src, dst)
        (dst / "output").mkdir()  # ComfyUI writes next to main.py
        (dst / "comfy" / "a.py").write_text("changed")
        host_env._copy_tree(src, dst)  # a second copy replaces the first, read-only or not
        assert (dst / "comfy" / "a.py").read_text() == "y = 2\n"
        assert not (dst / "output").exists()
    finally:
        for p in [src, src / "comfy", src / "main.py", src / "comfy" / "a.py"]:
            p.chmod(0o755 if p.is_dir() else 0o644)


def test_locate_names_what_is_missing(tmp_path, host_env, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(host_env.HostEnvError, match="no ComfyUI tree at .*COMFYUI_PATH"):
        host_env.locate(tmp_path)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(host_env.HostEnvError, match="not a ComfyUI checkout"):
        host_env.locate()
