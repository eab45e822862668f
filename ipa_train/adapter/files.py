"""Reading weight containers: safetensors, weights-only pickles and checkpoint folders, as one flat dict of tensors.

Pickles are only ever read with `torch.load(weights_only=True)`; every failure is one `AdapterFormatError`
naming the file and what it is instead.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import AdapterFormatError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CHECKPOINT_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "ip_adapter.safetensors", "ip_adapter.bin")


def _fail(path: str | os.PathLike, what: str) -> AdapterFormatError:
    return AdapterFormatError(f"{os.fspath(path)}: {what}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise _fail(
            path,
            f"cannot read it as safetensors ({e}). The file is truncated or not a safetensors file: "
            "download it again (a git-lfs pointer or an interrupted download looks like this).",
        ) from None
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _fail(
            path,
            "refused: this pickle contains objects other than tensors, and loading it could run code "
            f"({str(e).splitlines()[0]}). Nothing of it was executed. Use a .safetensors file, or convert "
            "the file in a trusted environment.",
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise _fail(path, f"cannot read it as a PyTorch file ({e}); it is probably truncated: download it again.") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            flat[prefix + str(k)] = v
        elif isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
    return flat


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Read every tensor of a weight file (or of a training checkpoint folder) as one flat dict."""
    p = Path(path)
    if p.is_dir():
        for name in CHECKPOINT_DIR_FILES:
            if (p / name).is_file():
                p = p / name
                break
        else:
            found = sorted(x.name for x in p.iterdir())[:10]
            raise _fail(path, f"is a folder without a weight file; expected one of {list(CHECKPOINT_DIR_FILES)}, found {found}")
    if not p.is_file():
        raise _fail(path, "no such file")
    if p.stat().st_size == 0:
        raise _fail(path, "the file is empty (0 bytes): download it again")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = _read_safetensors(p)
    elif suffix in PICKLE_SUFFIXES:
        obj = _read_pickle(p)
        for wrapper in ("state_dict", "module", "model"):
            if set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        tensors, metadata = _flatten(obj), {}
    else:
        raise _fail(path, f"unsupported extension {suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}")
    return tensors, metadata, p

