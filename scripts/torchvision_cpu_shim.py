"""Start-up hook for a CPU-only host environment: lets the torchvision wheel that matches torch 2.13.0 (a CUDA
build) import next to CPU torch.

That wheel's compiled ops library does not load on CPU torch, and `import torchvision` then fails while it
registers fake kernels for `torchvision::nms` / `torchvision::qnms`, ops that were never defined. Just before the
first `import torchvision`, this hook tries the real library and, only when it cannot load, defines the two
op schemas (without kernels). The pure-Python parts of torchvision then work; its compiled ops raise if called,
and nothing on ComfyUI's SD/Flux/SD3 paths calls them. scripts/host_env.py installs it with a `.pth` file.
"""

import importlib.abc
import importlib.machinery
import logging
import os
import sys


class _OpsSchemaHook(importlib.abc.MetaPathFinder):
    armed = True
    library = None  # keeps the torch.library fragment alive

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision" or not _OpsSchemaHook.armed:
            return None
        _OpsSchemaHook.armed = False
        try:
            import torch

            spec = importlib.machinery.PathFinder.find_spec("torchvision")
            if spec is None or not spec.submodule_search_locations:
                return None
            try:
                torch.ops.load_library(os.path.join(next(iter(spec.submodule_search_locations)), "_C.so"))
                return None  # the compiled ops load: nothing to do
            except Exception:
                pass
            lib = torch.library.Library("torchvision", "FRAGMENT")
            for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                           "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
                lib.define(schema)
            _OpsSchemaHook.library = lib
        except Exception as e:  # never block the real import
            logging.getLogger(__name__).warning("torchvision CPU shim not applied: %r", e)
        return None


sys.meta_path.insert(0, _OpsSchemaHook())
