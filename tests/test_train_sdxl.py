"""SDXL training conditioning without a host: each target's size/crop ids, the batches' `time_ids`, the
diffusers backbone's two text encoders and pooled embedding, and a short run on a tiny SDXL-layout model."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipa_train.hosts.backbone_diffusers import DiffusersBackbone
from ipa_train.training.data import load_dataset, resize_short_side, target_and_size, target_pixels
from ipa_train.training.train import Conditioning, TextCondition, TrainConfig, train
from tests.factories import tiny_unet

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "ipa_train" / "demo_data"
RES = 32


def _picture(w: int, h: int) -> Image.Image:
    g = torch.Generator().manual_seed(w * 1000 + h)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _signed(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1  # [3, H, W] in [-1, 1]


@pytest.mark.parametrize("size, random_crop, random_flip", [((60, 30), False, False), ((45, 70), True, False),
                                                             ((80, 40), True, True), ((40, 40), False, True)])
def test_size_ids_locate_the_target_in_the_resized_image(size, random_crop, random_flip):
    img = _picture(*size)
    resized = resize_short_side(img, 20, Image.Resampling.BILINEAR)
    for seed in range(6):
        pixels, ids = target_and_size(img, 20, random_crop, random_flip, random.Random(seed))
        assert torch.equal(pixels, target_pixels(img, 20, random_crop, random_flip, random.Random(seed)))  # same draws
        orig_h, orig_w, top, left, th, tw = (int(v) for v in ids)
        assert (orig_w, orig_h) == size and (th, tw) == (20, 20)
        shown = resized.crop((left, top, left + 20, top + 20))
        mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((left, top, left + 20, top + 20))
        assert torch.allclose(pixels, _signed(shown), atol=1e-6) or (random_flip and torch.allclose(pixels, _signed(mirrored), atol=1e-6))


class SizeBackbone:
    """Encoders of fixed random tables (no model) for checking what the batches carry."""

    device = torch.device("cpu")
    num_train_timesteps = 1000

    def __init__(self, size_conditioning: bool = True):
        self.size_conditioning = size_conditioning

    class sizes:  # noqa: N801 - a stand-in for BackboneSizes
        @staticmethod
        def clip_embedding_dim(output):
            return 5

    def encode_latents(self, pixels):
        mean = pixels[:, :, ::8, ::8].mean(1, keepdim=True).expand(-1, 4, -1, -1)
        return mean, torch.zeros_like(mean)

    def encode_text(self, captions):
        hidden = torch.stack([torch.full((3, 6), float(len(c))) for c in captions])
        return TextCondition(hidden, {"text_embeds": hidden[:, 0, :4] + 1})

    def encode_image(self, clip_pixels, output):
        return clip_pixels.mean((2, 3))[:, :1].expand(-1, 5).clone()

    def release(self, parts):
        pass


@pytest.mark.parametrize("random_crop", [False, True])  # latents cached / encoded per batch
def test_batches_carry_each_samples_size_ids(random_crop):
    ds = load_dataset(DEMO_DATA, resolution=RES, random_crop=random_crop)
    cfg = TrainConfig(output_dir="unused", resolution=RES, drop_text=0.5, drop_image=0, drop_both=0)
    cond = Conditioning(SizeBackbone(), ds, cfg)
    assert (cond.moments is not None) == (not random_crop)
    indices = [0, 3, 1, 4]
    rng = random.Random(5)
    batch = cond.batch(indices, rng)
    ids = batch.text.extra["time_ids"]
    assert ids.shape == (4, 6) and batch.text.extra["text_embeds"].shape == (4, 4)
    if random_crop:  # the crops drawn for this batch: replay the draws
        replay = random.Random(5)
        from ipa_train.training.conditioning import drop_decisions

        drop_decisions(len(indices), cfg, replay)
        expected = torch.stack([ds.target_and_size(i, replay)[1] for i in indices])
    else:
        expected = torch.stack([ds.target_and_size(i)[1] for i in indices])
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)
    for row, i in zip(ids.tolist(), indices):  # the file's own size, whatever the caption drop
        with Image.open(ds.samples[i].path) as im:
            assert row[:2] == [im.height, im.width] and row[4:] == [RES, RES]
    plain = Conditioning(SizeBackbone(size_conditioning=False), ds, cfg).batch(indices, random.Random(5))
    assert "time_ids" not in plain.text.extra


def _sdxl_components(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ipa_train.toy import tiny

    tok = CLIPTokenizer.from_pretrained(str(tiny.write_tokenizer(tmp_path / "tok")))
    v = len(tok)
    common = dict(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=tiny.MAX_TOKENS, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)
    torch.manual_seed(1)
    te1 = CLIPTextModel(CLIPTextConfig(**common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, projection_dim=32))  # pooled width of tiny_unet("sdxl")
    return {"unet": tiny_unet("sdxl"), "vae": tiny.tiny_vae(), "text_encoder": te1, "tokenizer": tok,
            "text_encoder_2": te2, "tokenizer_2": tok, "scheduler": tiny.tiny_scheduler(),
            "image_encoder": tiny.tiny_image_encoder()}


def test_diffusers_sdxl_text_is_both_encoders_and_the_pooled_projection(tmp_path):
    parts = _sdxl_components(tmp_path)
    backbone = DiffusersBackbone(device="cpu", components=dict(parts), keep_encoders=True)
    assert backbone.size_conditioning
    text = backbone.encode_text(["a cat", "the dog"])
    ids = parts["tokenizer"](["a cat", "the dog"], max_length=parts["tokenizer"].model_max_length,
                             padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        one = parts["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]
        two = parts["text_encoder_2"](ids, output_hidden_states=True)
    torch.testing.assert_close(text.hidden, torch.cat([one, two.hidden_states[-2]], -1))
    torch.testing.assert_close(text.extra["text_embeds"], two.text_embeds)
    sd15 = DiffusersBackbone(device="cpu", components={**parts, "unet": tiny_unet("sd15")}, keep_encoders=True)
    assert not sd15.size_conditioning and not sd15.encode_text(["a cat"]).extra


def test_training_on_a_tiny_sdxl_model_reaches_the_size_conditioning(tmp_path):
    parts = _sdxl_components(tmp_path)
    backbone = DiffusersBackbone(device="cpu", components=parts)
    seen = []
    real = backbone.predict

    def predict(noisy, timesteps, text, ip_tokens):
        seen.append(dict(text.extra))
        return real(noisy, timesteps, text, ip_tokens)

    backbone.predict = predict
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), steps=1, batch_size=2, resolution=RES, save_every=0, log_every=0)
    result = train(cfg, backbone, load_dataset(DEMO_DATA, resolution=RES))
    assert result.steps == 1 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(seen) == 1 and all(e["time_ids"].shape == (2, 6) and e["text_embeds"].shape == (2, 32) for e in seen)
