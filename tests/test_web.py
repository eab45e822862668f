"""The frontend extensions (web/js) without a browser: present, valid JavaScript, wired to the right names.

The browser check against a running ComfyUI is tests/host/test_host_web.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urljoin

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "web" / "js"
FEATURES = {"loader_info.js": "ipadapter_kit.loader_info", "training_loss.js": "ipadapter_kit.training_loss"}
# ComfyUI serves WEB_DIRECTORY under /extensions/<pack folder>/ and loads every .js file in it.
SERVED_AT = "http://host/extensions/ComfyUI-IPAdapter-Kit/"


def _imports(text: str) -> list[str]:
    return re.findall(r'^import\s+[^;]*?from\s+"([^"]+)";', text, flags=re.M)


def test_web_directory_matches_the_pack():
    init = (ROOT / "__init__.py").read_text()
    assert re.search(r'^WEB_DIRECTORY = "\./web"$', init, flags=re.M)
    assert sorted(p.name for p in JS.glob("*.js")) == sorted([*FEATURES, "common.js"])


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_each_feature_registers_one_namespaced_extension(name):
    text = (JS / name).read_text()
    assert re.findall(r'app\.registerExtension\(\{\s*name:\s*"([^"]+)"', text) == [FEATURES[name]]
    assert re.findall(r'name:\s*"(ipadapter_kit\.[^"]+)"', text) == [FEATURES[name]]


@pytest.mark.parametrize("name", sorted([*FEATURES, "common.js"]))
def test_imports_resolve_where_comfyui_serves_them(name):
    """`../../../scripts/app.js` from /extensions/<pack>/js/ must land on the frontend's /scripts/ shims."""
    url = urljoin(SERVED_AT, f"js/{name}")
    for spec in _imports((JS / name).read_text()):
        target = urljoin(url, spec)
        if spec.startswith("./"):
            assert (JS / spec[2:]).is_file(), spec
        else:
            assert target in ("http://host/scripts/app.js", "http://host/scripts/api.js"), (spec, target)


def test_training_extension_listens_to_the_server_event():
    text = (JS / "training_loss.js").read_text()
    assert 'api.addEventListener("ipakit.training"' in text
    assert "setDirtyCanvas(true" in text and "onDrawForeground" in text
    assert '"IPAKitTrain"' in text


def test_loader_extension_reads_the_node_ui_output():
    text = (JS / "loader_info.js").read_text()
    assert 'const NODE_TYPE = "IPAKitLoadAdapter"' in text and "message?.ipakit_info?.[0]" in text
    loader = (ROOT / "nodes" / "loaders.py").read_text()
    assert "class IPAKitLoadAdapter" in loader and 'ui={"ipakit_info": [info]}' in loader  # V3: NodeOutput(..., ui=...)
    for key in ("variant", "family", "encoder", "num_tokens", "fusion", "clip_output", "cross_attention_layers", "parameters"):
        assert f"info.{key}" in text, key


@pytest.mark.parametrize("name", sorted([*FEATURES, "common.js"]))
def test_valid_module_syntax(name, tmp_path):
    node = shutil.which("node")
    if not node:
        pytest.skip("node (Node.js) is not installed: JavaScript syntax not checked")
    module = tmp_path / (Path(name).stem + ".mjs")  # .mjs: parsed as an ES module whatever the Node version
    module.write_text((JS / name).read_text())
    r = subprocess.run([node, "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
