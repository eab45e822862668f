#!/usr/bin/env python3
"""Every shipped workflow on a real ComfyUI, twice in sequence, as a GPU user runs them.

Starts ComfyUI (on CUDA with its default dtypes unless --cpu or --flags say otherwise) on a throw-away base folder
with this pack and the random-weight stand-ins the host tests use (an SD1.5-architecture checkpoint, a CLIP
ViT-L/14 vision model, a plain adapter, FaceID files, small Flux and SD3.5 models with their text encoders, SigLIP and
adapters; written once to ~/.cache/ipakit-host-models), converts each
workflows/*.json to the API prompt the frontend would queue, and runs them all: the generation workflows first,
then the others, then all again in reverse order with another reference image and other seeds (a queued-again
prompt with ComfyUI's cached adapter). Prints one line per run and exits 1 if any failed.

    python benchmarks/gpu_workflows.py --comfyui PATH_TO_ComfyUI            # CUDA, ComfyUI's default dtypes
    python benchmarks/gpu_workflows.py --comfyui PATH --flags="--fp16-unet --lowvram"
    python benchmarks/gpu_workflows.py --comfyui PATH --cpu                 # the same on CPU (slow, 64 px)

Needs ComfyUI's requirements, diffusers and transformers (for the stand-in models) and pytest (the host-test
helpers it reuses, tests/host/). No browser: tests/host/test_host_workflows.py checks that the conversion used
here gives the frontend's prompts.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True, help="a ComfyUI checkout (the folder with main.py)")
    p.add_argument("--cpu", action="store_true", help="run ComfyUI with --cpu (default: its own device choice)")
    p.add_argument("--flags", default="", help='more ComfyUI flags, e.g. "--fp16-unet --lowvram"')
    p.add_argument("--size", type=int, default=None, help="latent size in pixels (default 512 on a GPU, 64 with --cpu)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20 on a GPU, 2 with --cpu)")
    p.add_argument("--base", default="", help="ComfyUI base folder to use and keep (default: a temporary one)")
    return p.parse_args(argv)


def boot(comfyui: Path):
    """ComfyUI's `comfy` package importable here (on CPU: this process only writes the stand-in files)."""
    os.environ["COMFYUI_PATH"] = str(comfyui)  # read by tests/host/conftest.py at import
    sys.path[:0] = [str(ROOT), str(comfyui)]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.utils  # noqa: F401

    return comfy


def server_facts(log: Path) -> list[str]:
    """The lines of ComfyUI's log that say where and in which dtypes it ran."""
    keep = re.compile(r"^(Device:|Set vram state|model weight dtype|Using .* attention|pytorch version|"
                      r"Total VRAM|.*loaded (completely|partially))")
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    seen, out = set(), []
    for line in lines:
        if keep.match(line) and line not in seen:
            seen.add(line)
            out.append(line)
    return out[:20]


def main(argv=None) -> int:
    args = parse_args(argv)
    comfyui = Path(args.comfyui).resolve()
    if not (comfyui / "main.py").is_file():
        print(f"--comfyui {args.comfyui}: no main.py there; give the ComfyUI checkout folder", file=sys.stderr)
        return 2
    size = args.size or (64 if args.cpu else 512)
    steps = args.steps or (2 if args.cpu else 20)
    comfy = boot(comfyui)

    import numpy as np
    from PIL import Image

    from tests.host.server import running_comfyui
    from tests.host.workflow_api import prepare_workflow_base, run_all_twice

    base = Path(args.base).resolve() if args.base else Path(tempfile.mkdtemp(prefix="ipakit_gpu_workflows_"))
    if not (base / "custom_nodes").exists():
        base.mkdir(parents=True, exist_ok=True)
        prepare_workflow_base(base, comfy)
        rng = np.random.default_rng(1)
        Image.fromarray(rng.integers(0, 255, (640, 480, 3), dtype=np.uint8)).save(base / "input" / "reference_b.png")
    flags = shlex.split(args.flags)
    print(f"ComfyUI {comfyui} flags: {'--cpu ' if args.cpu else ''}{' '.join(flags)}; base {base}; "
          f"{size} px, {steps} steps", flush=True)

    def report(name: str, round_no: int, error: str, seconds: float) -> None:
        status = "ok" if not error else "error: " + error.splitlines()[0][:300]
        print(f"{name:40s} round {round_no}  {status:8s}  {seconds:7.1f} s", flush=True)

    # a SIGTERM (a timeout) unwinds like Ctrl-C, so the server is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.perf_counter()
    with running_comfyui(base, flags, cpu=args.cpu, comfyui=comfyui, log_name="gpu_workflows_server.log") as url:
        failures = run_all_twice(url, base, "reference_b.png", size, steps, report)
    for line in server_facts(base / "gpu_workflows_server.log"):
        print("server: " + line)
    print(f"{len(failures)} of {2 * len(list((ROOT / 'workflows').glob('*.json')))} runs failed; "
          f"{time.perf_counter() - start:.0f} s in all; server log: {base / 'gpu_workflows_server.log'}")
    for f in failures:
        print("FAILED " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
