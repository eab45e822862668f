#!/usr/bin/env python3
"""Set-up and entry point for developers and CI, needing only python3 and the package registries.

    python3 scripts/dev.py test   [pytest args]   # create .venv, install CPU torch + the kit, run the default suite
    python3 scripts/dev.py test -m slow           # the slow-marked trainings that check the toy worlds' bars (CI)
    python3 scripts/dev.py demo   [demo args]     # same set-up, then run the offline demo (main job)
    python3 scripts/dev.py host   [pytest args]   # same set-up plus a ComfyUI host (scripts/host_env.py), then tests/host

The virtual environment lives in .venv; torch==2.13.0 is installed before anything that depends on torch,
so no CUDA build is pulled in. Set-up is skipped when .venv is already complete.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".ipa_kit_installed"


def _run(cmd: list[str]) -> None:
    sys.stderr.write("+ " + " ".join(cmd) + "\n")
    subprocess.run(cmd, check=True, cwd=ROOT)


def _wanted() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()


def setup() -> None:
    if STAMP.exists() and STAMP.read_text() == _wanted() and PY.exists():
        return
    if not PY.exists():
        _run([sys.executable, "-m", "venv", str(VENV)])
    _run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    _run([str(PY), "-m", "pip", "install", "-q", TORCH])
    _run([str(PY), "-m", "pip", "install", "-q", "-e", ".[test]"])
    STAMP.write_text(_wanted())


def _workers(args: list[str]) -> list[str]:
    """pytest-xdist over the cores (at most 4 workers): most tests run one thread, so two cores take about half
    the time. Left out when the caller chose (`-n`, `-p no:xdist`) or one core is all there is."""
    n = min(os.cpu_count() or 1, 4)
    chosen = any(a == "-n" or a.startswith(("-n=", "--numprocesses", "-pno:xdist")) or a == "no:xdist" for a in args)
    return [] if chosen or n < 2 else ["-n", str(n), "--dist", "worksteal"]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("test", "demo", "setup", "host"):
        sys.stderr.write(__doc__ or "")
        return 2
    if argv[0] == "host":
        import host_env

        return host_env.run_host_suite(argv[1:])
    setup()
    if argv[0] == "setup":
        return 0
    if argv[0] == "test":
        args = argv[1:]
        # The default suite leaves out the slow-marked trainings (minutes each); `-m slow` runs them, `-m ""` all.
        marks = [] if any(a.startswith("-m") for a in args) else ["-m", "not slow"]
        rc = subprocess.run([str(PY), "-m", "pytest", *_workers(args), *marks, *args], cwd=ROOT).returncode
        # pytest exits 5 when it collected no test (e.g. a -k filter matched nothing): not a failure here.
        return 0 if rc == 5 else rc
    return subprocess.run([str(PY), "-m", "ipa_train", "demo", *argv[1:]], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
