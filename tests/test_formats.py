"""Official layouts in both containers, raw training checkpoints, round trips and refusals."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ipa_train import AdapterFormatError, inspect_file, load_adapter, save_adapter
from ipa_train.adapter.config import CONFIG_METADATA_KEY
from ipa_train.adapter.formats import read_adapter_state
from ipa_train.adapter.modules import IPAdapter
from ipa_train.hosts.diffusers_unet import cross_attention_names

from .factories import OFFICIAL, Official, adapter_for_unet, official_config, random_adapter, tiny_unet, write_official


@pytest.mark.parametrize("container", ["bin", "safetensors"])
@pytest.mark.parametrize("o", OFFICIAL, ids=[o.name for o in OFFICIAL])
def test_official_layout_detected_and_loaded(tmp_path, o: Official, container):
    path = tmp_path / f"{o.name}.{container}"
    groups = write_official(o, path, container)
    n_layers = 16 if o.family == "sd15" else 70
    assert len(groups["ip_adapter"]) == 2 * n_layers
    assert sorted({int(k.split(".")[0]) for k in groups["ip_adapter"]}) == list(range(1, 2 * n_layers, 2))

    info = inspect_file(path)
    assert info["family"] == o.family
    assert info["projection"] == o.projection
    assert info["num_tokens"] == o.tokens
    assert info["clip_embedding_dim"] == o.clip_dim
    assert info["clip_output"] == ("image_embeds" if o.projection == "plain" else "penultimate")
    assert info["encoder"] == o.encoder
    assert info["cross_attention_layers"] == n_layers
    assert info["fusion"] is False
    assert info["parameters"] == sum(t.numel() for g in groups.values() for t in g.values())

    adapter = load_adapter(path)
    sd = adapter.state_dict()
    for group, tensors in groups.items():
        for k, t in tensors.items():
            torch.testing.assert_close(sd[f"{group}.{k}"], t.float(), rtol=0, atol=0)


# Parameter counts of the real h94 files (reference notes section 9, matching the published file sizes).
REAL_COUNTS = {
    "ip-adapter_sd15": 22_319_616,
    "ip-adapter_sd15_vit-G": 23_106_048,
    "ip-adapter-full-face_sd15": 21_794_304,
    "ip-adapter-plus_sd15": 49_087_488,
    "ip-adapter_sdxl_vit-h": 349_188_096,
    "ip-adapter-plus_sdxl_vit-h": 423_748_864,
}


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_size_modules_match_official_parameter_counts(name):
    o = next(o for o in OFFICIAL if o.name == name)
    with torch.device("meta"):
        adapter = IPAdapter(official_config(o, real_size=True))
    assert adapter.num_parameters() == REAL_COUNTS[name]


def test_save_round_trip_with_fusion_and_metadata(tmp_path):
    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plus", fusion=True)
    path = save_adapter(adapter, tmp_path / "mine.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert {k.split(".")[0] for k in keys} == {"image_proj", "ip_adapter", "fusion"}
    assert json.loads(meta[CONFIG_METADATA_KEY])["projection"] == "plus"
    back = load_adapter(path)
    assert back.config == adapter.config
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    assert inspect_file(path)["fusion"] is True
    # no temporary file left behind by the atomic write
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # readable like any normally written file


def test_bin_round_trip_is_the_official_torch_layout(tmp_path):
    """`.bin`: the nested {"image_proj", "ip_adapter"} torch file of the releases, read back with weights_only;
    a fused adapter (its `fusion.*` weights have no place there) is refused in one line, nothing written."""
    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plus")
    path = save_adapter(adapter, tmp_path / "mine.bin")
    nested = torch.load(path, map_location="cpu", weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    back = load_adapter(path)
    assert back.config.projection == "plus"
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(AdapterFormatError, match=r"fused\.bin: this adapter has 'fusion\..*official \.bin"):
        save_adapter(adapter_for_unet(unet, "plain", fusion=True), tmp_path / "fused.bin")
    assert sorted(os.listdir(tmp_path)) == ["mine.bin"]


def test_saved_file_loads_in_diffusers_load_ip_adapter(tmp_path):
    """Our file (with fusion weights under their own prefix) loads through diffusers' public loader and
    gives the same projection output as our loader."""
    from diffusers import StableDiffusionPipeline

    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plain", fusion=True)
    save_adapter(adapter, tmp_path / "ours.safetensors")
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ours.safetensors", image_encoder_folder=None)
    embeds = torch.randn(2, adapter.config.clip_embedding_dim)
    with torch.no_grad():
        ref = unet.encoder_hid_proj.image_projection_layers[0](embeds)
        ours = load_adapter(tmp_path / "ours.safetensors").project(embeds)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def _nested(adapter: IPAdapter, prefix_map: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in adapter.state_dict().items():
        group, rest = k.split(".", 1)
        out[f"{prefix_map[group]}.{rest}"] = v.clone()
    return out


def test_raw_training_checkpoint(tmp_path):
    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plain")
    raw = _nested(adapter, {"image_proj": "image_proj_model", "ip_adapter": "adapter_modules"})
    raw.update({f"unet.{k}": v for k, v in list(unet.state_dict().items())[:5]})  # the frozen UNet rides along
    torch.save(raw, tmp_path / "pytorch_model.bin")
    state = read_adapter_state(tmp_path)  # an accelerate checkpoint folder
    assert state.source == "training-checkpoint"
    back = load_adapter(tmp_path / "pytorch_model.bin")
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_deduplicated_checkpoint_maps_processor_names_to_official_indices(tmp_path, kind):
    """accelerate's safetensors de-duplication leaves only unet.<...>.attn2.processor.to_k_ip keys."""
    unet = tiny_unet(kind)
    adapter = adapter_for_unet(unet, "plain")
    names = cross_attention_names(unet)
    flat = {f"image_proj_model.{k[len('image_proj.'):]}": v.clone() for k, v in adapter.state_dict().items() if k.startswith("image_proj.")}
    for i, name in enumerate(names):
        layer = adapter.layers[i]
        flat[f"unet.{name}.to_k_ip.weight"] = layer.to_k_ip.weight.detach().clone()
        flat[f"unet.{name}.to_v_ip.weight"] = layer.to_v_ip.weight.detach().clone()
    flat = dict(reversed(list(flat.items())))  # order in the file must not matter
    save_file(flat, str(tmp_path / "model.safetensors"))
    state = read_adapter_state(tmp_path / "model.safetensors")
    assert state.source == "training-checkpoint-deduplicated"
    assert len(state.ip_adapter) == 2 * len(names)
    back = load_adapter(tmp_path / "model.safetensors")
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_fused_training_checkpoint_with_top_level_query_key_value(tmp_path):
    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plus", fusion=True)
    groups = {"image_proj": {}, "ip_adapter": {}}
    for k, v in adapter.state_dict().items():
        g, rest = k.split(".", 1)
        if g == "fusion":
            groups[rest] = v  # query.weight, key.bias, ... at the top level
        else:
            groups[g][rest] = v
    flat = {}
    for k, v in groups.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp_path / "fused.safetensors"))
    back = load_adapter(tmp_path / "fused.safetensors")
    assert back.fusion is not None
    torch.testing.assert_close(back.fusion.query.weight, adapter.fusion.query.weight)


# ---------------------------------------------------------------------------------------------------------
# Refusals: each names the file and says what to do.


def _plain_file(tmp_path, name="a.safetensors"):
    o = next(o for o in OFFICIAL if o.name == "ip-adapter_sd15")
    path = tmp_path / name
    write_official(o, path, "safetensors")
    return path


def test_truncated_safetensors(tmp_path):
    path = _plain_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=r"a\.safetensors.*truncated.*download it again"):
        load_adapter(path)


def test_missing_keys(tmp_path):
    o = next(o for o in OFFICIAL if o.name == "ip-adapter-plus_sd15")
    groups = write_official(o, tmp_path / "x.bin", "bin")
    del groups["image_proj"]["layers.2.0.to_q.weight"]
    torch.save(groups, tmp_path / "x.bin")
    with pytest.raises(AdapterFormatError, match=r"x\.bin.*missing 1 keys.*layers\.2\.0\.to_q\.weight"):
        load_adapter(tmp_path / "x.bin")


def test_missing_layer_numbers(tmp_path):
    o = next(o for o in OFFICIAL if o.name == "ip-adapter_sd15")
    groups = write_official(o, tmp_path / "x.bin", "bin")
    del groups["ip_adapter"]["5.to_k_ip.weight"], groups["ip_adapter"]["5.to_v_ip.weight"]
    torch.save(groups, tmp_path / "x.bin")
    with pytest.raises(AdapterFormatError, match=r"x\.bin.*expected the odd numbers"):
        load_adapter(tmp_path / "x.bin")


def test_lora_file_refused(tmp_path):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "style_lora.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"style_lora\.safetensors.*LoRA file.*models/loras"):
        inspect_file(tmp_path / "style_lora.safetensors")


def test_empty_ip_adapter_group_explains_deduplication(tmp_path):
    save_file({"image_proj.proj.weight": torch.zeros(8, 4), "image_proj.norm.weight": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"c\.safetensors.*no 'ip_adapter'.*de-duplication"):
        load_adapter(tmp_path / "c.safetensors")


def test_sd_checkpoint_refused(tmp_path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(tmp_path / "v1-5.safetensors"))
    with pytest.raises(AdapterFormatError, match=r"v1-5\.safetensors.*Stable Diffusion checkpoint"):
        load_adapter(tmp_path / "v1-5.safetensors")


class _Evil:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"image_proj": {"proj.weight": _Evil(str(target))}}, f)
    with pytest.raises(AdapterFormatError, match=r"evil\.bin.*refused.*Nothing of it was executed"):
        load_adapter(path)
    assert not target.exists()


def test_wrong_extension_and_missing_file(tmp_path):
    with pytest.raises(AdapterFormatError, match="no such file"):
        load_adapter(tmp_path / "nope.safetensors")
    (tmp_path / "a.gguf").write_bytes(b"xx")
    with pytest.raises(AdapterFormatError, match=r"a\.gguf.*unsupported extension"):
        load_adapter(tmp_path / "a.gguf")
    adapter = random_adapter(official_config(OFFICIAL[0]))
    with pytest.raises(AdapterFormatError, match=r"out\.pt: adapters are written as \.safetensors \(or \.bin"):
        save_adapter(adapter, tmp_path / "out.pt")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
