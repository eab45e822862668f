"""FaceID projections equal diffusers' FaceID image projections (diffusers' own converter builds them from our keys)."""

from __future__ import annotations

import pytest
import torch

from ipa_train.adapter.config import AdapterConfig
from tests.factories import random_adapter

CROSS = 128  # two 64-wide heads in the perceiver, as diffusers derives heads from to_q


def _config(projection: str, tokens: int = 4) -> AdapterConfig:
    plus = projection in ("faceid-plus", "faceid-plusv2")
    return AdapterConfig(
        projection=projection, num_tokens=tokens, clip_embedding_dim=1280 if plus else 512, cross_attention_dim=CROSS,
        layer_hidden_sizes=(8, 8), clip_output="penultimate" if plus else "none", face_embedding_dim=512,
    )


def _diffusers_projection(adapter):
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    sd = {k[len("image_proj."):]: v for k, v in adapter.state_dict().items() if k.startswith("image_proj.")}
    return UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(None, sd, low_cpu_mem_usage=False).eval()


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(7)
    face = torch.randn(n, 512, generator=g)
    return face / face.norm(dim=-1, keepdim=True) * 3, torch.randn(n, 257, 1280, generator=g)


@pytest.mark.parametrize("projection,tokens", [("faceid", 4), ("faceid-portrait", 16)])
def test_mlp_projection_equals_diffusers(projection, tokens):
    adapter = random_adapter(_config(projection, tokens), seed=1)
    ref = _diffusers_projection(adapter)
    face, _ = _inputs()
    with torch.no_grad():
        ours = adapter.project_face(face)
        theirs = ref(face)
    assert ours.shape == (3, tokens, CROSS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection,scale", [("faceid-plus", 1.0), ("faceid-plusv2", 1.0), ("faceid-plusv2", 2.0)])
def test_plus_projection_equals_diffusers(projection, scale):
    adapter = random_adapter(_config(projection), seed=2)
    ref = _diffusers_projection(adapter)
    face, clip = _inputs()
    ref.clip_embeds = clip.unsqueeze(1)  # diffusers: [B, n_images, L, D]
    ref.shortcut = projection == "faceid-plusv2"
    ref.shortcut_scale = scale
    with torch.no_grad():
        ours = adapter.project_face(face, clip, shortcut_scale=scale)
        theirs = ref(face)
    assert ours.shape == (3, 4, CROSS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_plusv2_is_id_tokens_plus_scaled_perceiver():
    """`x + s * perceiver(x, clip)`: the difference between two scales is linear in s."""
    adapter = random_adapter(_config("faceid-plusv2"), seed=3)
    face, clip = _inputs(2)
    with torch.no_grad():
        t0, t1, t3 = (adapter.project_face(face, clip, shortcut_scale=s) for s in (0.0, 1.0, 3.0))
        x = adapter.image_proj.norm(adapter.image_proj.proj(face).reshape(2, 4, CROSS))
    torch.testing.assert_close(t0, x)
    torch.testing.assert_close(t3 - t0, 3 * (t1 - t0), atol=1e-5, rtol=1e-5)


def test_unnorm_is_the_plus_resampler_over_the_raw_embedding():
    cfg = AdapterConfig(projection="faceid-portrait-unnorm", num_tokens=16, clip_embedding_dim=512,
                        cross_attention_dim=CROSS, layer_hidden_sizes=(8,), clip_output="none", face_embedding_dim=512)
    adapter = random_adapter(cfg, seed=4)
    ref = _diffusers_projection(adapter)  # diffusers reads the file as an IP-Adapter Plus resampler
    face, _ = _inputs()
    with torch.no_grad():
        ours = adapter.project_face(face * 20)  # raw ArcFace embeddings have norms around 20
        theirs = ref((face * 20).unsqueeze(1))
    assert ours.shape == (3, 16, CROSS)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def _community_projection_module():
    """The community pack's image_proj_models.py (GPL-3.0), run as an oracle from IPADAPTER_PLUS_PATH, never copied."""
    import importlib.util
    import os
    from pathlib import Path

    path = Path(os.environ.get("IPADAPTER_PLUS_PATH", "")) / "image_proj_models.py"
    if not path.is_file():
        pytest.skip("IPADAPTER_PLUS_PATH does not name a ComfyUI_IPAdapter_plus checkout")
    pytest.importorskip("einops")
    spec = importlib.util.spec_from_file_location("cubiq_image_proj_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("projection,scale", [("faceid", 1.0), ("faceid-plus", 1.0), ("faceid-plusv2", 2.0)])
def test_projection_equals_community_pack(projection, scale):
    cubiq = _community_projection_module()
    adapter = random_adapter(_config(projection), seed=5)
    sd = {k[len("image_proj."):]: v for k, v in adapter.state_dict().items() if k.startswith("image_proj.")}
    face, clip = _inputs()
    if projection == "faceid":
        ref = cubiq.MLPProjModelFaceId(cross_attention_dim=CROSS, id_embeddings_dim=512, num_tokens=4)
        ref.load_state_dict(sd)
        with torch.no_grad():
            theirs = ref.eval()(face.unsqueeze(1))  # the community pack feeds [N, 1, 512]
            ours = adapter.project_face(face)
    else:
        ref = cubiq.ProjModelFaceIdPlus(cross_attention_dim=CROSS, id_embeddings_dim=512, clip_embeddings_dim=1280, num_tokens=4)
        ref.load_state_dict(sd)
        with torch.no_grad():
            theirs = ref.eval()(face, clip, scale=scale, shortcut=projection == "faceid-plusv2")
            ours = adapter.project_face(face, clip, shortcut_scale=scale)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
