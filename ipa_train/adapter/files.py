"""Reading weight containers: safetensors, weights-only pickles and checkpoint folders, as one flat dict of tensors.

Pickles are only ever read with `torch.load(weights_only=True)`; every failure is one `AdapterFormatError`
naming the file and what it is instead.
"""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import AdapterFormatError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Weight files looked for in a folder, in order: our own checkpoint-N/, then accelerate/diffusers checkpoints.
CHECKPOINT_DIR_FILES = ("adapter.safetensors", "model.safetensors", "pytorch_model.bin", "ip_adapter.safetensors",
                        "ip_adapter.bin")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _fail(path: str | os.PathLike, what: str) -> AdapterFormatError:
    return AdapterFormatError(f"{os.fspath(path)}: {what}")


def clean(text: str, limit: int = 200) -> str:
    """One printable line: terminal escape codes dropped, control characters escaped, long text cut."""
    text = _ANSI.sub("", text)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sniff(path: Path) -> str:
    """What the first bytes say the file is: safetensors, zip (PyTorch), pickle, lfs, html, text or unknown."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"version https://git-lfs"):
        return "lfs"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "html"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    return "text" if all(c.isprintable() or c in "\r\n\t" for c in text) else "unknown"


_NOT_WEIGHTS = {
    "lfs": "is a git-lfs pointer (a small text file standing in for the weights), not the weights: download the "
           "file again (`git lfs pull` in the cloned repository, or the download link on the model page)",
    "html": "is a web page, not a weights file (the download returned an HTML page, e.g. a login or error page): "
            "download the file again",
    "text": "is a text file, not a weights file: download the real .safetensors/.bin file again",
    "unknown": "is not a weights file (neither safetensors nor a PyTorch .bin/.pt); it starts with bytes {head}: "
               "download the file again",
}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt headers
        raise _fail(
            path,
            f"cannot read it as safetensors ({clean(str(e))}). The file is truncated or damaged: download it again.",
        ) from None
    return tensors, metadata


def pickle_globals(path: Path, limit: int = 200_000) -> list[str]:
    """The callables a raw pickle names (GLOBAL / STACK_GLOBAL), read statically: nothing is unpickled."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for n, (op, arg, _) in enumerate(pickletools.genops(f)):
                if n > limit:
                    break
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a damaged pickle: report what was found before the damage
        pass
    return names


_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "numpy.core.multiarray._reconstruct")


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the refusal below says enough
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        called = re.search(r"GLOBAL ([\w.]+)", str(e))
        found = [called.group(1)] if called else [g for g in pickle_globals(path) if not g.startswith(_TENSOR_GLOBALS)]
        if found:
            raise _fail(path, f"refused: this pickle would call {clean(found[0], 80)} while loading, which can run "
                              "code. Nothing of it was executed. Use the .safetensors version of this adapter.") from None
        raise _fail(path, "refused: this pickle uses instructions PyTorch's safe loader does not accept (a newer "
                          "pickle protocol or objects other than tensors). Nothing of it was executed. Use the "
                          ".safetensors version of this adapter.") from None
    except RecursionError:
        raise _fail(path, "refused: the pickle is nested too deeply to be a weights file") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError, ... for damaged files
        raise _fail(path, f"cannot read it as a PyTorch file ({type(e).__name__}: {clean(str(e), 120)}); it is "
                          "truncated or damaged: download it again.") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def _flatten(obj: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor]:
    if depth > 8:
        raise AdapterFormatError(f"nested more than 8 levels deep at {prefix!r}; not an adapter's weights")
    flat: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            flat[prefix + str(k)] = v
        elif isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}.", depth + 1))
    return flat


def _weight_file_in(folder: Path) -> Path:
    for name in CHECKPOINT_DIR_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(x.name for x in folder.iterdir())
    runs = [n for n in found if n.startswith("checkpoint-")]
    if runs:
        raise _fail(folder, f"is a folder of training checkpoints; give one of them, e.g. {folder / runs[-1]}")
    raise _fail(folder, f"is a folder without a weight file; expected one of {list(CHECKPOINT_DIR_FILES)}, "
                        f"found {found[:10]}")


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Read every tensor of a weight file (or of a training checkpoint folder) as one flat dict."""
    p = Path(path)
    if p.is_dir():
        p = _weight_file_in(p)
    if not p.is_file():
        raise _fail(path, "no such file")
    if p.stat().st_size == 0:
        raise _fail(path, "the file is empty (0 bytes): download it again")
    suffix = p.suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise _fail(path, f"unsupported extension {suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}")
    try:
        kind = sniff(p)
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from None
    if kind in _NOT_WEIGHTS:
        with open(p, "rb") as f:
            head = f.read(8)
        raise _fail(path, _NOT_WEIGHTS[kind].format(head=head.hex(" ")))
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(p)
    else:
        obj = _read_pickle(p)
        for wrapper in ("state_dict", "module", "model"):
            if set(obj) == {wrapper} and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        try:
            tensors, metadata = _flatten(obj), {}
        except AdapterFormatError as e:
            raise _fail(path, str(e)) from None
    return tensors, metadata, p


def state_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], show: int = 3) -> str:
    """How a file's tensors differ from a module's state dict (missing / unexpected keys, wrong shapes), "" if not."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys ({', '.join(missing[:show])})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:show])})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} keys with the wrong shape ({k}: {tuple(given[k].shape)}, expected "
                     f"{tuple(expected[k].shape)})")
    return "; ".join(parts)
