"""SigLIP's attention-pooling head, read from a transformers SigLIP file, equals transformers' pooler_output."""

from __future__ import annotations

import torch

from ipa_train.adapter.siglip_head import find_head, head_tensors


def _tiny_siglip(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                             image_size=32, patch_size=8)
    model = SiglipVisionModel(cfg).eval()
    model.save_pretrained(tmp_path / "siglip", safe_serialization=True)
    return model, tmp_path / "siglip" / "model.safetensors"


def test_head_from_the_file_equals_transformers_pooler_output(tmp_path):
    model, path = _tiny_siglip(tmp_path)
    found = find_head([tmp_path / "nothing.bin", path], width=48, heads=4)
    assert found is not None and found[1] == str(path)
    head = found[0]
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=pixels)
        pooled = head(out.last_hidden_state)  # ComfyUI's SigLIP last_hidden_state: after post_layernorm, as here
    assert (pooled - out.pooler_output).abs().max() < 1e-5


def test_files_without_a_head_are_skipped(tmp_path):
    from safetensors.torch import save_file

    save_file({"vision_model.post_layernorm.weight": torch.ones(48)}, str(tmp_path / "sigclip.safetensors"))
    assert head_tensors(tmp_path / "sigclip.safetensors") == {}
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    assert find_head([tmp_path / "sigclip.safetensors", tmp_path / "broken.safetensors"], width=48) is None
    _, path = _tiny_siglip(tmp_path)
    assert find_head([path], width=1152) is None  # a head of another width does not fit
