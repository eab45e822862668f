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
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy[key], key
    assert comfy["Icon"].endswith("docs/icon.png") and (ROOT / "docs" / "icon.png").is_file()
    assert re.fullmatch(r"[a-z0-9-]+", comfy["PublisherId"])
