"""The existing load / encode / apply nodes take the Flux and SD3.5 files, in-process inside ComfyUI."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from ipa_train.errors import BaseModelMismatchError, EncoderMismatchError, IPAKitError

from .. import dit_factories as fac
from .dit_models import FLUX, tiny_flux


@pytest.fixture()
def nodes(kit, tmp_path, monkeypatch):
    """The kit's node modules, with models/ipadapter and models/clip_vision in tmp_path."""
    import folder_paths

    folders = {"ipadapter": tmp_path / "ipadapter", "clip_vision": tmp_path / "clip_vision"}
    for d in folders.values():
        d.mkdir()
    monkeypatch.setattr(folder_paths, "get_full_path_or_raise", lambda kind, name: str(folders[kind] / name))
    monkeypatch.setattr(folder_paths, "get_full_path", lambda kind, name: str(folders[kind] / name))
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda kind: sorted(p.name for p in folders[kind].iterdir()))
    mods = {n: importlib.import_module(f"{kit.__name__}.nodes.{n}") for n in ("loaders", "apply", "dit")}
    mods["dit"]._HEADS.clear()
    return mods, folders


class FakeClipVision:
    """encode_image as ComfyUI's CLIP_VISION returns it, for an encoder of the given widths."""

    def __init__(self, embeds_width=768, hidden=(257, 1024)):
        self.embeds_width, self.hidden = embeds_width, hidden
        self.images = []

    def encode_image(self, image, crop=True):
        self.images.append(image)
        n = image.shape[0]
        seed = int(image.sum().item() * 1000) % 10000
        g = torch.Generator().manual_seed(seed)
        return {"image_embeds": torch.randn(n, self.embeds_width, generator=g),
                "penultimate_hidden_states": torch.randn(n, *self.hidden, generator=g),
                "last_hidden_state": torch.randn(n, *self.hidden, generator=g)}


def _xlabs(folders):
    state = fac.xlabs_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=4, blocks=FLUX["depth"])
    fac.write(state, folders["ipadapter"] / "ip_adapter.safetensors")
    return "ip_adapter.safetensors"


def test_loader_info_line_names_family_format_encoder_tokens(nodes):
    mods, folders = nodes
    adapter, info = mods["loaders"].load(_xlabs(folders))
    text = mods["loaders"].describe(info)
    assert all(s in text for s in ("xlabs-flux", "flux", "ViT-L/14", "4 tokens", "2 blocks")), text
    fac.write(fac.instantx_sd3(blocks=2), folders["ipadapter"] / "ip-adapter.bin")
    _, info = mods["loaders"].load("ip-adapter.bin")
    text = mods["loaders"].describe(info)
    assert all(s in text for s in ("instantx-sd3", "sd3", "SigLIP-so400m/14-384", "64 tokens")), text


def test_encode_and_apply_xlabs_through_the_nodes(nodes, comfy):
    mods, folders = nodes
    adapter, _ = mods["loaders"].load(_xlabs(folders))
    image = torch.rand(1, 32, 32, 3)
    clip = FakeClipVision()
    embeds = mods["apply"].encode(adapter, clip, image)
    assert embeds.format == "xlabs-flux" and embeds.cond.shape == (1, 768)
    assert float(clip.images[-1].abs().sum()) == 0.0  # the negative is a black image, as XLabs
    _, patcher = tiny_flux(comfy)
    m = mods["apply"].apply(patcher, adapter, embeds, weight=0.7, layers="custom", layer_weights="1:1.0")
    dit = m.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(dit) == [("double_block", 0), ("double_block", 1)]
    assert dit[("double_block", 0)].entries[0][0].weights == [0.0, 0.7]
    fused = mods["apply"].apply(patcher, adapter, embeds, mode="fused", fusion_lambda=0.5)
    dit = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    assert dit[("double_block", 0)].entries[0][0].fused
    for kwargs, words in ((dict(frame_weights=[1.0, 0.5]), "frame_weights: Flux models make one image per latent"),
                          (dict(weight_type="style transfer"), "weight_type 'style transfer' is a SD1.5/SDXL"),
                          (dict(attn_mask=torch.ones(2, 8, 8)), "Flux models take one mask")):
        with pytest.raises(IPAKitError, match=words) as e:
            mods["apply"].apply(patcher, adapter, embeds, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(IPAKitError, match="block 5 does not exist"):
        mods["apply"].apply(patcher, adapter, embeds, layers="custom", layer_weights="5:1")


def test_per_frame_encoding_and_a_unet_adapter_on_flux_are_refused_by_name(nodes, comfy, kit):
    mods, folders = nodes
    adapter, _ = mods["loaders"].load(_xlabs(folders))
    frames = importlib.import_module(f"{kit.__name__}.nodes.frames")
    with pytest.raises(IPAKitError, match="Encode Reference Per Frame: Flux models make one image per latent") as e:
        frames.IPAKitEncodeFrames.execute(adapter, FakeClipVision(), torch.rand(3, 32, 32, 3))
    assert "\n" not in str(e.value)
    unet_adapter = SimpleNamespace(config=SimpleNamespace(variant="plain", family="sd15"))  # what the refusal reads
    _, patcher = tiny_flux(comfy)
    with pytest.raises(BaseModelMismatchError, match="a UNet\\), but the model is a Flux model") as e:
        mods["apply"].apply(patcher, unet_adapter, None)
    assert "\n" not in str(e.value)


def test_wrong_encoder_and_wrong_model_are_one_line(nodes, comfy):
    mods, folders = nodes
    adapter, _ = mods["loaders"].load(_xlabs(folders))
    with pytest.raises(EncoderMismatchError, match=r"needs ViT-L/14 image_embeds.*ViT-H/14") as e:
        mods["apply"].encode(adapter, FakeClipVision(embeds_width=1024), torch.rand(1, 32, 32, 3))
    assert "\n" not in str(e.value)
    from .conftest import tiny_comfy_model

    unet = tiny_comfy_model(comfy, "sd15")
    embeds = mods["apply"].encode(adapter, FakeClipVision(), torch.rand(1, 32, 32, 3))
    with pytest.raises(BaseModelMismatchError, match="made for Flux, but the model is a UNet model") as e:
        mods["apply"].apply(unet, adapter, embeds)
    assert "\n" not in str(e.value)


def test_instantx_flux_pooled_output_needs_the_siglip_head(nodes):
    mods, folders = nodes
    fac.write(fac.instantx_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=8, blocks=4),
              folders["ipadapter"] / "ip-adapter.bin")
    adapter, info = mods["loaders"].load("ip-adapter.bin")
    assert info["encoder"] == "SigLIP-so400m/14-384" and info["clip_output"] == "siglip_pooled"
    siglip = FakeClipVision(hidden=(729, 1152))
    save_file({"vision_model.post_layernorm.weight": torch.ones(1152)}, str(folders["clip_vision"] / "sigclip.safetensors"))
    with pytest.raises(EncoderMismatchError, match="no .safetensors file in ComfyUI/models/clip_vision has it") as e:
        mods["apply"].encode(adapter, siglip, torch.rand(1, 32, 32, 3))
    assert "\n" not in str(e.value) and "vision_model.head" in str(e.value)
    g = torch.Generator().manual_seed(0)
    head = {"probe": torch.randn(1, 1, 1152, generator=g), "attention.in_proj_weight": torch.randn(3456, 1152, generator=g) * 0.03,
            "attention.in_proj_bias": torch.zeros(3456), "attention.out_proj.weight": torch.randn(1152, 1152, generator=g) * 0.03,
            "attention.out_proj.bias": torch.zeros(1152), "layernorm.weight": torch.ones(1152), "layernorm.bias": torch.zeros(1152),
            "mlp.fc1.weight": torch.randn(64, 1152, generator=g) * 0.03, "mlp.fc1.bias": torch.zeros(64),
            "mlp.fc2.weight": torch.randn(1152, 64, generator=g) * 0.1, "mlp.fc2.bias": torch.zeros(1152)}
    save_file({f"vision_model.head.{k}": v for k, v in head.items()}, str(folders["clip_vision"] / "siglip-so400m.safetensors"))
    embeds = mods["apply"].encode(adapter, siglip, torch.rand(2, 32, 32, 3))
    assert embeds.cond.shape == (2, 1152) and torch.equal(embeds.uncond, torch.zeros(1, 1152))


def test_preset_loader_takes_the_flux_files_by_the_model_family(nodes, comfy, monkeypatch):
    """The preset node on a Flux model: the XLabs v2 preset loads the (renamed) XLabs file and the ViT-L/14 file; a
    missing file is one line with its folder and page; a SD1.5 preset on Flux names the Flux presets."""
    import comfy.clip_vision

    mods, folders = nodes
    presets_mod = importlib.import_module(f"{mods['loaders'].__package__}.presets")
    state = fac.xlabs_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=16, blocks=FLUX["depth"])
    fac.write(state, folders["ipadapter"] / "flux-ip-adapter-v2.safetensors")
    _, patcher = tiny_flux(comfy)
    with pytest.raises(IPAKitError, match=r"clip-vit-large-patch14.safetensors \(ViT-L/14\) -> ComfyUI/models/clip_vision"):
        presets_mod.IPAKitPresetLoader.execute(patcher, "xlabs v2")
    (folders["clip_vision"] / "clip-vit-large-patch14.safetensors").write_bytes(b"")
    monkeypatch.setattr(comfy.clip_vision, "load", lambda path: ("clip vision", path))
    out = presets_mod.IPAKitPresetLoader.execute(patcher, "xlabs v2")
    adapter, clip, info, face_models = out.result
    assert face_models is None
    assert adapter.config.format == "xlabs-flux" and adapter.config.num_tokens == 16
    assert clip[1].endswith("clip-vit-large-patch14.safetensors")
    assert info == "xlabs v2 (flux): flux-ip-adapter-v2.safetensors + clip-vit-large-patch14.safetensors (ViT-L/14)"
    with pytest.raises(IPAKitError, match="no official 'plus' adapter for flux models; presets for flux: instantx"):
        presets_mod.IPAKitPresetLoader.execute(patcher, "plus")
