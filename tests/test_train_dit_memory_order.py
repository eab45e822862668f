"""Flux / SD3.5 training's memory order: sizes come from configs, every encoder (T5 included) runs and is released
before the transformer loads.

`DitBackbone` with `memory_recording.Recording`'s log shows that, when the dataset fits the cache, no point of a
`train()` run has the transformer and an encoder in memory at once, for Flux and SD3 stacks built by factories
(sizes from meta-device builds) and read from folders (sizes from config files); and that the size queries the
pre-flight makes (family, sizes, guidance input, image input, the adapter's shape) load nothing. The command
line's run is in `test_train_dit_cli`.
"""

from __future__ import annotations

import pytest
import torch

from ipa_train.hosts.backbone_dit import DitBackbone
from ipa_train.training.adapters import adapter_shape
from ipa_train.training.data import load_dataset
from ipa_train.training.dit import resolve_format
from ipa_train.training.train import TrainConfig, train

from .dit_train_factories import factories, write_folder
from .memory_recording import DIT_ENCODERS, Recording, check_order
from .test_train_dit import DEMO, RES, TOKENS

FAMILY = {"xlabs-flux": "flux", "instantx-flux": "flux", "instantx-sd3": "sd3"}


class RecordingDit(Recording, DitBackbone):
    """`DitBackbone` with `Recording`'s log of loads, releases and transformer calls."""


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DEMO, resolution=RES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """fmt -> (base model folder, image encoder folder), written once."""
    return {fmt: write_folder(tmp_path_factory.mktemp(fmt), fmt) for fmt in ("xlabs-flux", "instantx-sd3")}


def _backbone(kind: str, fmt: str, tmp_path, folders) -> RecordingDit:
    if kind == "folders":
        return RecordingDit(*folders[fmt], device="cpu", max_sequence_length=8)
    return RecordingDit(device="cpu", max_sequence_length=8, factories=factories(tmp_path / "models", fmt))


def _config(tmp_path, fmt: str, **opts) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(tmp_path / "run"), "format": fmt, "resolution": RES, "steps": 2,
                          "batch_size": 2, "lr": 1e-3, "save_every": 0, "log_every": 0, "num_tokens": TOKENS[fmt],
                          **opts})


@pytest.mark.parametrize("fmt, kind", [("xlabs-flux", "factories"), ("instantx-flux", "factories"),
                                       ("instantx-sd3", "factories"), ("instantx-sd3", "folders")])
def test_transformer_loads_only_after_the_encoders_are_released(tmp_path, folders, dataset, fmt, kind):
    backbone = _backbone(kind, fmt, tmp_path, folders)
    result = train(_config(tmp_path, fmt), backbone, dataset)
    assert result.steps == 2 and result.adapter.config.format == fmt
    check_order(backbone.events, "transformer", DIT_ENCODERS[FAMILY[fmt]])


def test_the_check_catches_an_early_transformer(tmp_path, folders, dataset):
    """Loading the transformer for a size query puts it next to the encoders: caught."""

    class Eager(RecordingDit):
        @property
        def sizes(self):
            self.get("transformer")
            return super().sizes

    backbone = Eager(*folders["xlabs-flux"], device="cpu", max_sequence_length=8)
    train(_config(tmp_path, "xlabs-flux"), backbone, dataset)
    with pytest.raises(AssertionError):
        check_order(backbone.events, "transformer", DIT_ENCODERS["flux"])


@pytest.mark.parametrize("fmt, kind", [("xlabs-flux", "folders"), ("xlabs-flux", "factories"),
                                       ("instantx-sd3", "folders"), ("instantx-sd3", "factories")])
def test_size_queries_read_configs_and_load_nothing(tmp_path, folders, fmt, kind):
    """What `train` asks before the cache is built, asked of a fresh backbone: no load, nothing in memory, the
    RNG untouched (factories seed it); each answer equals the loaded model's."""
    backbone = _backbone(kind, fmt, tmp_path, folders)
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    family, sizes, guidance, image_input = (backbone.family, backbone.sizes, backbone.guidance_input,
                                            backbone.image_input)
    config = resolve_format(_config(tmp_path, fmt), sizes.family)
    shape = adapter_shape(config, backbone)  # the pre-flight's adapter size
    assert torch.equal(torch.rand(3), expected_draw)
    assert backbone.events == [] and backbone.alive() == []
    transformer, encoder = backbone.transformer, backbone.get("image_encoder")
    c = transformer.config
    assert family == sizes.family == FAMILY[fmt]
    assert sizes.head_dim == c.attention_head_dim and sizes.double_blocks == c.num_layers
    assert sizes.single_blocks == getattr(c, "num_single_layers", 0)
    assert set(sizes.layer_hidden_sizes) == {c.num_attention_heads * c.attention_head_dim}
    assert sizes.cross_attention_dim == (c.joint_attention_dim if family == "flux" else c.caption_projection_dim)
    assert guidance == bool(getattr(c, "guidance_embeds", False)) == (family == "flux")
    assert image_input.size == encoder.config.image_size
    zeros = torch.zeros(1, 3, image_input.size, image_input.size)
    output = "image_embeds" if fmt == "xlabs-flux" else "penultimate"
    assert sizes.clip_embedding_dim(output) == backbone.encode_image(zeros, output).shape[-1]
    assert shape.blocks == sizes.double_blocks + (sizes.single_blocks if fmt == "instantx-flux" else 0)
