"""Half-precision models in-process, computing in fp16 / bf16 as on a GPU (on CPU, ComfyUI itself would pick fp32
compute; here the tiny model is built with the half dtype as its compute dtype, or fp8 storage cast to fp16).

- every node, run twice (the second run as a queued-again prompt with the same cached adapter), finishes and
  leaves the adapter, embeds, masks and weights it was given exactly as they were (dtype, device, values);
- the patched half-precision prediction is close to the same weights in fp32 (tolerance below), weight 0 is the
  unpatched half-precision model exactly, and the image K/V are cast once per apply, not at every step;
- training on a half-precision model keeps the adapter fp32 and writes the same file format as from fp32.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ipa_train.adapter.config import AdapterConfig
from ipa_train.errors import IPAKitError

from ..factories import random_adapter
from .conftest import tiny_comfy_model
from .server import write_dataset
from .test_host_community_parity import _layer_hidden
from .test_host_patch import _eps

# name -> (weight dtype, manual-cast compute dtype or None = the weight dtype)
DTYPES = {"fp16": (torch.float16, None), "bf16": (torch.bfloat16, None), "fp8": (torch.float8_e4m3fn, torch.float16)}
CLIP_DIM, TOKENS = 64, 8  # the stand-in CLIP vision: 64-wide embeds and hidden states, 8 hidden tokens


class TinyVision(torch.nn.Module):
    """ComfyUI's CLIP vision model call: model(pixel_values=..., intermediate_output=-2) -> (last, penultimate,
    image_embeds), computed in `dtype` (fp16 = a CLIP vision model loaded in half precision)."""

    def __init__(self, dtype=torch.float16):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.proj = torch.nn.Parameter((torch.randn(3 * 4, CLIP_DIM * TOKENS, generator=g) / 4).to(dtype), requires_grad=False)
        # read for the output widths, as on ComfyUI's CLIP vision model: no projection, so image_embeds has the width
        self.vision_model = torch.nn.Module()
        self.vision_model.post_layernorm = torch.nn.LayerNorm(CLIP_DIM)

    def forward(self, pixel_values, intermediate_output=None):
        small = torch.nn.functional.adaptive_avg_pool2d(pixel_values.to(self.proj.dtype), 2).flatten(1)  # [N, 12]
        hidden = (small @ self.proj).view(-1, TOKENS, CLIP_DIM)
        return hidden, hidden, hidden.mean(1)


class FakeClipVision:
    """Stands in for ComfyUI's CLIP_VISION (encode_image, .model, .patcher, .load_device, .image_size)."""

    image_size = 32

    def __init__(self, comfy):
        cpu = torch.device("cpu")
        self.model = TinyVision()
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=cpu, offload_device=cpu)
        self.load_device = cpu

    def encode_image(self, image, crop=True):
        _, hidden, embeds = self.model(image.permute(0, 3, 1, 2))
        return {"image_embeds": embeds, "penultimate_hidden_states": hidden}


class FakeClip:
    """ComfyUI's CLIP as training uses it: tokenize / encode_from_tokens -> [1, 77, 768] in fp16 (--fp16-text-enc)."""

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens):
        g = torch.Generator().manual_seed(len(tokens))
        return torch.randn(1, 77, 768, generator=g).half()


class FakeVae:
    """An exact, parameter-free 8x VAE stand-in: IMAGE [B, H, W, 3] <-> latents [B, 4, H/8, W/8]."""

    def encode(self, image):
        x = torch.nn.functional.avg_pool2d(image.permute(0, 3, 1, 2).float(), 8)
        return torch.cat([x, x.mean(1, keepdim=True)], 1) * 2 - 1

    def decode(self, latent):
        x = torch.nn.functional.interpolate(latent[:, :3].float(), scale_factor=8)
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def _mods(kit):
    return {n: importlib.import_module(f"{kit.__name__}.nodes.{n}")
            for n in ("apply", "frames", "style_composition", "tiles", "regions", "embeds", "evaluate", "train", "presets")}


def _adapter(model, projection="plain", fusion=True, seed=3):
    from ipa_train.adapter.config import ResamplerConfig

    plus = projection == "plus"
    cfg = AdapterConfig(projection=projection, num_tokens=4, clip_embedding_dim=CLIP_DIM, cross_attention_dim=768,
                        layer_hidden_sizes=_layer_hidden(model), fusion=fusion,
                        clip_output="penultimate" if plus else "image_embeds",
                        resampler=ResamplerConfig(dim=64, depth=1, heads=2, dim_head=16, ff_mult=1) if plus else None)
    return random_adapter(cfg, seed=seed)


def _snapshot(values):
    return [(v.dtype, v.device, v.detach().clone()) if isinstance(v, torch.Tensor) else list(v) for v in values]


def _assert_unchanged(before, values, what):
    for i, (b, v) in enumerate(zip(before, values)):
        if isinstance(v, torch.Tensor):
            assert (b[0], b[1]) == (v.dtype, v.device) and torch.equal(b[2], v), f"{what}[{i}] changed"
        else:
            assert b == list(v), f"{what}[{i}] changed"


def _sample(model, batch=1, seed=0, size=16):
    import comfy.sample

    g = torch.Generator().manual_seed(11)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    latent = torch.zeros(batch, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", pos, neg, latent, seed=seed, disable_pbar=True)
    assert torch.isfinite(out).all()
    return out


@pytest.fixture(scope="module", params=list(DTYPES))
def half(comfy, request):
    dtype, cast = DTYPES[request.param]
    return request.param, tiny_comfy_model(comfy, "sd15", dtype=dtype, manual_cast=cast)


def test_every_node_twice_leaves_what_it_was_given_unchanged(comfy, kit, half, tmp_path, monkeypatch):
    """encode, encode frames, apply (scaled with a mask, fused with per-frame embeds and weights), simple, style &
    composition, tiles, region, embeds save/load, weight sweep and evaluate on a half-precision model, then all of
    it again with another reference (a queued-again prompt); the shared objects never change."""
    import folder_paths

    m = _mods(kit)
    _, model = half
    real_list = folder_paths.get_filename_list
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda name: [] if name == "ipadapter" else real_list(name))
    adapter, clip = _adapter(model), FakeClipVision(comfy)
    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1
    weights = m["frames"].IPAKitWeightSchedule.execute(3, "linear", 0.2, 1.0).result[0]
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        for _ in range(2):  # the second time: a queued-again prompt with other images
            image, frames = torch.rand(2, 64, 64, 3, generator=g), torch.rand(3, 64, 64, 3, generator=g)
            embeds = m["apply"].IPAKitEncodeImage.execute(adapter, clip, image, "average").result[0]
            per_frame = m["frames"].IPAKitEncodeFrames.execute(adapter, clip, frames, 2, "center", "lanczos", 0.3).result[0]
            given = [*adapter.state_dict().values(), embeds.cond, embeds.uncond, per_frame.cond, mask, image, weights]
            before = _snapshot(given)
            path = m["embeds"].IPAKitSaveEmbeds.execute(embeds, adapter).result[0]
            listed = next(n for n in m["embeds"].embeds_files() if n.endswith(path.rsplit("/", 1)[-1] + " [output]"))
            loaded = m["embeds"].IPAKitLoadEmbeds.execute(listed, adapter).result[0]
            assert path and torch.equal(loaded.cond, embeds.cond)
            patched = [
                m["apply"].apply(model, adapter, embeds, "scaled", 0.8, attn_mask=mask),
                m["apply"].apply(model, adapter, per_frame, "fused", 0.8, 0.6, frame_weights=weights),
                m["apply"].apply(model, adapter, loaded, "scaled", 0.5, weight_type="style transfer precise", second=1.0),
                m["apply"].IPAKitApplySimple.execute(model, adapter, clip, image, 0.8, "fused").result[0],
                m["style_composition"].IPAKitApplyStyleComposition.execute(model, adapter, clip, image, frames[:1]).result[0],
                m["tiles"].IPAKitApplyTiled.execute(model, adapter, clip, torch.rand(1, 64, 96, 3, generator=g)).result[0],
                m["regions"].IPAKitRegion.execute(model, adapter, embeds, mask, 0.8, "fused").result[0],
            ]
            for p in patched:
                _sample(p, batch=3)
            sweep = m["evaluate"].run_sweep(model, adapter, embeds, image[:1], [[torch.zeros(1, 77, 768), {}]],
                                            [[torch.zeros(1, 77, 768), {}]], {"samples": torch.zeros(1, 4, 16, 16)},
                                            FakeVae(), weights="0, 1", seeds_per_point=2, steps=1, clip_vision=clip)
            m["evaluate"].evaluate_and_save(sweep[1], image[:1], "", "", clip)
            with pytest.raises(IPAKitError, match="ip-adapter_sd15.safetensors"):  # the family read off a half model
                m["presets"].IPAKitPresetLoader.execute(model, "standard")
            _assert_unchanged(before, given, "inputs")
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in adapter.parameters())
    finally:
        folder_paths.set_output_directory(old)


def _app(patched):
    from ipa_train.hosts.comfy.unet import Attn2Replace

    attn2 = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    return next(p for p in attn2.values() if isinstance(p, Attn2Replace)).entries[-1][0]


def _case(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    clip = torch.randn(1, CLIP_DIM, generator=g)
    return torch.cat([x, x]), ctx.expand(2, -1, -1), clip


# Largest prediction difference (max |eps_half - eps_fp32|, on the same stored weights) the patch may add on top of
# the unpatched model's own: half-precision rounding of the image K/V and attention (fp16: 11-bit mantissa,
# relative 2^-11 = 4.9e-4 per op; bf16: 8-bit, 2^-8 = 3.9e-3) accumulates over the 16 layers like the text
# attention's does, so the patched error stays within 2x the unpatched one plus one rounding step of the output.
HALF_TOLERANCE = {"fp16": 2e-3, "bf16": 2e-2, "fp8": 2e-3}


def test_half_prediction_matches_fp32_and_weight_zero_is_exact(comfy, kit, half):
    from ipa_train.hosts.comfy.unet import encode_embeds

    apply_mod = _mods(kit)["apply"]
    name, model = half
    reference = tiny_comfy_model(comfy, "sd15")
    stored = model.model.diffusion_model.state_dict()
    reference.model.diffusion_model.load_state_dict({k: v.float() for k, v in stored.items()})  # same weights, fp32
    adapter = _adapter(model, fusion=False)
    x, ctx, clip = _case(model)
    t = torch.tensor([500, 500])
    embeds = encode_embeds(adapter, clip, torch.zeros(1, CLIP_DIM))
    for mode in ("scaled", "fused"):
        ours = _eps(apply_mod.apply(model, adapter, embeds, mode, 1.0, 0.8), x, t, ctx, [0, 1])
        full = _eps(apply_mod.apply(reference, adapter, embeds, mode, 1.0, 0.8), x, t, ctx, [0, 1])
        base_err = (_eps(model, x, t, ctx, [0, 1]) - _eps(reference, x, t, ctx, [0, 1])).abs().max().item()
        err = (ours - full).abs().max().item()
        effect = (full - _eps(reference, x, t, ctx, [0, 1])).abs().max().item()
        assert effect > 10 * HALF_TOLERANCE[name], "the adapter must change the prediction for this test to mean anything"
        assert err <= 2 * base_err + HALF_TOLERANCE[name], (name, mode, err, base_err)
    zero = apply_mod.apply(model, adapter, embeds, "scaled", 0.0)
    assert torch.equal(_eps(zero, x, t, ctx, [0, 1]), _eps(model, x, t, ctx, [0, 1]))


def test_image_kv_cast_once_per_apply_in_the_compute_dtype(comfy, kit, half):
    from ipa_train.hosts.comfy.unet import encode_embeds

    apply_mod = _mods(kit)["apply"]
    name, model = half
    compute = DTYPES[name][1] or DTYPES[name][0]
    adapter = _adapter(model, fusion=False)
    x, ctx, clip = _case(model)
    patched = apply_mod.apply(model, adapter, encode_embeds(adapter, clip, torch.zeros(1, CLIP_DIM)), "scaled", 0.8)
    app = _app(patched)
    _sample(patched)
    made = dict(app._copies._items)
    assert made and {k[1] for k in made} == {compute}
    _sample(patched, seed=1)  # another run of the same prompt: the same copies, no new casts
    assert app._copies._items.keys() == made.keys() and all(app._copies._items[k] is v for k, v in made.items())
    assert all(v.dtype == torch.float32 for layers in app.kv.values() for kv in layers if kv for v in kv)


def _train(m, model, adapter, clip, data, out, name):
    import folder_paths

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    try:
        return m["train"].train_in_comfy(model, FakeClip(), FakeVae(), clip, {"path": str(data)}, "plain", True, 2, 1,
                                         1e-4, 64, 0.0, 0.0, 0.0, 0, 0, name, adapter).result
    finally:
        folder_paths.set_output_directory(old)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_training_on_a_half_model_trains_fp32_and_writes_the_fp32_format(comfy, kit, tmp_path, name):
    from safetensors import safe_open

    from ipa_train.adapter.formats import build_adapter, detect_config, read_adapter_state
    from ipa_train.hosts.comfy.unet import encode_embeds

    m = _mods(kit)
    model = tiny_comfy_model(comfy, "sd15", dtype=DTYPES[name][0])
    full = tiny_comfy_model(comfy, "sd15")
    clip = FakeClipVision(comfy)
    data = write_dataset(tmp_path / "data", 2)
    start = _adapter(model, seed=4)
    before = _snapshot(start.state_dict().values())
    trained, path, _, _ = _train(m, model, start, clip, data, tmp_path / "half", "half")
    _, path32, _, _ = _train(m, full, start, clip, data, tmp_path / "full", "full")
    _assert_unchanged(before, start.state_dict().values(), "the fine-tuned adapter")
    assert all(p.dtype == torch.float32 for p in trained.parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
    assert moved > 5e-5, "the adapter did not train (weight decay alone moves it by about 1e-8)"
    with safe_open(path, "pt") as f, safe_open(path32, "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert all(f.get_slice(k).get_dtype() == g.get_slice(k).get_dtype() == "F32" for k in f.keys())
        assert all(f.get_slice(k).get_shape() == g.get_slice(k).get_shape() for k in f.keys())
        assert set(f.metadata()) == set(g.metadata())
    state = read_adapter_state(path)
    loaded = build_adapter(state, detect_config(state)).float().eval()
    x, ctx, clip_in = _case(model)
    patched = m["apply"].apply(model, loaded, encode_embeds(loaded, clip_in, torch.zeros(1, CLIP_DIM)), "fused", 0.8)
    _sample(patched)
