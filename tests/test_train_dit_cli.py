"""Flux / SD3.5 training from the command line on tiny diffusers folders: the memory order (encoders cached and
released before the transformer loads), the official file written, one-line refusals before any model loads,
resume bit-equal, the NaN stop and gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipa_train.adapter.formats import inspect_file
from ipa_train.cli import main
from ipa_train.hosts.backbone_dit import DitBackbone

from . import dit_factories
from .dit_train_factories import write_folder
from .memory_recording import DIT_ENCODERS, Recording, check_order

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "ipa_train" / "demo_data"


class RecordingDit(Recording, DitBackbone):
    """`DitBackbone` with `Recording`'s log of loads, releases and transformer calls."""


@pytest.fixture
def recorded(monkeypatch) -> list:
    """The backbones the command line makes, each a `RecordingDit`."""
    import ipa_train.hosts.backbone_dit as module

    made = []

    class Made(RecordingDit):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(module, "DitBackbone", Made)
    return made


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("flux"), "xlabs-flux")


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("sd3"), "instantx-sd3")


def _argv(dirs, out, *extra):
    return ["train", "--base-model", str(dirs[0]), "--image-encoder", str(dirs[1]), "--data", str(DEMO),
            "--output", str(out), "--resolution", "32", "--steps", "2", "--batch-size", "2", "--save-every", "0",
            "--max-sequence-length", "8", *extra]


@pytest.mark.parametrize("family, fmt, tokens, blocks", [("flux", "xlabs-flux", 16, 2), ("sd3", "instantx-sd3", 8, 2)])
def test_cli_trains_with_the_transformer_loaded_last(tmp_path, request, recorded, family, fmt, tokens, blocks):
    """Every encoder (T5 included) loads, runs and is freed before the transformer loads; none is in memory
    next to it at any later point."""
    dirs = request.getfixturevalue(f"{family}_dirs")
    assert main(_argv(dirs, tmp_path / "out", "--format", fmt, "--num-tokens", str(tokens))) == 0
    info = inspect_file(tmp_path / "out" / "ip-adapter.safetensors")
    assert (info["format"], info["num_tokens"], info["blocks"]) == (fmt, tokens, blocks)
    check_order(recorded[0].events, "transformer", DIT_ENCODERS[family])


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_bad_inputs_stop_in_one_line_before_any_model_loads(tmp_path, flux_dirs, sd3_dirs, capsys, recorded):
    out = tmp_path / "out"
    err = _one_line(capsys, _argv(flux_dirs, out, "--resolution", "40"))
    assert "--resolution 40" in err and "multiple of 16" in err and "use 32 or 48" in err
    err = _one_line(capsys, _argv(sd3_dirs, out, "--format", "xlabs-flux"))
    assert "xlabs-flux is a Flux layout" in err and "SD3.5" in err and "--format instantx-sd3" in err
    sd3_file = dit_factories.write(dit_factories.instantx_sd3(blocks=2), tmp_path / "sd3.safetensors")
    err = _one_line(capsys, _argv(flux_dirs, out, "--init-adapter", str(sd3_file)))
    assert "sd3.safetensors" in err and "SD3.5 adapter of format instantx-sd3" in err and "--format instantx-sd3" in err
    from .factories import OFFICIAL, write_official

    unet_file = tmp_path / "ip-adapter_sd15.safetensors"
    write_official(OFFICIAL[0], unet_file, "safetensors")
    err = _one_line(capsys, _argv(flux_dirs, out, "--init-adapter", str(unet_file)))
    assert "UNet (SD1.5 / SDXL / FaceID) adapter cannot start a xlabs-flux run" in err
    err = _one_line(capsys, _argv(flux_dirs, out, "--projection", "faceid"))
    assert "--projection faceid is a UNet option" in err
    other = dit_factories.write(dit_factories.xlabs_flux(hidden=32, ctx=24, blocks=3), tmp_path / "xlabs.safetensors")
    err = _one_line(capsys, _argv(flux_dirs, out, "--init-adapter", str(other)))
    assert "xlabs.safetensors" in err and "3 blocks" in err and "made for another transformer" in err
    assert all(not [e for e in b.events if e[0] == "load"] for b in recorded)  # refused before any model loaded


@pytest.mark.slow  # two torchrun launches: about a minute each on 2 loaded cores
def test_two_processes_train_and_resume_to_the_same_weights(tmp_path, flux_dirs):
    """torchrun with 2 CPU processes (gloo DDP, as `accelerate launch`): the global batch spans both, and a run
    resumed from its checkpoint ends with the weights of an uninterrupted one."""
    import subprocess
    import sys

    from ipa_train.adapter.formats import load_adapter

    def run(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "ipa_train", *_argv(flux_dirs, out, "--steps", str(steps), "--batch-size", "1", "--save-every", "1",
                                   "--log-every", "1", "--seed", "3", *extra)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    whole = run(tmp_path / "whole", 2, "--keep-checkpoints", "0")
    assert "2 steps of 1 x 2 sample(s)" in whole.stderr and whole.stderr.count("step 2/2") == 1
    run(tmp_path / "split", 2, "--resume", str(tmp_path / "whole" / "checkpoints" / "checkpoint-000001"))
    a = load_adapter(tmp_path / "whole" / "ip-adapter.safetensors").state_dict()
    b = load_adapter(tmp_path / "split" / "ip-adapter.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cls, family", [("FluxTransformer2DModel", "flux"), ("SD3Transformer2DModel", "sd3")])
def test_hub_id_family_from_the_hub_cache_without_network(tmp_path, monkeypatch, cls, family):
    """A hub id: the transformer's config.json is read from the local hub cache only (no request is made; the hub
    is out of reach here), and a hub id not downloaded yet leaves the family to --format."""
    import json

    from huggingface_hub import constants

    from ipa_train.training.dit import base_model_family, transformer_family
    from ipa_train.training.train import TrainConfig

    snapshot = tmp_path / "models--someone--some-dit" / "snapshots" / "abc123"
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot / "transformer" / "config.json").write_text(json.dumps({"_class_name": cls}))
    (tmp_path / "models--someone--some-dit" / "refs").mkdir()
    (tmp_path / "models--someone--some-dit" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert transformer_family("someone/some-dit") == family
    assert transformer_family("someone/not-downloaded") is None
    other = "instantx-sd3" if family == "flux" else "xlabs-flux"
    assert base_model_family("someone/not-downloaded", TrainConfig(output_dir=str(tmp_path / "o"), format=other)) \
        == ("sd3" if family == "flux" else "flux")
    assert DitBackbone("someone/not-downloaded", None, family=family).family == family
