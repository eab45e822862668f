"""Files written by this kit load in the community pack's (cubiq/ComfyUI_IPAdapter_plus) loader and model.

Runs when IPADAPTER_PLUS_PATH names a checkout of that pack (it is GPL-3.0: read and run, never copied here).
"""

from __future__ import annotations

import pytest
import torch

from ipa_train import save_adapter
from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
from ipa_train.adapter.layout import known_sites

from ..factories import random_adapter


@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_kit_file_with_fusion_weights_loads_in_community_pack(cubiq, tmp_path, projection):
    utils, plus_mod = cubiq
    hidden = tuple(s.hidden for s in known_sites("sd15"))
    cfg = AdapterConfig(projection=projection, num_tokens=4 if projection == "plain" else 16,
                        clip_embedding_dim=1024 if projection == "plain" else 1280, cross_attention_dim=768,
                        layer_hidden_sizes=hidden, clip_output="image_embeds" if projection == "plain" else "penultimate",
                        fusion=True, resampler=ResamplerConfig(768, 4, 12, 64, 4) if projection == "plus" else None)
    ours = random_adapter(cfg, seed=5)
    path = save_adapter(ours, tmp_path / f"kit-{projection}.safetensors")
    model = utils.ipadapter_model_loader(str(path))
    assert set(model["ip_adapter"]) == {k[len("ip_adapter."):] for k in ours.state_dict() if k.startswith("ip_adapter.")}
    theirs = plus_mod.IPAdapter(model, cross_attention_dim=768,  # cubiq: 1280 only for SDXL plus
                                output_cross_attention_dim=768, clip_embeddings_dim=cfg.clip_embedding_dim,
                                clip_extra_context_tokens=cfg.num_tokens, is_plus=projection == "plus")
    clip = torch.randn(1, 1024) if projection == "plain" else torch.randn(1, 257, 1280)
    with torch.no_grad():
        torch.testing.assert_close(theirs.image_proj_model(clip), ours.project(clip), rtol=1e-4, atol=1e-5)


def test_trained_faceid_export_loads_in_community_pack(cubiq, tmp_path):
    """A FaceID adapter as training exports it (projection, image K/V and the LoRA of every attention processor,
    saved by the training export) is a FaceID file to the community pack, and its projection gives our tokens."""
    from ipa_train.training.backbone import BackboneSizes
    from ipa_train.training.config import TrainConfig
    from ipa_train.training.faceid import FaceLoRA, face_adapter_config, lora_shapes

    utils, plus_mod = cubiq
    sizes = BackboneSizes(768, tuple(s.hidden for s in known_sites("sd15")), {})
    ours = random_adapter(face_adapter_config(TrainConfig(projection="faceid"), sizes), seed=6)
    lora = FaceLoRA(lora_shapes(sizes), 128)
    ours.lora = lora.tensors()
    path = save_adapter(ours, tmp_path / "ip-adapter-faceid-trained.safetensors")
    model = utils.ipadapter_model_loader(str(path))
    assert "0.to_q_lora.down.weight" in model["ip_adapter"] and "31.to_out_lora.up.weight" in model["ip_adapter"]
    theirs = plus_mod.IPAdapter(model, cross_attention_dim=768, output_cross_attention_dim=768, clip_embeddings_dim=512,
                                clip_extra_context_tokens=4, is_faceid=True)
    face = torch.nn.functional.normalize(torch.randn(2, 512), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(theirs.image_proj_model(face), ours.project_face(face), rtol=1e-4, atol=1e-5)
