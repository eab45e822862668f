#!/usr/bin/env python3
"""Build the environment the host tests run in, and run them (needs only python3 and the package registries).

    python3 scripts/dev.py host [pytest args]        # set-up, then the host suite (tests/host)
    python3 scripts/host_env.py [--trees DIR]        # set-up only; prints the COMFYUI_PATH to use

Where the trees come from, first match wins:
- COMFYUI_PATH (and IPADAPTER_PLUS_PATH, IPAKIT_PEERS_PATH) name a user's own checkouts: used in place;
- otherwise `--trees DIR` or IPAKIT_HOST_TREES, default `../shared/host` beside this repository: ComfyUI,
  ComfyUI_IPAdapter_plus and peers/, copied to `.host/` in this repository first (the source may be read-only;
  ComfyUI writes next to its main.py).

Into the project's `.venv` (made by scripts/dev.py, torch==2.13.0 first) it installs ComfyUI's requirements
without torch/torchvision/torchaudio under a constraint that keeps torch, `requests` (imported by ComfyUI, not
listed), torchvision 0.28.0 without its dependencies plus a start-up hook that lets that CUDA-only wheel import
on CPU torch, `playwright` (its API only, to drive the system Chromium), and Chromium itself through apt-get
where it is missing and this runs as root. Set-up is skipped when the stamp in `.venv` matches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import dev  # noqa: E402  (scripts/dev.py: the project's .venv)

HOST_DIR = ROOT / ".host"
STAMP = dev.VENV / ".ipa_kit_host_installed"
TORCHVISION = "torchvision==0.28.0"
# Packages the host tests need beyond ComfyUI's list: `requests` (ComfyUI imports it), playwright (browser
# tests), and what the peers import at start.
EXTRA = ["requests", "playwright", "einops", "opencv-python-headless", "sentencepiece"]
SKIP_REQ = ("torch", "torchvision", "torchaudio")
SHIM = "ipakit_torchvision_cpu_shim"


class HostEnvError(RuntimeError):
    """A set-up step that cannot be done here; the message says what is missing and how to fix it."""


def log(msg: str) -> None:
    sys.stderr.write(f"[host-env] {msg}\n")


def default_trees() -> Path:
    return Path(os.environ.get("IPAKIT_HOST_TREES") or ROOT.parent / "shared" / "host")


def _copy_tree(src: Path, dst: Path) -> None:
    """A writable copy of a (possibly read-only) tree: the mode bits are not copied."""
    if dst.exists():
        for p in [dst, *dst.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o700)
        shutil.rmtree(dst)
    shutil.copytree(src, dst, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns("__pycache__"))
    for p in [dst, *dst.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | (0o700 if p.is_dir() else 0o600))


def _tree_digest(path: Path) -> str:
    """Cheap identity of a tree: names, sizes and modification times of its files."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            st = p.stat()
            h.update(f"{p.relative_to(path)}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


def locate(trees: Path | None = None) -> dict[str, Path]:
    """Paths the host tests use: comfyui, ipadapter_plus (optional), peers (optional). Copies shared trees."""
    if os.environ.get("COMFYUI_PATH"):
        out = {"comfyui": Path(os.environ["COMFYUI_PATH"]).expanduser()}
        for key, var in (("ipadapter_plus", "IPADAPTER_PLUS_PATH"), ("peers", "IPAKIT_PEERS_PATH")):
            if os.environ.get(var):
                out[key] = Path(os.environ[var]).expanduser()
        if not (out["comfyui"] / "comfy").is_dir():
            raise HostEnvError(f"COMFYUI_PATH={out['comfyui']} is not a ComfyUI checkout (no comfy/ folder): "
                               "point it at the folder that holds ComfyUI's main.py")
        return out
    src = Path(trees or default_trees())
    if not (src / "ComfyUI" / "comfy").is_dir():
        raise HostEnvError(f"no ComfyUI tree at {src / 'ComfyUI'}: set COMFYUI_PATH to your ComfyUI checkout, "
                           "or IPAKIT_HOST_TREES (--trees) to a folder holding ComfyUI/ and ComfyUI_IPAdapter_plus/")
    HOST_DIR.mkdir(exist_ok=True)
    out = {}
    for key, name in (("comfyui", "ComfyUI"), ("ipadapter_plus", "ComfyUI_IPAdapter_plus"), ("peers", "peers")):
        if not (src / name).is_dir():
            continue
        dst, stamp = HOST_DIR / name, HOST_DIR / f".{name}.copied"
        digest = _tree_digest(src / name)
        if not (dst.is_dir() and stamp.is_file() and stamp.read_text() == digest):
            log(f"copying {src / name} to {dst}")
            _copy_tree(src / name, dst)
            stamp.write_text(digest)
        out[key] = dst
    return out


def _requirements(comfyui: Path) -> list[str]:
    reqs = []
    for line in (comfyui / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name = line.split(";")[0].replace(" ", "")
        for sep in "<>=~!":
            name = name.split(sep)[0]
        if line and name.lower() not in SKIP_REQ:
            reqs.append(line)
    return reqs


def find_chromium() -> str | None:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and os.access(path, os.X_OK) else None


def _install_chromium() -> None:
    if find_chromium():
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        raise HostEnvError("Chromium is missing for the browser tests: install it (Debian: apt-get install chromium) "
                           "or set CHROMIUM_PATH to a Chromium executable")
    log("installing Chromium (apt-get install chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)
    if done.returncode != 0 or not find_chromium():
        raise HostEnvError("apt-get install chromium failed: install Chromium by hand or set CHROMIUM_PATH")


def _site_packages() -> Path:
    out = subprocess.run([str(dev.PY), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    return Path(out)


def _install_shim() -> None:
    """The start-up hook that lets the CUDA-only torchvision wheel import on CPU torch (see its docstring)."""
    site = _site_packages()
    shutil.copyfile(ROOT / "scripts" / "torchvision_cpu_shim.py", site / f"{SHIM}.py")
    (site / f"zz_{SHIM}.pth").write_text(f"import {SHIM}\n")


def _wanted(paths: dict[str, Path]) -> str:
    h = hashlib.sha256((paths["comfyui"] / "requirements.txt").read_bytes())
    h.update((" ".join(EXTRA) + TORCHVISION + dev.TORCH).encode())
    h.update(Path(__file__).read_bytes())
    h.update(dev.STAMP.read_text().encode() if dev.STAMP.exists() else b"")
    return h.hexdigest()


def setup(trees: Path | None = None) -> dict[str, Path]:
    """Everything the host suite needs; returns the tree paths. Raises HostEnvError with the fix."""
    dev.setup()
    paths = locate(trees)
    if STAMP.exists() and STAMP.read_text() == _wanted(paths) and find_chromium():
        return paths
    py = str(dev.PY)
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(dev.TORCH + "\n")
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(_requirements(paths["comfyui"]) + EXTRA) + "\n")
        try:
            dev._run([py, "-m", "pip", "install", "-q", "-r", str(reqs), "-c", str(constraints)])
            dev._run([py, "-m", "pip", "install", "-q", "--no-deps", TORCHVISION])
        except subprocess.CalledProcessError as e:
            raise HostEnvError(f"installing the host's Python packages failed ({' '.join(e.cmd[3:6])} ...): "
                               "see pip's message above") from None
    _install_shim()
    _install_chromium()
    check = subprocess.run([py, "-c", "import torch, torchvision, aiohttp, playwright; print(torch.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0 or not check.stdout.startswith("2.13.0"):
        raise HostEnvError(f"the host environment does not import: {check.stderr.strip().splitlines()[-1:]}")
    STAMP.write_text(_wanted(paths))
    return paths


def env_for(paths: dict[str, Path]) -> dict[str, str]:
    env = dict(os.environ, COMFYUI_PATH=str(paths["comfyui"]), IPAKIT_HOST_STRICT="1")
    if "ipadapter_plus" in paths:
        env["IPADAPTER_PLUS_PATH"] = str(paths["ipadapter_plus"])
    if "peers" in paths:
        env["IPAKIT_PEERS_PATH"] = str(paths["peers"])
    chromium = find_chromium()
    if chromium:
        env["CHROMIUM_PATH"] = chromium
    return env


def run_host_suite(args: list[str], trees: Path | None = None) -> int:
    try:
        paths = setup(trees)
    except HostEnvError as e:
        log(f"error: {e}")
        return 3
    cmd = [str(dev.PY), "-m", "pytest", "tests/host", *args]
    log(f"COMFYUI_PATH={paths['comfyui']} " + " ".join(cmd))
    rc = subprocess.run(cmd, cwd=ROOT, env=env_for(paths)).returncode
    return 0 if rc == 5 else rc


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", type=Path, default=None, help="folder holding ComfyUI/ and the packs")
    args = parser.parse_args(argv)
    try:
        paths = setup(args.trees)
    except HostEnvError as e:
        log(f"error: {e}")
        return 3
    for key, value in env_for(paths).items():
        if key in ("COMFYUI_PATH", "IPADAPTER_PLUS_PATH", "IPAKIT_PEERS_PATH", "CHROMIUM_PATH"):
            sys.stdout.write(f"{key}={value}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
