"""Packaging for ComfyUI-Manager / the Comfy Registry: metadata complete, requirements.txt in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ipa_train

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower()


def test_requirements_txt_matches_pyproject():
    deps = _pyproject()["project"]["dependencies"]
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [ln for ln in lines if ln and not ln.startswith("#")]
    assert sorted(reqs) == sorted(deps)
    assert "torch" not in {_name(d) for d in deps}  # the host's torch is never pulled in


def test_registry_metadata_complete():
    project = _pyproject()["project"]
    comfy = _pyproject()["tool"]["comfy"]
    assert project["version"] == ipa_train.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["license"] == "MIT" and all((ROOT / f).is_file() for f in project["license-files"])
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    assert project["urls"]["Repository"].startswith("https://github.com/")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy[key], key
    assert comfy["Icon"].endswith("docs/icon.png") and (ROOT / "docs" / "icon.png").is_file()
    assert re.fullmatch(r"[a-z0-9-]+", comfy["PublisherId"])


@pytest.mark.slow
def test_wheel_builds_without_setuptools_warnings(tmp_path):
    """The Registry and pip build the pack from pyproject.toml: no deprecation or configuration warnings."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "Warning" not in out and "!!" not in out, out[-3000:]
    wheel = next(tmp_path.glob("*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for module in ("ipa_train/adapter/formats.py", "ipa_train/training/train.py", "ipa_train/demo_data/astronaut.jpg"):
        assert module in names, module
