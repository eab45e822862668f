"""The FaceID nodes in-process: the encode node's aligned crops, its bad inputs (one line each, naming the input and
the fix), and the preset loader's FaceID presets (adapter + CLIP vision + face models, every missing file named)."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch

from ipa_train import save_adapter
from ipa_train.adapter.config import AdapterConfig
from ipa_train.adapter.layout import known_sites
from ipa_train.errors import IPAKitError

from ..face_standins import face_image, write_pack
from ..factories import random_adapter
from .conftest import tiny_comfy_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _mod(kit, name):
    return importlib.import_module(f"{kit.__name__}.nodes.{name}")


def _faceid(projection: str = "faceid", tokens: int = 4, family: str = "sd15"):
    cfg = AdapterConfig(projection=projection, num_tokens=tokens, clip_embedding_dim=512,
                        cross_attention_dim=768 if family == "sd15" else 2048, clip_output="none", face_embedding_dim=512,
                        layer_hidden_sizes=tuple(8 for _ in known_sites(family)), face_hidden_dim=16)
    return random_adapter(cfg, seed=2)


def _image(*faces, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(face_image(240, 320, faces=faces, seed=seed)).float()[None] / 255.0


@pytest.fixture(scope="module")
def face_models(tmp_path_factory):
    from ipa_train.face import FaceModels

    return FaceModels(write_pack(tmp_path_factory.mktemp("faces") / "buffalo_l"), "cpu")


def test_encode_returns_the_aligned_crops_it_embedded(kit, face_models):
    from ipa_train.face import FaceAnalyzer

    faceid = _mod(kit, "faceid")
    image = torch.cat([_image((64, 96, 96), seed=0), _image((40, 150, 120), seed=1)])
    out = faceid.IPAKitEncodeFace.execute(_faceid("faceid-portrait", 16), face_models, image)
    embeds, crops = out.result
    assert crops.shape == (2, 224, 224, 3) and crops.dtype == torch.float32  # an IMAGE batch, one crop per face
    for k in range(2):
        rgb = (image[k].numpy() * 255).astype(np.uint8)
        want = FaceAnalyzer(face_models).analyze(rgb, (224,)).crops[224]
        assert torch.equal(crops[k], torch.from_numpy(want).float() / 255.0)
    assert embeds.cond.shape[1] == 2 * 16  # portrait: 16 tokens per face, concatenated


def test_encode_bad_inputs_are_one_line_naming_the_fix(kit, face_models, caplog):
    faceid = _mod(kit, "faceid")
    adapter, image = _faceid(), _image((64, 96, 96))
    plain = random_adapter(AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=32, cross_attention_dim=768,
                                         layer_hidden_sizes=tuple(8 for _ in known_sites("sd15"))))
    cases = [
        (dict(adapter=plain), r"needs a FaceID adapter; this one is plain: use Encode Reference Image"),
        (dict(face_models=None), r"face_models is empty; connect Load Face Models"),
        (dict(image=torch.zeros(2, 120, 120, 3), skip_missing=True), r"no face found in any image of the batch"),
        (dict(image=torch.cat([image, torch.zeros(1, 240, 320, 3)])), r"no face found in image 1 of the batch.*turn on skipping"),
        (dict(image=torch.rand(1, 16, 16, 3)), r"image 0 is 16x16 pixels: too small.*larger picture"),
        (dict(adapter=_faceid("faceid-portrait", 16), image_negative=image), r"image_negative: this faceid-portrait adapter"),
        (dict(adapter=_faceid("faceid-portrait", 16), faceid_v2_weight=2.0), r"faceid_v2_weight is 2.*no plus v2"),
    ]
    for kwargs, message in cases:
        args = {"adapter": adapter, "face_models": face_models, "image": image, **kwargs}
        with pytest.raises(IPAKitError, match=message) as e:
            faceid.IPAKitEncodeFace.execute(**args)
        assert "\n" not in str(e.value), message
    # several faces: the chosen one is named in one warning with the fix; grayscale and RGBA images encode
    with caplog.at_level(logging.WARNING):
        faceid.IPAKitEncodeFace.execute(adapter, face_models, _image((20, 20, 96), (120, 200, 96)))
    several = [r.getMessage() for r in caplog.records if "faces found" in r.getMessage()]
    assert several and "image 0" in several[0] and "pick" in several[0]
    gray = image.mean(dim=-1, keepdim=True).expand(-1, -1, -1, 3).contiguous()
    rgba = torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)
    base = faceid.IPAKitEncodeFace.execute(adapter, face_models, image).result[0].cond
    assert torch.equal(faceid.IPAKitEncodeFace.execute(adapter, face_models, rgba).result[0].cond, base)
    assert faceid.IPAKitEncodeFace.execute(adapter, face_models, gray).result[0].cond.shape == base.shape


@pytest.fixture
def preset_folders(comfy, tmp_path, monkeypatch):
    """folder_paths pointed at an empty models folder in tmp_path: (models dir, adapters dict, clips dict)."""
    import folder_paths

    adapters: dict[str, str] = {}
    clips: dict[str, str] = {}
    listing = {"ipadapter": adapters, "clip_vision": clips}
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda name: sorted(listing.get(name, {})))
    monkeypatch.setattr(folder_paths, "get_full_path_or_raise", lambda name, f: listing[name][f])
    return tmp_path / "models", adapters, clips


def test_faceid_preset_names_every_missing_file_then_loads_all_three(kit, comfy, preset_folders, tmp_path):
    presets = _mod(kit, "presets")
    models_dir, adapters, _ = preset_folders
    model = tiny_comfy_model(comfy, "sd15")
    with pytest.raises(IPAKitError) as e:
        presets.IPAKitPresetLoader.execute(model, "faceid plus v2")
    lines = str(e.value).splitlines()
    assert lines[0] == "FaceID preset 'faceid plus v2' (sd15) is missing:" and len(lines) == 4
    for line, folder in zip(lines[1:], ("models/ipadapter", "models/clip_vision", "models/insightface/models/buffalo_l")):
        assert f"-> ComfyUI/{folder}" in line and "(from https://" in line, line
    assert "ip-adapter-faceid-plusv2_sd15.bin" in lines[1] and "CLIP-ViT-H-14" in lines[2] and "det_10g.onnx" in lines[3]
    # a folder holding no ONNX file is still missing
    (models_dir / "insightface" / "models" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(IPAKitError, match=r"faceid'.*missing:\n.*ip-adapter-faceid_sd15.bin.*\n.*det_10g.onnx"):
        presets.IPAKitPresetLoader.execute(model, "faceid")
    write_pack(models_dir / "insightface" / "models" / "buffalo_l")
    adapters["ip-adapter-faceid_sd15.bin"] = str(save_adapter(_faceid(), tmp_path / "ip-adapter-faceid_sd15.safetensors"))
    adapter, clip_vision, info, face_models = presets.IPAKitPresetLoader.execute(model, "faceid").result
    assert adapter.config.projection == "faceid" and clip_vision is None
    assert face_models.detector is not None and face_models.recognizer is not None
    assert "ip-adapter-faceid_sd15.bin" in info and "buffalo_l" in info
    # the image presets give no face models
    with pytest.raises(IPAKitError, match="ip-adapter_sd15.safetensors not found"):
        presets.IPAKitPresetLoader.execute(model, "standard")


def test_apply_refuses_face_embeds_on_an_image_adapter_and_the_reverse(kit, comfy, face_models):
    from ipa_train.hosts.comfy.unet import ImageEmbeds

    faceid, apply = _mod(kit, "faceid"), _mod(kit, "apply")
    model = tiny_comfy_model(comfy, "sd15")
    adapter = _faceid()
    plain = random_adapter(AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=32, cross_attention_dim=768,
                                         layer_hidden_sizes=tuple(8 for _ in known_sites("sd15"))))
    face_embeds = faceid.IPAKitEncodeFace.execute(adapter, face_models, _image((64, 96, 96))).result[0]
    image_embeds = ImageEmbeds(torch.zeros(1, 4, 768), torch.zeros(1, 4, 768), "plain")
    for a, e, message in ((plain, face_embeds, r"these are FaceID embeds \(faceid\) but the adapter is plain"),
                          (adapter, image_embeds, r"this faceid adapter needs FaceID embeds from Encode Face")):
        with pytest.raises(IPAKitError, match=message) as err:
            apply.IPAKitApply.execute(model, a, e)
        assert "\n" not in str(err.value)
