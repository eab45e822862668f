"""Start a real ComfyUI with this pack on a loopback port, in a throw-away base directory."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import COMFYUI_PATH, ROOT

PACK = "ComfyUI-IPAdapter-Kit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def combo_options(decl: list) -> list:
    """Options of a combo input as /object_info serves it: V1 `[[...], {...}]` or V3 `["COMBO", {"options": [...]}]`."""
    return decl[1]["options"] if decl[0] == "COMBO" else decl[0]


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def prepare_base(base: Path, models: dict[str, Path], reference_name: str = "ref.png",
                 extra_nodes: dict[str, str] | None = None, browser: bool = False) -> Path:
    """models/<folder>/<file> symlinks, our pack (and test-only packs) in custom_nodes, a reference image."""
    for folder, path in models.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / path.name).symlink_to(path)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(ROOT, target_is_directory=True)
    for name, source in (extra_nodes or {}).items():
        (base / "custom_nodes" / name).mkdir()
        (base / "custom_nodes" / name / "__init__.py").write_text(source)
    (base / "input").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(base / "input" / reference_name)
    if browser:  # no first-run dialogs over the canvas; the classic canvas nodes our extensions draw on
        (base / "user" / "default").mkdir(parents=True)
        (base / "user" / "default" / "comfy.settings.json").write_text(
            '{"Comfy.TutorialCompleted": true, "Comfy.VueNodes.Enabled": false}')
    return base


def write_dataset(folder: Path, count: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    """A new folder of `count` random RGB images (`size` = width, height) with same-name .txt captions."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a random picture number {i}")
    return folder


@contextlib.contextmanager
def running_comfyui(base: Path, extra_args: Sequence[str] = (), cpu: bool = True, comfyui: str | Path = "",
                    log_name: str = "server.log") -> Iterator[str]:
    """ComfyUI serving `base` (on CPU unless `cpu` is False); yields its URL and stops it afterwards.

    extra_args: more command-line flags, e.g. ("--fp16-unet",) or ("--lowvram",); comfyui: the checkout
    (COMFYUI_PATH by default)."""
    port = free_port()
    log = open(base / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port", str(port),
         "--disable-auto-launch", "--base-directory", str(base), *extra_args],
        cwd=str(comfyui or COMFYUI_PATH), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail("ComfyUI exited at start:\n" + (base / log_name).read_text()[-3000:])
            try:
                get(url + "/system_stats")
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("ComfyUI did not start in 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
