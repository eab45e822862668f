"""The training node's memory order inside ComfyUI (in-process, CPU): the models are the user's, already in memory.

Every load through ComfyUI's model management is recorded with what it holds loaded at that moment. When the
dataset fits the cache, the node loads the UNet only after the encoders were unloaded, never loads an encoder
again while training, reads sizes without loading anything, and loads or copies nothing but the user's models.
MODEL and CLIP_VISION are ComfyUI's own classes (tiny, random); CLIP and VAE are stand-ins that load through
model management before they compute, as ComfyUI's do.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from .conftest import tiny_comfy_model

ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = ROOT / "ipa_train" / "demo_data"
ENCODERS = ("clip", "vae", "clip_vision")


def _patcher(comfy, module):
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(module, load_device=cpu, offload_device=cpu)


class StandInClip:
    """CLIP as the training backbone calls it: tokenize, encode_from_tokens -> [1, 77, 768]."""

    def __init__(self, comfy):
        self.mm = comfy.model_management
        self.module = torch.nn.Embedding(256, 768)
        self.patcher = _patcher(comfy, self.module)

    def tokenize(self, text):
        return torch.tensor([min(ord(c), 255) for c in text[:77].ljust(77)])

    def encode_from_tokens(self, tokens):
        self.mm.load_model_gpu(self.patcher)
        return self.module(tokens)[None]


class StandInVae:
    """VAE as the training backbone calls it: encode(IMAGE [B, H, W, 3] in 0..1) -> latents [B, channels, H/8, W/8]."""

    def __init__(self, comfy, channels: int = 4):
        self.mm = comfy.model_management
        self.module = torch.nn.Conv2d(3, channels, 8, stride=8)
        self.patcher = _patcher(comfy, self.module)

    def encode(self, image):
        self.mm.load_models_gpu([self.patcher])
        return self.module(image.movedim(-1, 1) * 2 - 1)


def _clip_vision(comfy, tmp_path, config: dict | None = None):
    """ComfyUI's ClipVisionModel from a tiny config (default: 224 px input, 2 layers, projection 24), random weights."""
    import comfy.clip_vision

    config = config or {"model_type": "clip_vision_model", "num_hidden_layers": 2, "hidden_size": 32,
                        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu", "num_channels": 3,
                        "patch_size": 32, "image_size": 224, "projection_dim": 24}
    path = tmp_path / f"{config['model_type']}.json"
    path.write_text(json.dumps(config))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(1)
    cv.load_sd({k: (torch.randn(v.shape, generator=g) * 0.05 + (1.0 if "norm" in k and k.endswith("weight") else 0.0))
                for k, v in cv.get_sd().items()})
    return cv


class Recorder:
    """Records every `load_models_gpu` call, each release and each prediction, with the user's models loaded then;
    the user's MODEL is named `denoiser`."""

    def __init__(self, comfy, models: dict, denoiser: str = "unet"):
        self.mm = comfy.model_management
        self.models = models
        self.denoiser = denoiser
        self.events: list[tuple[str, list[str], list[str]]] = []

    def name(self, patcher) -> str:
        if patcher.model is self.models["model"].model:
            return self.denoiser  # the node's clone of the user's MODEL shares its module
        return next((n for n in ENCODERS if patcher is self.models[n].patcher), f"other {type(patcher.model).__name__}")

    def loaded(self) -> list[str]:
        return sorted(self.name(lm.model) for lm in self.mm.current_loaded_models if lm.model is not None)

    def wrap_loads(self, real):
        def load_models_gpu(models, *args, **kwargs):
            self.events.append(("load", sorted(self.name(m) for m in models), self.loaded()))
            return real(models, *args, **kwargs)

        return load_models_gpu


def record(comfy, monkeypatch, models: dict, backbone_cls, denoiser: str = "unet") -> Recorder:
    """A `Recorder` of ComfyUI's model loads and of `backbone_cls`'s releases and predictions (nothing loaded now)."""
    mm = comfy.model_management
    mm.unload_all_models()
    recorder = Recorder(comfy, models, denoiser)
    monkeypatch.setattr(mm, "load_models_gpu", recorder.wrap_loads(mm.load_models_gpu))
    real_release, real_predict = backbone_cls.release, backbone_cls.predict

    def release(self, parts):
        real_release(self, parts)
        recorder.events.append(("release", list(parts), recorder.loaded()))

    def predict(self, *args):
        out = real_predict(self, *args)
        recorder.events.append(("predict", [], recorder.loaded()))
        return out

    monkeypatch.setattr(backbone_cls, "release", release)
    monkeypatch.setattr(backbone_cls, "predict", predict)
    return recorder


@pytest.fixture()
def setup(comfy, kit, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    models = {"model": tiny_comfy_model(comfy, "sd15"), "clip": StandInClip(comfy), "vae": StandInVae(comfy),
              "clip_vision": _clip_vision(comfy, tmp_path)}
    backbone_mod = importlib.import_module(kit.__name__ + ".nodes.train_backbone")
    recorder = record(comfy, monkeypatch, models, backbone_mod.ComfyBackbone)
    yield importlib.import_module(kit.__name__ + ".nodes.train"), backbone_mod, models, recorder
    comfy.model_management.unload_all_models()


def check_order(events: list, denoiser: str = "unet") -> None:
    """The denoiser loads once, after every encoder ran and one was released; no encoder loads again or is loaded
    next to it; every prediction runs with the denoiser alone loaded."""
    loads = [(i, names) for i, (kind, names, _) in enumerate(events) if kind == "load"]
    denoiser_loads = [i for i, names in loads if denoiser in names]
    assert len(denoiser_loads) == 1, events
    first = denoiser_loads[0]
    for e in ENCODERS:
        assert any(e in names for i, names in loads if i < first), f"{e} never ran before the {denoiser}: {events}"
    assert any(kind == "release" for kind, _, _ in events[:first]), events
    for kind, names, loaded in events[first:]:
        assert not (kind == "load" and set(names) & set(ENCODERS)), f"encoder loaded after the {denoiser}: {events}"
        assert not set(loaded) & set(ENCODERS), f"encoder loaded next to the {denoiser} at {kind}: {events}"
    predicts = [loaded for kind, _, loaded in events if kind == "predict"]
    assert predicts and all(loaded == [denoiser] for loaded in predicts), events


@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_train_node_unloads_the_encoders_before_the_unet(setup, projection):
    train_mod, _, models, recorder = setup
    unet = models["model"].model.diffusion_model
    weights = {id(p): p.data_ptr() for p in unet.parameters()}
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    with torch.inference_mode():  # as ComfyUI runs a node
        out = train_mod.train_in_comfy(models["model"], models["clip"], models["vae"], models["clip_vision"], dataset,
                                       projection, False, 2, 1, 1e-4, 64, 0.05, 0.05, 0.05, 0, 0, f"order-{projection}")
    assert Path(out.args[1]).is_file()
    check_order(recorder.events)
    requested = {n for kind, names, _ in recorder.events if kind == "load" for n in names}
    assert requested <= {"unet", *ENCODERS}, requested  # nothing but the user's models is loaded
    assert {id(p): p.data_ptr() for p in unet.parameters()} == weights  # the UNet's weights are the user's, uncopied


def test_sizes_read_shapes_and_load_nothing(setup):
    _, backbone_mod, models, recorder = setup
    backbone = backbone_mod.ComfyBackbone(models["model"], models["clip"], models["vae"], models["clip_vision"])
    sizes = backbone.sizes
    assert recorder.events == [] and recorder.loaded() == []
    zeros = torch.zeros(1, 3, 224, 224)
    assert sizes.clip_embedding_dim("image_embeds") == backbone.encode_image(zeros, "image_embeds").shape[-1]
    assert sizes.clip_embedding_dim("penultimate") == backbone.encode_image(zeros, "penultimate").shape[-1]
    assert sizes.cross_attention_dim == 768 == models["clip"].encode_from_tokens(models["clip"].tokenize("a")).shape[-1]
    assert len(sizes.layer_hidden_sizes) == 16  # SD1.5's cross-attention layers, middle block included
