"""Training's memory order: sizes come from configs, the encoders run and are released before the UNet loads.

A backbone that records every real load (meta-device builds for sizes are not loads), every release and which
components are still alive (weak references, after a garbage collection) shows that, when the dataset fits
the cache, no point of a run has the UNet and an encoder in memory at once: for `train()` from Python, for the
command line, for plain and plus, for folders (config files) and factories (meta-device builds).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ipa_train.errors import IPAKitError
from ipa_train.hosts.backbone_diffusers import DiffusersBackbone
from ipa_train.hosts.diffusers_unet import unet_layer_hidden_sizes
from ipa_train.toy.tiny import tiny_scheduler
from ipa_train.training.data import load_dataset
from ipa_train.training.train import TrainConfig, train

from .memory_recording import UNET_ENCODERS as ENCODERS
from .memory_recording import Recording, check_order

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "ipa_train" / "demo_data"
RES = 32


class RecordingBackbone(Recording, DiffusersBackbone):
    """`DiffusersBackbone` with `Recording`'s log of loads, releases and UNet calls."""


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DEMO_DATA, resolution=RES)


def _config(tmp_path, projection: str) -> TrainConfig:
    return TrainConfig(output_dir=str(tmp_path / "run"), projection=projection, steps=2, batch_size=2, lr=1e-3,
                       resolution=RES, save_every=0, log_every=0)


def _factories(tmp_path) -> dict:
    """The benchmark's set-up: components built on first use by zero-argument functions."""
    from transformers import CLIPTokenizer

    from ipa_train.toy import tiny

    folder = tiny.write_tokenizer(tmp_path / "tokenizer")
    vocab = len(CLIPTokenizer.from_pretrained(str(folder)))
    return {"unet": tiny.tiny_unet, "vae": tiny.tiny_vae, "image_encoder": tiny.tiny_image_encoder,
            "text_encoder": lambda: tiny.tiny_text_encoder(vocab),
            "tokenizer": lambda: CLIPTokenizer.from_pretrained(str(folder))}


def _backbone(kind: str, tmp_path, tiny_model_dirs) -> RecordingBackbone:
    if kind == "folders":
        return RecordingBackbone(*tiny_model_dirs, device="cpu")
    return RecordingBackbone(device="cpu", components={"scheduler": tiny_scheduler()}, factories=_factories(tmp_path))


@pytest.mark.parametrize("projection, kind", [("plain", "folders"), ("plus", "factories"), ("plain", "factories")])
def test_unet_loads_only_after_the_encoders_are_released(tmp_path, tiny_model_dirs, dataset, projection, kind):
    backbone = _backbone(kind, tmp_path, tiny_model_dirs)
    result = train(_config(tmp_path, projection), backbone, dataset)
    assert result.steps == 2 and result.adapter.config.projection == projection
    check_order(backbone.events)


def test_the_check_catches_an_early_unet(tmp_path, tiny_model_dirs, dataset):
    """Loading the UNet for a size query (as a pre-flight once did) puts it next to the encoders: caught."""

    class Eager(RecordingBackbone):
        @property
        def sizes(self):
            self.get("unet")
            self.get("image_encoder")
            return super().sizes

    backbone = Eager(*tiny_model_dirs, device="cpu")
    train(_config(tmp_path, "plain"), backbone, dataset)
    with pytest.raises(AssertionError):
        check_order(backbone.events)


def test_uncached_dataset_keeps_the_encoders(tmp_path, tiny_model_dirs, dataset):
    """Too many images to cache: the encoders stay (they run every step), and no release is claimed."""
    backbone = RecordingBackbone(*tiny_model_dirs, device="cpu")
    config = TrainConfig(**{**_config(tmp_path, "plain").to_dict(), "cache_limit": 0})
    train(config, backbone, dataset)
    assert not [e for e in backbone.events if e[0] == "release"]
    predicts = [alive for kind, name, alive in backbone.events if name == "predict"]
    assert predicts and all(set(ENCODERS) <= set(alive) for alive in predicts)


@pytest.mark.parametrize("kind", ["folders", "factories"])
def test_sizes_read_configs_and_load_nothing(tmp_path, tiny_model_dirs, kind):
    backbone = _backbone(kind, tmp_path, tiny_model_dirs)
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    sizes = backbone.sizes
    assert torch.equal(torch.rand(3), expected_draw)  # factories seed torch; the meta builds leave it as it was
    assert backbone.events == [] and backbone.alive() == []
    unet = backbone.unet
    assert sizes.cross_attention_dim == unet.config.cross_attention_dim
    assert sizes.layer_hidden_sizes == tuple(unet_layer_hidden_sizes(unet))
    zeros = torch.zeros(1, 3, 224, 224)
    assert sizes.clip_embedding_dim("image_embeds") == backbone.encode_image(zeros, "image_embeds").shape[-1]
    assert sizes.clip_embedding_dim("penultimate") == backbone.encode_image(zeros, "penultimate").shape[-1]


def test_sizes_of_a_missing_folder_name_it(tmp_path, tiny_model_dirs):
    with pytest.raises(IPAKitError, match="nowhere"):
        _ = RecordingBackbone(tiny_model_dirs[0], tmp_path / "nowhere", device="cpu").sizes
    bad = tmp_path / "base"
    (bad / "scheduler").mkdir(parents=True)
    for f in (tiny_model_dirs[0] / "scheduler").iterdir():
        (bad / "scheduler" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(IPAKitError, match="cannot load the unet"):
        _ = RecordingBackbone(bad, tiny_model_dirs[1], device="cpu").sizes


_CLI = """
import json, sys
import ipa_train.hosts.backbone_diffusers as bd
from ipa_train.cli import main
from tests.test_train_memory_order import RecordingBackbone
made = []
class Made(RecordingBackbone):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)
bd.DiffusersBackbone = Made
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "events": made[0].events if made else None}))
"""


def test_cli_train_releases_the_encoders_before_the_unet(tmp_path, tiny_model_dirs):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(DEMO_DATA.glob("*.jpg"))[:2]:
        Image.open(p).save(data / p.name)
        (data / p.name).with_suffix(".txt").write_text(p.stem)
    base, encoder = tiny_model_dirs
    r = subprocess.run([sys.executable, "-c", _CLI, "train", "--base-model", str(base), "--image-encoder", str(encoder),
                        "--data", str(data), "--output", str(tmp_path / "out"), "--projection", "plus", "--steps", "2",
                        "--batch-size", "1", "--resolution", str(RES)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0
    check_order([tuple(e) for e in out["events"]])


@pytest.mark.parametrize("threshold, native", [(0, True), (None, False)], ids=["large-convs", "small-convs"])
def test_cpu_steps_convolve_on_the_native_kernel(tmp_path, tiny_model_dirs, dataset, monkeypatch, threshold, native):
    """oneDNN copies every frozen conv weight into its blocked layout on each call: with convolutions as large as a
    real UNet's (here: the size bar lowered to 0), the CPU step's forward and backward run with it off; small ones
    (these tiny models', the toy model's) keep it. The setting is the caller's again afterwards."""
    from ipa_train.training import engine

    if threshold is not None:
        monkeypatch.setattr(engine, "NATIVE_CONV_BYTES", threshold)
    seen = []

    class Probe(RecordingBackbone):
        def predict(self, noisy, timesteps, text, ip_tokens):
            out = super().predict(noisy, timesteps, text, ip_tokens)
            seen.append(("forward", torch.backends.mkldnn.enabled))
            out.register_hook(lambda grad: seen.append(("backward", torch.backends.mkldnn.enabled)))
            return out

    before = torch.backends.mkldnn.enabled
    train(_config(tmp_path, "plain"), Probe(*tiny_model_dirs, device="cpu"), dataset)
    assert seen == [("forward", before and not native), ("backward", before and not native)] * 2
    assert torch.backends.mkldnn.enabled == before
