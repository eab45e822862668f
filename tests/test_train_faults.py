"""Training faults: divergence, full disks, unusable output folders, checkpoint re-saves, pruning, file modes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from ipa_train import load_adapter
from ipa_train.errors import TrainConfigError
from ipa_train.hosts.backbone_diffusers import DiffusersBackbone
from ipa_train.outputs import OutputError, file_mode
from ipa_train.training import checkpoints as ckpt_mod
from ipa_train.training import train as train_mod
from ipa_train.training.checkpoints import LoopState, list_checkpoints, save_checkpoint
from ipa_train.training.data import load_dataset
from ipa_train.training.train import Engine, TrainConfig, TrainingDiverged, sample_indices, train

from .factories import OFFICIAL, official_config, random_adapter

ROOT = Path(__file__).resolve().parent.parent
RES = 32


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(ROOT / "ipa_train" / "demo_data", resolution=RES)


def _config(tmp_path, **kw) -> TrainConfig:
    base = {"output_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 2, "lr": 1e-3, "resolution": RES,
            "save_every": 0, "log_every": 0}
    return TrainConfig(**{**base, **kw})


def _backbone(dirs) -> DiffusersBackbone:
    return DiffusersBackbone(dirs[0], dirs[1], device="cpu")


@pytest.mark.parametrize("bad, message", [
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"lr": float("nan")}, "lr must be a finite number"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number"),
    ({"seed": -1}, "seed must be a whole number from 0 to 18446744073709551615"),
    ({"seed": 2**64}, "seed must be a whole number"),
    ({"keep_checkpoints": -1}, "keep_checkpoints must be"),
    ({"name": ".hidden"}, "must be a plain file name"),
    ({"name": "../up"}, "must be a plain file name"),
    ({"name": "a\nb"}, "must be a plain file name"),
    ({"name": "  "}, "must be a plain file name"),
])
def test_options_that_cannot_train_are_refused(bad, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**bad)


def test_names_are_normalised_and_the_whole_seed_range_works():
    assert TrainConfig(name=" my-adapter.safetensors ").name == "my-adapter"
    assert TrainConfig(name="v1.2").name == "v1.2"
    big = sample_indices(5, 2, 3, 2**64 - 1)
    assert len(big) == 2 and big == sample_indices(5, 2, 3, 2**64 - 1)
    assert sample_indices(5, 5, 0, 7) == sample_indices(5, 5, 0, 7 + 0)  # unchanged for ordinary seeds


def test_nan_inducing_learning_rate_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dirs, dataset):
    cfg = _config(tmp_path, lr=1e30, steps=6, save_every=1)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, _backbone(tiny_model_dirs), dataset)
    text = str(e.value)
    assert "training diverged at step" in text and "Lower --lr (now 1e+30)" in text and "\n" not in text
    out = tmp_path / "run"
    assert not (out / "ip-adapter.safetensors").exists()  # no NaN adapter as the result
    kept = list_checkpoints(out / "checkpoints")
    assert kept and str(kept[-1]) in text
    for folder in kept:
        assert all(torch.isfinite(v).all() for v in load_adapter(folder).state_dict().values())
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_unusable_output_folder_fails_before_any_work(tmp_path, tiny_model_dirs, dataset, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "Conditioning", no_work)
    backbone = _backbone(tiny_model_dirs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"output folder .*file.* is a file, not a folder"):
        train(_config(tmp_path, output_dir=str(tmp_path / "file" / "run")), backbone, dataset)
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / "ip-adapter.safetensors").mkdir()
    with pytest.raises(OutputError, match=r"adapter file .*ip-adapter\.safetensors.* is a folder"):
        train(_config(tmp_path, output_dir=str(tmp_path / "run2")), backbone, dataset)
    monkeypatch.setattr("ipa_train.outputs.free_bytes", lambda path: 1000)
    with pytest.raises(OutputError, match=r"0 MB free, this run needs about \d+ MB"):
        train(_config(tmp_path), backbone, dataset)
    monkeypatch.undo()
    monkeypatch.setattr(train_mod, "Conditioning", no_work)

    def read_only(folder):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("ipa_train.outputs._probe_writable", read_only)
    with pytest.raises(OutputError, match=r"cannot be written \(Permission denied\)"):
        train(_config(tmp_path), backbone, dataset)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the monkeypatched case covers it")
def test_read_only_output_folder_is_refused(tmp_path):
    from ipa_train.outputs import check_output_dir

    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    with pytest.raises(OutputError, match="cannot be written"):
        check_output_dir(tmp_path / "ro")


def test_disk_full_during_a_run_keeps_the_last_checkpoint_and_no_temporary_folder(tmp_path, tiny_model_dirs, dataset,
                                                                                monkeypatch):
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def filling(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint's optimizer state
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", filling)
    cfg = _config(tmp_path, steps=4, save_every=1)
    with pytest.raises(OutputError) as e:
        train(cfg, _backbone(tiny_model_dirs), dataset)
    text = str(e.value)
    assert "the disk is full" in text and "step 3" in text and "checkpoint-000002 is kept" in text and "\n" not in text
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    resumed = train(_config(tmp_path, steps=4, save_every=1, resume="latest"), _backbone(tiny_model_dirs), dataset)
    assert resumed.steps == 4 and (tmp_path / "run" / "ip-adapter.safetensors").is_file()


def _tiny_state(tmp_path, keep=3):
    adapter = random_adapter(official_config(OFFICIAL[0]))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    config = _config(tmp_path, keep_checkpoints=keep)
    return adapter, optimizer, scheduler, Engine(config, torch.device("cpu")), config


def test_resave_of_a_step_never_leaves_no_visible_checkpoint(tmp_path, monkeypatch):
    adapter, optimizer, scheduler, engine, config = _tiny_state(tmp_path)
    folder = tmp_path / "ck"
    first = save_checkpoint(folder / "checkpoint-000005", adapter, optimizer, scheduler, engine, LoopState(5, [1.0]), config)
    assert first.name == "checkpoint-000005"

    def crash(src, dst):
        raise KeyboardInterrupt  # killed right at the one rename

    monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder / "checkpoint-000005", adapter, optimizer, scheduler, engine, LoopState(5, [1.0]), config)
    monkeypatch.undo()
    assert [p.name for p in folder.iterdir()] == ["checkpoint-000005"]  # the old one, complete and visible
    again = save_checkpoint(folder / "checkpoint-000005", adapter, optimizer, scheduler, engine, LoopState(5, [1.0]), config)
    assert again.name == "checkpoint-000005.1" and [p.name for p in list_checkpoints(folder)] == ["checkpoint-000005.1"]
    third = save_checkpoint(folder / "checkpoint-000005", adapter, optimizer, scheduler, engine, LoopState(5, [1.0]), config)
    assert third.name == "checkpoint-000005.2" and list_checkpoints(folder) == [third]


def test_keep_checkpoints_prunes_older_ones_and_file_modes_are_uniform(tmp_path, tiny_model_dirs, dataset):
    result = train(_config(tmp_path, steps=4, save_every=1, keep_checkpoints=2), _backbone(tiny_model_dirs), dataset)
    out = tmp_path / "run"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-000003", "checkpoint-000004"]
    assert len(result.checkpoints) == 4
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 7  # the adapter + 3 files in each of the 2 checkpoints
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode())}
    dirs = [p for p in out.rglob("*") if p.is_dir()]
    assert len({p.stat().st_mode & 0o777 for p in dirs}) == 1
