"""Checkpoint folders: safetensors for tensors, JSON for the rest; atomic save, resume, and pruning."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..adapter.config import AdapterConfig
from ..adapter.formats import load_adapter, save_adapter
from ..adapter.modules import IPAdapter
from ..errors import TrainConfigError
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


def save_checkpoint(folder: Path, adapter: IPAdapter, optimizer: Any, scheduler: Any, engine: Engine,
                    state: LoopState, config: TrainConfig) -> Path:
    """Write a checkpoint folder atomically: built under a temporary name, then renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
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
    (tmp / STATE_JSON_FILE).write_text(json.dumps(meta))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if folder.exists():
        old = folder.parent / f".{folder.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def find_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint folder named by `config.resume` ("latest" = newest in output_dir/checkpoints)."""
    assert config.resume
    if config.resume != "latest":
        path = Path(config.resume)
    else:
        found = sorted(Path(config.output_dir, CHECKPOINTS_DIR).glob("checkpoint-*"))
        if not found:
            raise TrainConfigError(f"resume=latest: no checkpoint-* folder in {Path(config.output_dir, CHECKPOINTS_DIR)}; "
                                   "start without --resume or give a checkpoint folder")
        path = found[-1]
    if not (path / STATE_JSON_FILE).is_file():
        raise TrainConfigError(f"{path}: not a training checkpoint (no {STATE_JSON_FILE}); give a checkpoint-N folder "
                               f"written by this kit, under {Path(config.output_dir, CHECKPOINTS_DIR)}")
    return path


def load_checkpoint(path: Path, adapter: IPAdapter, optimizer: Any, scheduler: Any, engine: Engine,
                    config: TrainConfig) -> LoopState:
    """Restore adapter, optimizer, scheduler, RNG and loop state from a checkpoint folder."""
    meta = json.loads((path / STATE_JSON_FILE).read_text())
    saved = AdapterConfig.from_dict(meta["adapter_config"])
    if saved != adapter.config:
        raise TrainConfigError(f"{path}: the checkpoint holds a {saved.variant} adapter ({saved.num_tokens} tokens, "
                               f"fusion={saved.fusion}) but the options build a {adapter.config.variant} adapter "
                               f"({adapter.config.num_tokens} tokens, fusion={adapter.config.fusion}); resume with the "
                               "options of the original run")
    adapter.load_state_dict(load_adapter(path / ADAPTER_FILE).state_dict())
    tensors = load_file(str(path / STATE_TENSORS_FILE))
    _load_optimizer_state(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    engine.load_scaler_state(meta.get("scaler"))
    _set_rng_state(tensors, meta["rng"])
    logger.info("resumed from %s at step %d", path, meta["step"])
    return LoopState(int(meta["step"]), [float(x) for x in meta["losses"]])

