"""Host tests: run against a real ComfyUI checkout named by COMFYUI_PATH; skipped, saying why, otherwise."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
PACK = os.environ.get("IPADAPTER_PLUS_PATH", "")
# Set by scripts/host_env.py, which builds everything the suite needs: a missing piece is then a failure.
STRICT = os.environ.get("IPAKIT_HOST_STRICT") == "1"


def missing(reason: str):
    """Skip for a part of the host environment that is absent (fail instead when the environment was built)."""
    if STRICT:
        pytest.fail(f"host environment incomplete: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    reason = None
    if not COMFYUI_PATH:
        reason = "COMFYUI_PATH is not set: host tests need a ComfyUI checkout (see README, Development)"
    elif not (Path(COMFYUI_PATH) / "comfy").is_dir():
        reason = f"COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout (no comfy/ folder)"
    for item in items:
        if "tests/host" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.host)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process on CPU."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is first imported
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd  # noqa: F401
    import utils.extra_config  # noqa: F401  (keeps ComfyUI's top-level `utils` package importable)

    return comfy


@pytest.fixture(scope="session")
def kit(comfy):
    """This repository imported as the custom-node package ComfyUI would load."""
    name = "ipadapter_kit_under_test"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cubiq(comfy):
    """The community pack (cubiq/ComfyUI_IPAdapter_plus, GPL-3.0: run as an oracle, never copied here), imported
    in-process from IPADAPTER_PLUS_PATH: (its utils module, its IPAdapterPlus module)."""
    if not PACK or not (Path(PACK) / "IPAdapterPlus.py").is_file():
        missing("IPADAPTER_PLUS_PATH does not name a ComfyUI_IPAdapter_plus checkout")
    name = "cubiq_ipadapter_plus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(PACK) / "__init__.py", submodule_search_locations=[PACK])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name + ".utils"], sys.modules[name + ".IPAdapterPlus"]


def tiny_comfy_model(comfy, family: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     manual_cast: torch.dtype | None = None):
    """A ComfyUI ModelPatcher of a UNet with SD1.5's (16) or SDXL's (70) cross-attention layout and block ids,
    tiny widths (32 channels) and the real text width (768 / 2048, which the community pack reads the family
    from), random weights (drawn in fp32, stored in `dtype`, computed in `manual_cast` when given, as ComfyUI runs
    fp8-stored weights); EPS prediction with SD1.5's schedule. No adm input, so no pooled text needed."""
    import comfy.model_base
    import comfy.supported_models

    cfg = dict(use_checkpoint=False, image_size=32, out_channels=4, in_channels=4, model_channels=32,
               use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
               adm_in_channels=None)
    if family == "sd15":
        cfg.update(num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4],
                   transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    else:
        cfg.update(num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                   transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=16,
                   transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
    config = comfy.supported_models.SD15(cfg)
    config.set_inference_dtype(dtype, manual_cast)
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the host's layers are created uninitialised
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
