"""FaceID tokens as ImageEmbeds (several faces, merges, frames, uncond) and the LoRA renamed for ComfyUI's key map."""

from __future__ import annotations

import pytest
import torch

from ipa_train.adapter.config import AdapterConfig
from ipa_train.adapter.faceid_lora import comfy_lora_state
from ipa_train.adapter.layout import known_sites
from ipa_train.errors import IPAKitError
from ipa_train.hosts.face_embeds import encode_face_embeds
from tests.faceid_factories import random_lora
from tests.factories import random_adapter


def _adapter(projection: str, tokens: int = 4, cross: int = 64):
    plus = projection in ("faceid-plus", "faceid-plusv2")
    cfg = AdapterConfig(projection=projection, num_tokens=tokens, clip_embedding_dim=32 if plus else 512,
                        cross_attention_dim=cross, layer_hidden_sizes=(8, 8), face_embedding_dim=512,
                        clip_output="penultimate" if plus else "none", face_hidden_dim=16)
    return random_adapter(cfg, seed=3)


def _faces(n: int, seed: int = 0) -> torch.Tensor:
    f = torch.randn(n, 512, generator=torch.Generator().manual_seed(seed))
    return f / f.norm(dim=-1, keepdim=True)


def test_portrait_concatenates_16_tokens_per_face_and_uncond_is_zero_faces():
    adapter = _adapter("faceid-portrait", tokens=16)
    faces = _faces(3)
    e = encode_face_embeds(adapter, faces)
    assert e.cond.shape == (1, 48, 64) and e.uncond.shape == (1, 48, 64) and e.groups == 3
    with torch.no_grad():
        torch.testing.assert_close(e.cond[0, 16:32], adapter.project_face(faces[1:2])[0])
        torch.testing.assert_close(e.uncond[0, :16], adapter.project_face(torch.zeros(1, 512))[0])


def test_merges_combine_face_embeddings_before_the_projection():
    adapter = _adapter("faceid")
    faces = _faces(2)
    e = encode_face_embeds(adapter, faces, method="average", weights=[1.0, 0.5])
    with torch.no_grad():
        want = adapter.project_face(((faces[0] + 0.5 * faces[1]) / 2)[None])
    assert e.cond.shape == (1, 4, 64)
    torch.testing.assert_close(e.cond, want)


def test_plus_uses_the_crop_clip_states_and_the_given_uncond():
    adapter = _adapter("faceid-plusv2")
    faces = _faces(2)
    g = torch.Generator().manual_seed(1)
    clip, neg = torch.randn(2, 9, 32, generator=g), torch.randn(1, 9, 32, generator=g)
    e = encode_face_embeds(adapter, faces, clip, neg, shortcut_scale=2.0)
    with torch.no_grad():
        want_c = adapter.project_face(faces, clip, shortcut_scale=2.0).reshape(1, 8, 64)
        want_u = adapter.project_face(torch.zeros(2, 512), neg.expand(2, -1, -1), shortcut_scale=2.0).reshape(1, 8, 64)
    torch.testing.assert_close(e.cond, want_c)
    torch.testing.assert_close(e.uncond, want_u)
    other = encode_face_embeds(adapter, faces, clip, torch.zeros_like(neg), shortcut_scale=2.0)
    assert not torch.allclose(other.uncond, e.uncond)


def test_per_frame_rows_and_reference_weights():
    adapter = _adapter("faceid")
    faces = _faces(3)
    frames = encode_face_embeds(adapter, faces, per_frame=True)
    assert frames.cond.shape == (3, 4, 64) and frames.uncond.shape == (1, 4, 64)
    weighted = encode_face_embeds(adapter, faces, weights=[1.0, 0.0, 2.0])
    assert weighted.token_weights.tolist() == [1.0] * 4 + [0.0] * 4 + [2.0] * 4


def test_face_embeds_refuse_a_plain_adapter():
    from tests.factories import OFFICIAL, official_config

    plain = random_adapter(official_config(OFFICIAL[0]))
    with pytest.raises(IPAKitError, match="need a FaceID adapter; this one is plain"):
        encode_face_embeds(plain, _faces(1))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_names_equal_diffusers_processor_names(kind):
    """Our renaming of `{i}.to_X_lora.*` equals what diffusers' own FaceID loader names them, for both UNet layouts."""
    from tests.factories import tiny_unet

    unet = tiny_unet(kind)
    sites = known_sites(kind)
    lora = random_lora(tuple(8 for _ in sites), 16, rank=2)
    theirs = unet._load_ip_adapter_loras([{"ip_adapter": lora}])[0]
    ours = comfy_lora_state(lora, sites)
    assert len(ours) == 8 * 2 * len(sites)
    assert set(ours) == set(theirs)
    for k, t in ours.items():
        assert t is theirs[k]


def test_embeds_and_adapter_must_both_be_faceid_or_neither():
    from ipa_train.hosts.comfy.unet import ImageEmbeds
    from ipa_train.hosts.face_embeds import check_embeds_fit
    from tests.factories import OFFICIAL, official_config

    face = _adapter("faceid")
    plain = random_adapter(official_config(OFFICIAL[0]))
    face_embeds = encode_face_embeds(face, _faces(1))
    plain_embeds = ImageEmbeds(torch.zeros(1, 4, 768), torch.zeros(1, 4, 768), "plain")
    check_embeds_fit(face, face_embeds)
    check_embeds_fit(plain, plain_embeds)
    with pytest.raises(IPAKitError, match=r"these are FaceID embeds \(faceid\) but the adapter is plain"):
        check_embeds_fit(plain, face_embeds)
    with pytest.raises(IPAKitError, match=r"this faceid adapter needs FaceID embeds from Encode Face"):
        check_embeds_fit(face, plain_embeds)


def test_plus_options_on_a_portrait_adapter_are_named():
    from ipa_train.hosts.face_embeds import check_face_options

    portrait = _adapter("faceid-portrait", tokens=16).config
    with pytest.raises(IPAKitError, match=r"image_negative: this faceid-portrait adapter reads no CLIP image"):
        check_face_options(portrait, True, 1.0)
    with pytest.raises(IPAKitError, match=r"faceid_v2_weight is 2, but this faceid-portrait adapter has no plus v2"):
        check_face_options(portrait, False, 2.0)
    check_face_options(_adapter("faceid-plusv2").config, True, 2.0)
