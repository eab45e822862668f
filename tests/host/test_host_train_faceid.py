"""IPAKitTrain with a FaceID projection: the loaded face models embed each image's face, the projection, image K/V
and the LoRA of every attention layer train against the user's model, and the UNet is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipa_train import load_adapter
from ipa_train.errors import IPAKitError

from ..face_standins import face_image, write_pack
from .conftest import tiny_comfy_model
from .test_host_half import FakeClip, FakeClipVision, FakeVae, _mods

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _faces(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(face_image(seed=i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo of a person")
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(folder / "blank.png")
    return folder


def test_train_node_trains_faceid_and_leaves_the_unet_unhooked(comfy, kit, tmp_path):
    import folder_paths

    from ipa_train.face import FaceModels

    train_mod = _mods(kit)["train"]
    model = tiny_comfy_model(comfy, "sd15")
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    faces = FaceModels(write_pack(tmp_path / "buffalo_l"), "cpu")
    data = {"path": str(_faces(tmp_path / "data"))}
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "out"))
    try:
        with pytest.raises(IPAKitError, match="connect Load Face Models"):
            train_mod.train_in_comfy(model, FakeClip(), FakeVae(), FakeClipVision(comfy), data, "faceid", False, 2, 1,
                                     1e-3, 64, 0.0, 0.0, 0.0, 0, 0, "faceid-run")
        out = train_mod.train_in_comfy(model, FakeClip(), FakeVae(), FakeClipVision(comfy), data, "faceid", False, 2,
                                       1, 1e-3, 64, 0.0, 0.0, 0.0, 0, 0, "faceid-run", face_models=faces).result
    finally:
        folder_paths.set_output_directory(old)
    trained, path = out[0], out[1]
    loaded = load_adapter(path)
    assert (loaded.config.projection, loaded.config.lora_rank, len(loaded.lora)) == ("faceid", 128, 16 * 2 * 8)
    ups = [t for k, t in loaded.lora.items() if ".up." in k]
    assert sum(bool(t.abs().max() > 0) for t in ups) > len(ups) // 2  # the LoRA trained (it starts at zero)
    assert all(not t.requires_grad for t in trained.lora.values())
    assert not any(m._forward_hooks for m in unet.modules())  # the LoRA's hooks are gone from the user's UNet
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
