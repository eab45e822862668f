"""`ipa_train` is host-free: it imports without ComfyUI and never names the host's modules."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = ("comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "nodes", "execution")


def test_import_without_host():
    code = (
        "import sys, importlib.abc\n"
        f"HOST = {HOST_MODULES!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HOST:\n"
        "            raise ImportError('host module imported: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ipa_train, ipa_train.adapter.formats, ipa_train.adapter.attention, ipa_train.hosts.diffusers_unet, ipa_train.cli, ipa_train.adapter.layout\n"
        "import ipa_train.training.data, ipa_train.training.train, ipa_train.hosts.backbone_diffusers, ipa_train.demo, ipa_train.toy.tiny, ipa_train.plot, ipa_train.evaluation, ipa_train.evaluation.sweep\n"
        "assert not any(m.split('.')[0] in HOST for m in sys.modules)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_no_host_import_statements():
    pattern = re.compile(r"^\s*(import|from)\s+(" + "|".join(HOST_MODULES) + r")\b", re.M)
    offenders = [str(p) for p in (ROOT / "ipa_train").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
