"""Every shipped workflow on one ComfyUI server with a half-precision UNet, in sequence and queued again with
another reference and seeds, as a GPU user runs them (ComfyUI picks fp16 or bf16 there by default).

ComfyUI keeps node outputs (the loaded adapter, the embeds) between prompts and moves patches with the model to
its dtype, so a run that changed a shared object breaks the next one; the first round runs the generation
workflows before the others, the second round runs them all again in the reverse order. On CPU, ComfyUI stores
the UNet weights in the half dtype and computes in fp32 (its manual cast): true half-precision compute is
checked in-process (`test_host_half.py`).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from .server import running_comfyui
from .workflow_api import prepare_workflow_base, run_all_twice


def _base(comfy, tmp_path):
    base = prepare_workflow_base(tmp_path, comfy)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)).save(base / "input" / "reference_b.png")
    return base


@pytest.mark.parametrize("flags, rounds", [
    (("--fp16-unet",), 2),
    (("--bf16-unet", "--fp16-text-enc"), 2),
    pytest.param(("--fp8_e4m3fn-unet",), 1, marks=pytest.mark.slow),
], ids=["fp16-unet", "bf16-unet fp16-text-enc", "fp8-unet"])
def test_every_workflow_in_sequence_and_requeued(comfy, tmp_path, flags, rounds):
    """Slow: 22 workflow runs on one server (11 for fp8), a few minutes on 2 CPU cores. (--lowvram and --novram
    change nothing on CPU, where ComfyUI disables its VRAM states: benchmarks/gpu_workflows.py takes them on a GPU.)"""
    base = _base(comfy, tmp_path)
    with running_comfyui(base, flags) as url:
        failures = run_all_twice(url, base, "reference_b.png", rounds=rounds, light=True)
    assert not failures, "\n".join(failures)

