"""`python -m ipa_train inspect` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .factories import OFFICIAL, write_official

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipa_train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plus_sdxl(tmp_path_factory):
    o = next(o for o in OFFICIAL if o.name == "ip-adapter-plus_sdxl_vit-h")
    path = tmp_path_factory.mktemp("cli") / "ip-adapter-plus_sdxl_vit-h.safetensors"
    groups = write_official(o, path, "safetensors")
    return path, sum(t.numel() for g in groups.values() for t in g.values())


def test_inspect_json(plus_sdxl):
    path, n = plus_sdxl
    r = run_cli("inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    expected = {
        "family": "sdxl", "projection": "plus", "num_tokens": 16, "clip_embedding_dim": 1280,
        "clip_output": "penultimate", "encoder": "ViT-H/14", "cross_attention_layers": 70,
        "parameters": n, "fusion": False,
    }
    assert {k: info[k] for k in expected} == expected


def test_inspect_text(plus_sdxl):
    path, _ = plus_sdxl
    r = run_cli("inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "ViT-H/14" in r.stdout and "sdxl" in r.stdout and "70" in r.stdout


def test_inspect_bad_file_one_line_no_traceback(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = run_cli("inspect", str(bad), "--json")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken.safetensors" in lines[0]
    assert r.stdout == ""
