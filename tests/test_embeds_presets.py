"""Embeds files (ours and the community's .ipadpt) and preset file lookup, host-free."""

from __future__ import annotations

import pickle

import pytest
import torch

from ipa_train.adapter import embeds_file, presets
from ipa_train.adapter.config import AdapterConfig
from ipa_train.errors import IPAKitError

PLAIN = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=20, cross_attention_dim=24,
                      layer_hidden_sizes=(16,) * 3)
PLUS = AdapterConfig(projection="plus", num_tokens=4, clip_embedding_dim=20, cross_attention_dim=24,
                     layer_hidden_sizes=(16,) * 3, clip_output="penultimate")


def test_embeds_round_trip_is_exact_and_records_the_adapter(tmp_path):
    cond, uncond = torch.randn(3, 4, 24), torch.randn(1, 4, 24)
    path = embeds_file.write_embeds(tmp_path / "e.safetensors", cond, uncond, PLAIN, num_images=3)
    got = embeds_file.read_embeds(path)
    assert got.kind == "kit" and torch.equal(got.cond, cond) and torch.equal(got.uncond, uncond)
    assert got.metadata["variant"] == "plain" and got.metadata["num_images"] == "3"
    embeds_file.check_embeds_for(got, PLAIN)
    with pytest.raises(IPAKitError, match=r"e.safetensors: made for a 'plain' adapter .* connected adapter is 'plus'"):
        embeds_file.check_embeds_for(got, PLUS)
    with pytest.raises(IPAKitError, match="only"):
        embeds_file.write_embeds(tmp_path / "e.pt", cond, uncond, PLAIN)


def test_foreign_or_broken_files_give_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(IPAKitError, match="not an IP-Adapter Kit embeds file"):
        embeds_file.read_embeds(tmp_path / "other.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(IPAKitError, match="cannot read it as safetensors"):
        embeds_file.read_embeds(tmp_path / "cut.safetensors")
    with pytest.raises(IPAKitError, match="not found"):
        embeds_file.read_embeds(tmp_path / "missing.ipadpt")


def test_community_ipadpt_is_read_without_running_pickles(tmp_path):
    clip = torch.randn(2, 5, 20)
    torch.save(clip, tmp_path / "theirs.ipadpt")  # what the community's IPAdapterSaveEmbeds writes
    got = embeds_file.read_embeds(tmp_path / "theirs.ipadpt")
    assert got.kind == "community" and torch.equal(got.clip, clip)

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil.ipadpt").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(IPAKitError, match="refused.*nothing of it was executed"):
        embeds_file.read_embeds(tmp_path / "evil.ipadpt")
    assert not (tmp_path / "pwned").exists()
    torch.save({"a": torch.zeros(1)}, tmp_path / "dict.ipadpt")
    with pytest.raises(IPAKitError, match="expected one CLIP output tensor"):
        embeds_file.read_embeds(tmp_path / "dict.ipadpt")


ADAPTERS = ["sub/ip-adapter_sd15.safetensors", "IP-Adapter-Plus_SD15.bin", "ip_adapter_sdxl_vit_h.safetensors",
            "ip-adapter_sd15_light_v11.bin", "my.safetensors"]
CLIPS = ["clip_vision_g.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]


@pytest.mark.parametrize("preset,family,adapter,clip", [
    ("standard", "sd15", "sub/ip-adapter_sd15.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("plus", "sd15", "IP-Adapter-Plus_SD15.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("standard", "sdxl", "ip_adapter_sdxl_vit_h.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    ("light", "sd15", "ip-adapter_sd15_light_v11.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
])
def test_preset_finds_official_names_and_renames(preset, family, adapter, clip):
    assert presets.find_preset(preset, family, ADAPTERS, CLIPS)[:2] == (adapter, clip)


def test_preset_missing_files_name_file_folder_and_source():
    with pytest.raises(IPAKitError) as e:
        presets.find_preset("plus face", "sd15", ADAPTERS, CLIPS)
    msg = str(e.value)
    assert "ip-adapter-plus-face_sd15.safetensors" in msg and "models/ipadapter" in msg and "huggingface.co/h94/IP-Adapter" in msg
    with pytest.raises(IPAKitError, match=r"CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors.*models/clip_vision.*sdxl_models/image_encoder"):
        presets.find_preset("vit-G", "sd15", ["ip-adapter_sd15_vit-G.safetensors"], ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"])
    with pytest.raises(IPAKitError, match="no official 'full face' adapter for sdxl"):
        presets.find_preset("full face", "sdxl", ADAPTERS, CLIPS)
    assert presets.family_of_context_dim(2048) == "sdxl"
    with pytest.raises(IPAKitError, match="1024"):
        presets.family_of_context_dim(1024)


def test_faceid_presets_find_files_and_list_each_missing_one():
    from ipa_train.adapter.presets import find_faceid_preset

    adapters = ["sub/ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid_sdxl.safetensors"]
    clips = ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]
    assert find_faceid_preset("faceid plus v2", "sd15", adapters, clips, ["buffalo_l"]) == (
        "sub/ip-adapter-faceid-plusv2_sd15.bin", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "buffalo_l")
    assert find_faceid_preset("faceid", "sdxl", adapters, [], ["buffalo_l"])[1] is None
    with pytest.raises(IPAKitError) as e:
        find_faceid_preset("faceid plus", "sd15", [], [], [])
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 3
    assert "ip-adapter-faceid-plus_sd15.bin -> ComfyUI/models/ipadapter" in lines[0]
    assert "models/clip_vision" in lines[1] and "models/insightface/models/buffalo_l" in lines[2]
    assert all("(from https://" in line for line in lines), lines  # each line gives its download page
    assert "det_10g.onnx" in lines[2] and "non-commercial" in lines[2]
    with pytest.raises(IPAKitError, match="no official 'faceid plus' adapter for sdxl"):
        find_faceid_preset("faceid plus", "sdxl", adapters, clips, ["buffalo_l"])


DIT_ADAPTERS = ["FLUX.1-dev-IP-Adapter/ip-adapter.bin", "SD3.5-Large-IP-Adapter.bin", "flux-ip-adapter-v2.safetensors",
                "sub/flux-ip-adapter/ip_adapter.safetensors", "ip-adapter.bin"]
DIT_CLIPS = ["siglip-so400m-patch14-384/model.safetensors", "sigclip_vision_patch14_384.safetensors",
             "CLIP-ViT-L-14.safetensors"]


@pytest.mark.parametrize("preset,family,adapter,clip", [
    ("instantx", "flux", "FLUX.1-dev-IP-Adapter/ip-adapter.bin", "siglip-so400m-patch14-384/model.safetensors"),
    ("instantx", "sd3", "SD3.5-Large-IP-Adapter.bin", "sigclip_vision_patch14_384.safetensors"),
    ("xlabs v1", "flux", "sub/flux-ip-adapter/ip_adapter.safetensors", "CLIP-ViT-L-14.safetensors"),
    ("xlabs v2", "flux", "flux-ip-adapter-v2.safetensors", "CLIP-ViT-L-14.safetensors"),
])
def test_dit_presets_find_published_names_in_their_folders_and_renames(preset, family, adapter, clip):
    assert presets.find_preset(preset, family, DIT_ADAPTERS, DIT_CLIPS)[:2] == (adapter, clip)


def test_a_bare_published_dit_name_is_not_taken_for_either_instantx_file():
    """ip-adapter.bin is the published name of both InstantX files: alone it is neither preset's file."""
    with pytest.raises(IPAKitError, match="FLUX.1-dev-IP-Adapter"):
        presets.find_preset("instantx", "flux", ["ip-adapter.bin"], DIT_CLIPS)
    with pytest.raises(IPAKitError, match="SD3.5-Large-IP-Adapter"):
        presets.find_preset("instantx", "sd3", ["ip-adapter.bin", "FLUX.1-dev-IP-Adapter.bin"], DIT_CLIPS)


def test_dit_preset_lists_every_missing_file_with_folder_and_page():
    with pytest.raises(IPAKitError) as e:
        presets.find_preset("instantx", "flux", [], ["sigclip_vision_patch14_384.safetensors"])
    lines = str(e.value).splitlines()
    assert len(lines) == 3, lines  # the heading, then one line per missing file
    assert "ip-adapter.bin -> ComfyUI/models/ipadapter/FLUX.1-dev-IP-Adapter/" in lines[1]
    assert "huggingface.co/InstantX/FLUX.1-dev-IP-Adapter" in lines[1]
    assert "siglip-so400m-patch14-384.safetensors" in lines[2] and "models/clip_vision" in lines[2]
    assert "pooling head" in lines[2] and "google/siglip-so400m-patch14-384" in lines[2]
    with pytest.raises(IPAKitError, match=r"ViT-L/14.*models/clip_vision.*openai/clip-vit-large-patch14"):
        presets.find_preset("xlabs v2", "flux", DIT_ADAPTERS, [])
    with pytest.raises(IPAKitError, match="no official 'xlabs v1' adapter for sd3 models; presets for sd3: instantx"):
        presets.find_preset("xlabs v1", "sd3", DIT_ADAPTERS, DIT_CLIPS)
    with pytest.raises(IPAKitError, match="presets for flux: instantx, xlabs v1, xlabs v2"):
        presets.find_preset("standard", "flux", DIT_ADAPTERS, DIT_CLIPS)
    with pytest.raises(IPAKitError, match="presets exist for SD1.5, SDXL, Flux and SD3.5 models, not for this WAN21"):
        presets.find_preset("instantx", "WAN21", DIT_ADAPTERS, DIT_CLIPS)
