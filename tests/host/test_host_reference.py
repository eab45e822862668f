"""In-process ComfyUI: animation batches, context windows, saved embeds, presets, regions and tiles on a real UNet."""

from __future__ import annotations

import importlib

import pytest
import torch

from ipa_train.errors import IPAKitError
from ipa_train.hosts.comfy.unet import encode_embeds
from ipa_train.hosts.frames import encode_per_frame

from . import test_host_patch as _patch

models = _patch.models  # the real-UNet fixture of the patch tests
_adapter, _eps = _patch._adapter, _patch._eps


def _mod(kit, name):
    return importlib.import_module(f"{kit.__name__}.nodes.{name}")


def _frames_case(unet, n=3, seed=5):
    adapter = _adapter(unet, "plain")
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(n, 1024, generator=g)
    x = torch.randn(n, 4, 8, 8, generator=g)  # small latents keep the full-size UNet quick on CPU
    ctx = torch.randn(1, 77, 768, generator=g)
    return adapter, clip, x, ctx


def _batch_gap(patcher, x, ctx, t):
    """The unpatched model's own difference between one batched call and per-row calls (kernel order only)."""
    n = x.shape[0]
    batched = _eps(patcher, torch.cat([x, x]), t.repeat(2 * n), ctx.expand(2 * n, -1, -1), [0, 1])
    single = _eps(patcher, torch.cat([x[:1]] * 2), t.repeat(2), ctx.expand(2, -1, -1), [0, 1])
    return (batched[[0, n]] - single).abs().max().item()


def test_unfolded_batch_gives_latent_i_the_prediction_of_reference_i(models, kit):
    apply_mod = _mod(kit, "apply")
    unet, patcher = models
    adapter, clip, x, ctx = _frames_case(unet)
    t = torch.tensor([400])
    per_frame = encode_per_frame(adapter, clip.split(2), torch.zeros(1, 1024))
    unfolded = apply_mod.apply(patcher, adapter, per_frame, "scaled", 0.9)
    batch = _eps(unfolded, torch.cat([x, x]), t.repeat(6), ctx.expand(6, -1, -1), [0, 1])
    gap = _batch_gap(patcher, x, ctx, t)
    for i in range(3):
        single_model = apply_mod.apply(patcher, adapter, encode_embeds(adapter, clip[i : i + 1], torch.zeros(1, 1024)), "scaled", 0.9)
        single = _eps(single_model, torch.cat([x[i : i + 1]] * 2), t.repeat(2), ctx.expand(2, -1, -1), [0, 1])
        # same math on the same rows; only the host's batched-vs-single kernel order differs (measured as `gap`)
        torch.testing.assert_close(batch[[i, i + 3]], single, rtol=0, atol=max(1e-5, 4 * gap))
        assert (batch[i] - batch[(i + 1) % 3]).abs().max() > 1e-3


def test_a_sampler_window_gets_its_frames_references(models, kit):
    """ComfyUI's context windows and AnimateDiff-Evolved's sub-batches: the window's rows get their frames' references."""
    from comfy.context_windows import IndexListContextWindow

    apply_mod = _mod(kit, "apply")
    unet, patcher = models
    adapter, clip, x, ctx = _frames_case(unet, n=4, seed=6)
    t = torch.tensor([600])
    unfolded = apply_mod.apply(patcher, adapter, encode_per_frame(adapter, [clip], torch.zeros(1, 1024)), "scaled", 1.0)
    idx = [3, 1]
    refs = []
    for frame in idx:
        ref_model = apply_mod.apply(patcher, adapter, encode_embeds(adapter, clip[frame : frame + 1], torch.zeros(1, 1024)), "scaled", 1.0)
        refs.append(_eps(ref_model, torch.cat([x[frame : frame + 1]] * 2), t.repeat(2), ctx.expand(2, -1, -1), [0, 1]))
    hosts = {"comfy_context_window": {"context_window": IndexListContextWindow(idx, dim=0, total_frames=4)},
             "animatediff_sub_idxs": {"ad_params": {"full_length": 4, "context_length": 2, "sub_idxs": idx}}}
    for host, extra in hosts.items():
        windowed = unfolded.clone()
        windowed.model_options["transformer_options"].update(extra)
        window = _eps(windowed, torch.cat([x[idx]] * 2), t.repeat(4), ctx.expand(4, -1, -1), [0, 1])
        for pos in range(len(idx)):
            torch.testing.assert_close(window[[pos, pos + 2]], refs[pos], rtol=0, atol=1e-4, msg=host)


def test_saved_and_loaded_embeds_predict_like_encoding_again(models, kit, tmp_path):
    import folder_paths

    apply_mod, embeds_mod = _mod(kit, "apply"), _mod(kit, "embeds")
    unet, patcher = models
    adapter, clip, x, ctx = _frames_case(unet, n=1, seed=7)
    t = torch.tensor([300, 300])
    embeds = encode_embeds(adapter, clip, torch.zeros(1, 1024))
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        path = embeds_mod.IPAKitSaveEmbeds.execute(embeds, adapter).result[0]
        names = embeds_mod.embeds_files()
        assert names == [f"ipadapter_kit_embeds/{path.rsplit('/', 1)[-1]} [output]"]
        loaded = embeds_mod.IPAKitLoadEmbeds.execute(names[0], adapter).result[0]
        other = _adapter(unet, "plus")
        with pytest.raises(IPAKitError, match="made for a 'plain' adapter .* connected adapter is 'plus'"):
            embeds_mod.IPAKitLoadEmbeds.execute(names[0], other)
    finally:
        folder_paths.set_output_directory(old)
    again = _eps(apply_mod.apply(patcher, adapter, embeds, "scaled", 0.8), torch.cat([x, x]), t, ctx.expand(2, -1, -1), [0, 1])
    reloaded = _eps(apply_mod.apply(patcher, adapter, loaded, "scaled", 0.8), torch.cat([x, x]), t, ctx.expand(2, -1, -1), [0, 1])
    assert torch.equal(again, reloaded)


def test_preset_with_a_missing_file_names_it_its_folder_and_source(models, kit, tmp_path, monkeypatch):
    import folder_paths

    presets_mod = _mod(kit, "presets")
    _, patcher = models
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda name: [])
    with pytest.raises(IPAKitError) as e:
        presets_mod.IPAKitPresetLoader.execute(patcher, "plus face")
    msg = str(e.value)
    assert "ip-adapter-plus-face_sd15.safetensors" in msg and "models/ipadapter" in msg and "h94/IP-Adapter" in msg
    monkeypatch.setattr(folder_paths, "get_filename_list",
                        lambda name: ["ip-adapter_sd15.safetensors"] if name == "ipadapter" else ["other.safetensors"])
    with pytest.raises(IPAKitError, match="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors .*models/clip_vision"):
        presets_mod.IPAKitPresetLoader.execute(patcher, "standard")


def test_zero_region_equals_unpatched_and_regions_combine(models, kit):
    regions_mod = _mod(kit, "regions")
    unet, patcher = models
    adapter, clip, x, ctx = _frames_case(unet, n=2, seed=8)
    t = torch.tensor([500, 500])
    inputs = (torch.cat([x[:1]] * 2), t, ctx.expand(2, -1, -1), [0, 1])
    base = _eps(patcher, *inputs)
    e0 = encode_embeds(adapter, clip[:1], torch.zeros(1, 1024))
    e1 = encode_embeds(adapter, clip[1:], torch.zeros(1, 1024))
    zero, _, _ = regions_mod.IPAKitRegion.execute(patcher, adapter, e0, torch.zeros(128, 128), 1.0).result
    assert torch.equal(_eps(zero, *inputs), base)
    left, right = torch.zeros(128, 128), torch.zeros(128, 128)
    left[:, :64], right[:, 64:] = 1, 1
    cond = [[ctx[:, :77], {}]]
    m1, pos, neg = regions_mod.IPAKitRegion.execute(patcher, adapter, e0, left, 1.0, positive=cond).result
    m2, _, _ = regions_mod.IPAKitRegion.execute(m1, adapter, e1, right, 1.0).result
    assert neg is None and torch.equal(pos[0][1]["mask"], left[None]) and "mask" not in cond[0][1]
    both, only_left = _eps(m2, *inputs), _eps(m1, *inputs)
    assert len(m2.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1)].entries) == 2
    assert (both - only_left).abs().max() > 1e-4 and (only_left - base).abs().max() > 1e-4


class _FakeClipVision:
    """CLIP vision stand-in: pooled output a fixed linear map of the mean colour (enough to tell tiles apart)."""

    image_size, image_mean = 224, [0.48145466, 0.4578275, 0.40821073]

    def __init__(self):
        self.proj = torch.randn(3, 1024, generator=torch.Generator().manual_seed(0))
        self.seen = []

    def encode_image(self, image, crop=True):
        self.seen.append(tuple(image.shape))
        pooled = image.mean(dim=(1, 2)) @ self.proj
        return {"image_embeds": pooled, "penultimate_hidden_states": pooled[:, None].expand(-1, 257, -1)[..., :1280]}


def test_tiled_apply_masks_cover_the_latent_once(models, kit):
    tiles_mod = _mod(kit, "tiles")
    unet, patcher = models
    adapter = _adapter(unet, "plain")
    image = torch.rand(1, 64, 160, 3, generator=torch.Generator().manual_seed(1))
    cv = _FakeClipVision()
    model, tiles, masks = tiles_mod.IPAKitApplyTiled.execute(patcher, adapter, cv, image, 0.8).result
    assert tiles.shape == (3, 224, 224, 3) and masks.shape == (3, 64, 160)
    assert torch.equal(masks.sum(0), torch.ones(64, 160)) and all(s == (1, 224, 224, 3) for s in cv.seen)
    entries = model.model_options["transformer_options"]["patches_replace"]["attn2"][("middle", 0)].entries
    assert len(entries) == 3
    x, t, ctx = torch.randn(2, 4, 8, 16), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    assert (_eps(model, x, t, ctx, [0, 1]) - _eps(patcher, x, t, ctx, [0, 1])).abs().max() > 1e-4


class _RecordingClipVision(_FakeClipVision):
    """Also records the crop flag: prepared images must reach the encoder at its size, with no second crop."""

    def encode_image(self, image, crop=True):
        self.seen.append(("crop", crop))
        pooled = image.mean(dim=(1, 2)) @ self.proj  # [N, 1024]
        g = torch.Generator().manual_seed(1)
        patches = torch.randn(257, 1280, generator=g)
        hidden = patches[None] * image.flatten(1).std(dim=1).view(-1, 1, 1) + image.mean(dim=(1, 2, 3)).view(-1, 1, 1)
        return {"image_embeds": pooled, "penultimate_hidden_states": hidden}


def test_encode_node_prep_options_and_enhance(models, kit):
    apply_mod, ref_mod = _mod(kit, "apply"), _mod(kit, "reference")
    unet, _ = models
    plus = _adapter(unet, "plus")
    image = torch.rand(1, 90, 150, 3, generator=torch.Generator().manual_seed(3))
    cv = _RecordingClipVision()
    neg = image[:, :50, :50]  # a negative keeps the fake encoder away from the zero-pixel call
    default = apply_mod.IPAKitEncodeImage.execute(plus, cv, image, "concat", "center", neg).result[0]
    assert ("crop", True) in cv.seen  # the original options keep ComfyUI's own preprocessing
    cv.seen.clear()
    left = apply_mod.IPAKitEncodeImage.execute(plus, cv, image, "concat", "left", neg, "lanczos", 0.5).result[0]
    assert cv.seen and all(s == ("crop", False) for s in cv.seen if s[0] == "crop")
    assert not torch.allclose(left.cond, default.cond)
    whole = ref_mod.encode_prepared(plus, cv, image, "concat", "right", neg)
    same = ref_mod.encode_prepared(plus, cv, image, "concat", "right", neg, enhance_tiles=3, enhance_ratio=1.0)
    mixed = ref_mod.encode_prepared(plus, cv, image, "concat", "right", neg, enhance_tiles=3, enhance_ratio=0.5)
    assert torch.equal(whole.cond, same.cond) and not torch.allclose(whole.cond, mixed.cond)
    prepped = ref_mod.IPAKitPrepImage.execute(image, "bottom", "nearest", 0.0, 64).result[0]
    assert prepped.shape == (1, 64, 64, 3)
    noise1 = ref_mod.IPAKitNoiseImage.execute("shuffle", 0.7, 1.0, 11, 32, 48, image).result[0]
    noise2 = ref_mod.IPAKitNoiseImage.execute("shuffle", 0.7, 1.0, 11, 32, 48, image).result[0]
    assert noise1.shape == (1, 48, 32, 3) and torch.equal(noise1, noise2)
    weights, text = _mod(kit, "frames").IPAKitWeightSchedule.execute(5, "linear", 0.0, 1.0).result
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0] and text.startswith("0.000, 0.250")
