"""Checkpoint folders: safetensors for tensors, JSON for the rest; atomic save, resume, and pruning."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..adapter.config import AdapterConfig
from ..adapter.dit_formats import DitConfig
from ..adapter.formats import load_adapter, save_adapter
from ..adapter.modules import IPAdapter
from ..errors import TrainConfigError
from ..outputs import OutputError, file_mode, is_disk_full
from .config import TrainConfig
from .engine import Engine

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
STATE_TENSORS_FILE = "training_state.safetensors"
STATE_JSON_FILE = "training_state.json"

# Checkpoints: safetensors for tensors, JSON for the rest


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_state(optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(optimizer: Any, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            per_param.setdefault(int(pid), {})[name] = t
    for pid, values in state["scalars"].items():
        per_param.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


@dataclass
class LoopState:
    """Progress saved in checkpoints."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


_NAME = re.compile(r"^checkpoint-(\d+)(?:\.(\d+))?$")


def checkpoint_key(path: Path) -> tuple[int, int] | None:
    """(step, revision) of a `checkpoint-N` or `checkpoint-N.R` folder name, None for other names."""
    m = _NAME.match(path.name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def list_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoint folders in `folder`, oldest first (by step, then revision)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_key(p) is not None and (p / STATE_JSON_FILE).is_file()]
    return sorted(found, key=lambda p: checkpoint_key(p))  # type: ignore[arg-type, return-value]


def remove_leftovers(folder: Path) -> None:
    """Remove temporary folders of interrupted saves (`.checkpoint-N.tmp`, `.checkpoint-N.old`)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".checkpoint-") and p.name.endswith((".tmp", ".old")):
                shutil.rmtree(p, ignore_errors=True)
                logger.info("removed %s, left by an interrupted checkpoint save", p)


def _free_name(folder: Path) -> Path:
    """`folder`, or `folder.R` with the next revision when a checkpoint of this step exists (a re-save)."""
    key = checkpoint_key(folder)
    taken = [k[1] for p in folder.parent.iterdir() if (k := checkpoint_key(p)) is not None and key is not None
             and k[0] == key[0]]
    if not taken and not folder.exists():
        return folder
    return folder.with_name(f"{folder.name}.{max(taken, default=0) + 1}")


def _write_checkpoint(tmp: Path, adapter: IPAdapter, optimizer: Any, scheduler: Any, engine: Engine,
                      state: LoopState, config: TrainConfig) -> None:
    tmp.mkdir()
    tensors, opt_state = _optimizer_state(optimizer)
    rng_tensors, rng_state = _rng_state()
    save_adapter(adapter, tmp / ADAPTER_FILE, {"ipa_kit.train_step": str(state.step)})
    save_file({**tensors, **rng_tensors}, str(tmp / STATE_TENSORS_FILE))
    meta = {
        "format": 1, "step": state.step, "losses": state.losses, "config": config.to_dict(),
        "adapter_config": adapter.config.to_dict(), "optimizer": opt_state,
        "scheduler": _json_safe(scheduler.state_dict()), "rng": rng_state, "scaler": engine.scaler_state(),
    }
    (tmp / STATE_JSON_FILE).write_text(json.dumps(meta))  # written last: its presence marks a complete folder
    for f in tmp.iterdir():
        os.chmod(f, file_mode())
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(folder: Path, adapter: IPAdapter, optimizer: Any, scheduler: Any, engine: Engine,
                    state: LoopState, config: TrainConfig) -> Path:
    """Write a checkpoint folder atomically: built under a hidden temporary name, then renamed once into place.

    A checkpoint of the same step that already exists is never replaced in place: the new one gets the next
    revision (`checkpoint-N.1`) and the older one is removed only after the new one is complete, so a crash at
    any point leaves a complete visible checkpoint. Afterwards only the newest `config.keep_checkpoints` remain.

    Raises:
        OutputError: the disk filled up; the temporary folder is removed and older checkpoints are kept.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    target = _free_name(folder)
    tmp = folder.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_checkpoint(tmp, adapter, optimizer, scheduler, engine, state, config)
        os.replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e) or isinstance(e, OutputError):
            kept = list_checkpoints(folder.parent)
            raise OutputError(f"the disk is full: writing checkpoint {target} at step {state.step} failed; "
                              f"{'the last complete checkpoint ' + str(kept[-1]) + ' is kept' if kept else 'no checkpoint was written'}."
                              " Free some space, then resume with --resume latest") from None
        raise
    for old in list_checkpoints(folder.parent):
        if old != target and (checkpoint_key(old) or (0, 0))[0] == state.step:
            shutil.rmtree(old, ignore_errors=True)  # an older save of the same step, superseded
    prune_checkpoints(folder.parent, config.keep_checkpoints)
    return target


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` checkpoints (0 keeps all); returns the removed folders."""
    found = list_checkpoints(folder)
    removed = found[:-keep] if keep > 0 else []
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    if removed:
        logger.info("removed %d older checkpoint(s) (--keep-checkpoints %d): %s", len(removed), keep,
                    ", ".join(p.name for p in removed))
    return removed


def find_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint folder named by `config.resume` ("latest" = newest in output_dir/checkpoints)."""
    assert config.resume
    where = Path(config.output_dir, CHECKPOINTS_DIR)
    if config.resume != "latest":
        path = Path(config.resume)
    else:
        found = list_checkpoints(where)
        if not found:
            raise TrainConfigError(f"resume=latest: no checkpoint-* folder in {where}; start without --resume or give "
                                   "a checkpoint folder")
        path = found[-1]
    if not (path / STATE_JSON_FILE).is_file():
        raise TrainConfigError(f"{path}: not a training checkpoint (no {STATE_JSON_FILE}); give a checkpoint-N folder "
                               f"written by this kit, under {where}")
    return path


def _saved_config(d: dict[str, Any]) -> Any:
    """The adapter config a checkpoint recorded: a DiT layout's (it names a format) or a UNet adapter's."""
    if "format" in d and "hidden_size" in d:
        fields = {f.name for f in dataclasses.fields(DitConfig)}
        return DitConfig(**{k: v for k, v in d.items() if k in fields})
    return AdapterConfig.from_dict(d)


def load_checkpoint(path: Path, adapter: IPAdapter, optimizer: Any, scheduler: Any, engine: Engine,
                    config: TrainConfig) -> LoopState:
    """Restore adapter, optimizer, scheduler, RNG and loop state from a checkpoint folder."""
    meta = json.loads((path / STATE_JSON_FILE).read_text())
    saved = _saved_config(meta["adapter_config"])
    if saved != adapter.config:
        raise TrainConfigError(f"{path}: the checkpoint holds a {saved.variant} adapter ({saved.num_tokens} tokens, "
                               f"fusion={saved.fusion}) but the options build a {adapter.config.variant} adapter "
                               f"({adapter.config.num_tokens} tokens, fusion={adapter.config.fusion}); resume with the "
                               "options of the original run")
    saved_adapter = load_adapter(path / ADAPTER_FILE)
    adapter.load_state_dict(saved_adapter.state_dict())  # DiT: the same block order, whatever the file's split
    with torch.no_grad():
        for k, p in adapter.lora.items():  # FaceID: the LoRA being trained (live parameters under official keys)
            p.copy_(saved_adapter.lora[k])
    tensors = load_file(str(path / STATE_TENSORS_FILE))
    _load_optimizer_state(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    engine.load_scaler_state(meta.get("scaler"))
    _set_rng_state(tensors, meta["rng"])
    logger.info("resumed from %s at step %d", path, meta["step"])
    return LoopState(int(meta["step"]), [float(x) for x in meta["losses"]])

