"""FaceID in a real ComfyUI: the embedded LoRA through ComfyUI's LoRA machinery, and our FaceID path against the
community pack's FaceID node (run in-process as an oracle; its middle-block key corrected in memory; insightface 2.1
for it, our onnxruntime pipeline for us, both on the same tiny stand-in face models and image)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import warnings

import pytest
import torch

from ipa_train import save_adapter
from ipa_train.adapter.config import AdapterConfig, ResamplerConfig
from ipa_train.adapter.formats import load_adapter

from ..face_standins import face_image, write_pack
from ..faceid_factories import random_lora
from ..factories import random_adapter, tiny_unet
from .conftest import tiny_comfy_model
from .test_host_community_parity import _inputs, _layer_hidden, middle_fixed  # noqa: F401
from .test_host_patch import _eps

ATOL = 1e-4
LORA_SIZE = 0.1  # each LoRA delta about a tenth of its layer's weight: moves eps by ~0.2 (SD1.5) / ~0.7 (SDXL)


def _eps_patched(patcher, x, t, ctx, order):
    """eps with the model's weight patches (LoRA) applied, as sampling loads it."""
    patcher.patch_model()
    try:
        return _eps(patcher, x, t, ctx, order)
    finally:
        patcher.unpatch_model()


def _kohya_lora(adapter, family: str) -> dict[str, torch.Tensor]:
    """The adapter's own LoRA keys as a separate `_lora` file in the kohya naming a LoRA loader reads
    (`lora_unet_<diffusers module with _>.lora_{up,down}.weight`). Processor i is named by diffusers' own processor
    order (`attn_processors` of a diffusers UNet of the same layout), as h94 converted its `_lora` files, so this
    file is independent of our site order and ComfyUI key naming."""
    names = list(tiny_unet(family).attn_processors)
    out = {}
    for k, t in adapter.lora.items():
        i, rest = k.split(".", 1)
        proj, part = rest[len("to_"):].split("_lora.")
        module = names[int(i)][: -len(".processor")] + (".to_out.0" if proj == "out" else f".to_{proj}")
        out[f"lora_unet_{module.replace('.', '_')}.lora_{part}"] = t
    return out


def _adapter(patcher, projection, tmp_path, context=768, seed=1, clip_dim=1024, name=None):
    hidden = _layer_hidden(patcher)
    plus = projection in ("faceid-plus", "faceid-plusv2")
    cfg = AdapterConfig(projection=projection, num_tokens=16 if projection == "faceid-portrait" else 4,
                        clip_embedding_dim=clip_dim if plus else 512, cross_attention_dim=context,
                        layer_hidden_sizes=hidden, clip_output="penultimate" if plus else "none", face_embedding_dim=512,
                        resampler=ResamplerConfig(context, 4, context // 64, 64, 4) if plus else None)
    adapter = random_adapter(cfg, seed=seed)
    if projection != "faceid-portrait":
        adapter.lora = random_lora(hidden, context, rank=4, seed=seed, scale=LORA_SIZE, relative=True)
    path = save_adapter(adapter, tmp_path / (name or f"ip-adapter-{projection}_{seed}.safetensors"))
    return load_adapter(path), path


@pytest.fixture(scope="module")
def sd15(comfy):
    return tiny_comfy_model(comfy, "sd15")


@pytest.fixture(scope="module")
def faceid_mod(kit):
    return importlib.import_module(kit.__name__ + ".nodes.faceid")


@pytest.fixture(scope="module")
def apply_mod(kit):
    return importlib.import_module(kit.__name__ + ".nodes.apply")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_embedded_lora_equals_core_lora_loader(comfy, faceid_mod, tmp_path, family, caplog):
    import comfy.sd

    patcher = tiny_comfy_model(comfy, family)
    context = 768 if family == "sd15" else 2048
    adapter, _ = _adapter(patcher, "faceid", tmp_path, context)
    x, ctx, t = _inputs(context=context)
    base = _eps_patched(patcher, x, t, ctx, [1, 0])
    ours = faceid_mod.apply_face_lora(patcher, adapter, 0.6)
    n_layers = len(adapter.lora) // 2
    assert len(ours.patches) == n_layers  # every q/k/v/out of every attn1 and attn2
    core, _ = comfy.sd.load_lora_for_models(patcher, None, _kohya_lora(adapter, family), 0.6, 0)
    assert len(core.patches) == n_layers  # the separate file, named in diffusers' processor order, loads whole
    e_ours, e_core = _eps_patched(ours, x, t, ctx, [1, 0]), _eps_patched(core, x, t, ctx, [1, 0])
    assert (e_ours - base).abs().max() > 1e-3
    torch.testing.assert_close(e_ours, e_core, rtol=0, atol=1e-5)
    # strength 0 is the model itself; the LoRA on top of the same separate file is warned about
    assert faceid_mod.apply_face_lora(patcher, adapter, 0.0) is patcher
    with caplog.at_level(logging.WARNING):
        faceid_mod.apply_face_lora(core, adapter, 1.0)
    assert "applied twice" in caplog.text


def test_weight_and_strength_zero_is_exactly_the_unpatched_model(sd15, faceid_mod, apply_mod, tmp_path):
    from ipa_train.hosts.face_embeds import encode_face_embeds

    adapter, _ = _adapter(sd15, "faceid", tmp_path)
    x, ctx, t = _inputs()
    embeds = encode_face_embeds(adapter, torch.nn.functional.normalize(torch.randn(1, 512), dim=-1))
    m = faceid_mod.apply_face_lora(apply_mod.apply(sd15, adapter, embeds, weight=0.0), adapter, 0.0)
    assert torch.equal(_eps_patched(m, x, t, ctx, [1, 0]), _eps_patched(sd15, x, t, ctx, [1, 0]))


@pytest.fixture(scope="module")
def face_setup(tmp_path_factory):
    """Stand-in face models for both sides, and one reference image (as a ComfyUI IMAGE)."""
    insightface_app = pytest.importorskip("insightface.app")
    from ipa_train.face import FaceModels

    root = tmp_path_factory.mktemp("insightface")
    folder = write_pack(root / "models" / "tiny_l")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = insightface_app.FaceAnalysis(name="tiny_l", root=str(root), providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=0, det_size=(640, 640))
    image = torch.from_numpy(face_image(240, 320, faces=((64, 96, 96),), seed=4)).float()[None] / 255.0
    return FaceModels(folder, "cpu"), app, image


@pytest.fixture(scope="module")
def clip_vision(comfy):
    """The host suite's random CLIP ViT-L/14 vision model (hidden width 1024), loaded by ComfyUI."""
    import comfy.clip_vision

    from .test_host_server import _write_models

    return comfy.clip_vision.load(str(_write_models(comfy)["clip_vision"]))


CASES = [pytest.param(f, p, s, None, id=f"{f}-{p}-{s}")
         for f in ("sd15", "sdxl")
         for p, s in (("faceid", None), ("faceid-plus", None), ("faceid-plusv2", 1.0), ("faceid-plusv2", 2.0),
                      ("faceid-portrait", None))]
# The other variants' controls on FaceID tokens: a weight type, embeds scaling, start/end and an attention mask
# (left half of the picture), the same on both sides.
CONTROLS = dict(weight_type="ease in-out", embeds_scaling="K+mean(V) w/ C penalty", start_at=0.0, end_at=0.9,
                attn_mask=torch.cat([torch.ones(1, 64, 32), torch.zeros(1, 64, 32)], dim=2))
CASES += [pytest.param("sd15", "faceid", None, CONTROLS, id="sd15-faceid-controls"),
          pytest.param("sd15", "faceid-portrait", None, dict(references=2), id="sd15-faceid-portrait-2-references")]


@pytest.fixture(scope="module")
def models_by_family(comfy):
    return {}


def _family_model(comfy, models_by_family, family):
    if family not in models_by_family:
        models_by_family[family] = tiny_comfy_model(comfy, family)
    return models_by_family[family]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_parity_setup_resolves_the_bar(comfy, faceid_mod, apply_mod, models_by_family, tmp_path, family):
    """The parity below can only tell 1e-4 apart on a well-conditioned model: one ulp more in every image token must
    move eps far less than the bar, while the LoRA at the compared strength moves it far more. A LoRA much larger
    than its layers (entries of a fixed std on SDXL's 2048-wide text K/V) turns the 140 attention layers of the SDXL
    layout chaotic: fp32 rounding, and one ulp in the tokens, then move eps by O(1) whatever the code does."""
    from ipa_train.hosts.face_embeds import encode_face_embeds

    patcher = _family_model(comfy, models_by_family, family)
    context = 768 if family == "sd15" else 2048
    adapter, _ = _adapter(patcher, "faceid", tmp_path, context)
    x, ctx, t = _inputs(context=context)
    face = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(5)), dim=-1)
    embeds = encode_face_embeds(adapter, face)
    nudged = dataclasses.replace(embeds, cond=torch.nextafter(embeds.cond, torch.full_like(embeds.cond, torch.inf)))
    e = [_eps_patched(faceid_mod.apply_face_lora(m, adapter, 0.6), x, t, ctx, [1, 0])
         for m in (patcher, apply_mod.apply(patcher, adapter, embeds, weight=0.8),
                   apply_mod.apply(patcher, adapter, nudged, weight=0.8))]
    lora_effect = (e[0] - _eps_patched(patcher, x, t, ctx, [1, 0])).abs().max().item()
    ulp_effect = (e[1] - e[2]).abs().max().item()
    print(f"{family}: LoRA moves eps by {lora_effect:.2e}, one ulp in the tokens by {ulp_effect:.2e}")
    assert lora_effect > 0.05
    assert ulp_effect < ATOL / 5


@pytest.mark.slow
@pytest.mark.parametrize("family,projection,s,controls", CASES)
def test_faceid_matches_community_pack(comfy, kit, cubiq, middle_fixed, faceid_mod, apply_mod, face_setup,  # noqa: F811
                                       clip_vision, models_by_family, tmp_path, family, projection, s, controls):
    """Same file, same face image and stand-in face models, LoRA at the community pack's 0.6 on both sides (theirs
    from the separate `_lora` file through core's loader); its black-image unconditional CLIP for plus. Both image
    branches run on ComfyUI's attention kernel; what is left is the perceiver's attention (ours SDPA as diffusers,
    theirs tencent's split-scale product), a rounding difference (on these models one ulp in the tokens moves eps by
    ~4e-6: test_parity_setup_resolves_the_bar). Under inference mode,
    as ComfyUI runs nodes (without it every CLIP vision call here kept its autograd graph: gigabytes per case)."""
    with torch.inference_mode():
        gap, effect = _community_case(cubiq, middle_fixed, faceid_mod, apply_mod, face_setup, clip_vision,
                                      _family_model(comfy, models_by_family, family), tmp_path, family, projection, s,
                                      controls or {})
    print(f"{family} {projection} s={s} {sorted(controls or {})}: max |eps ours - eps community| = {gap:.2e}")
    assert effect > 1e-3
    assert gap <= ATOL


def _community_case(cubiq, plus_mod, faceid_mod, apply_mod, face_setup, clip_vision, patcher, tmp_path, family,
                    projection, s, controls):
    """-> (max |eps ours - eps theirs|, max |eps ours - eps of the LoRA'd model without the adapter|)."""
    import comfy.sd

    utils, _ = cubiq
    models, app, image = face_setup
    controls = dict(controls)
    if controls.pop("references", 1) == 2:  # a batch of two face images: their tokens concatenated on both sides
        other = torch.from_numpy(face_image(240, 320, faces=((40, 150, 110),), seed=9)).float()[None] / 255.0
        image = torch.cat([image, other])
    context = 768 if family == "sd15" else 2048
    name = f"ip-adapter-{projection}_{family}.safetensors"
    adapter, path = _adapter(patcher, projection, tmp_path, context, clip_dim=1024, name=name)
    x, ctx, t = _inputs(context=context)
    strength = 0.6
    embeds, crops = faceid_mod.encode_faces(adapter, models, image, clip_vision, faceid_v2_weight=s or 1.0,
                                            plus_uncond=faceid_mod.PLUS_UNCOND[1])
    size = 224 if family == "sd15" else 256
    assert crops.shape == (len(image), size, size, 3)
    assert embeds.cond.shape[1] == adapter.config.num_tokens * len(image)  # concat: every face's tokens
    ours = faceid_mod.apply_face_lora(apply_mod.apply(patcher, adapter, embeds, weight=0.8, **controls), adapter,
                                     strength)
    model = patcher
    if adapter.lora:  # the community pack's users add the separate LoRA with core's loader
        model, _ = comfy.sd.load_lora_for_models(patcher, None, _kohya_lora(adapter, family), strength, 0)
    cv2 = pytest.importorskip("cv2")
    use_ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)  # OpenCV's own warp kernel, which our crops equal byte for byte
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = plus_mod.ipadapter_execute(model.clone(), utils.ipadapter_model_loader(str(path)), clip_vision,
                                                insightface=app, image=image, weight=0.8, weight_faceidv2=s,
                                                **controls)[0]
    finally:
        cv2.ipp.setUseIPP(use_ipp)
    e_ours, e_theirs = _eps_patched(ours, x, t, ctx, [1, 0]), _eps_patched(theirs, x, t, ctx, [1, 0])
    base = _eps_patched(model, x, t, ctx, [1, 0])  # with the LoRA: the adapter's own effect must show too
    if controls:  # they must change what the adapter does, or matching them would prove nothing
        plain = faceid_mod.apply_face_lora(apply_mod.apply(patcher, adapter, embeds, weight=0.8), adapter, strength)
        assert (_eps_patched(plain, x, t, ctx, [1, 0]) - e_ours).abs().max() > 1e-2
    return (e_ours - e_theirs).abs().max().item(), (e_ours - base).abs().max().item()
