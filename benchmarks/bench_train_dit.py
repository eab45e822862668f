"""Flux (XLabs format) and SD3.5 (InstantX format) rows of `bench_train.py`: our `train()` against a plain-PyTorch
loop of the same math, on tiny-but-not-trivial random models built offline from configs.

The models keep the families' layouts at reduced widths: Flux 512 wide (4 heads x 128), 4 double + 8 single
blocks, T5 512 wide, CLIP-L text 768 wide; SD3 384 wide (6 heads x 64), 6 joint blocks; the 16-channel 8x VAE;
image encoders at the official output widths (CLIP ViT-L projection 768, SigLIP 1152). Batch 1, fp32, CPU.

The reference is what an XLabs-style trainer does each step (no published Flux / SD3.5 IP-Adapter trainer runs
here; ../shared/reference/dit-adapters.md §6): every model loaded at once, VAE encode (sampled), text and image
encoders run every step, diffusers' transformer with diffusers' own IP-Adapter classes (XLabs:
`FluxIPAdapterAttnProcessor` + `ImageProjection`; SD3.5: `SD3IPAdapterJointAttnProcessor2_0` +
`IPAdapterTimeImageProjection`) loaded from the same start file, logit-normal sigmas, the flow-matching MSE,
AdamW every step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

FORMATS = {"flux": "xlabs-flux", "sd3": "instantx-sd3"}
T5 = 512
TEXT_TOKENS = 77  # per encoder, ours and the reference alike


def _t5(vocab: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=T5, d_kv=64, d_ff=1024, num_layers=2, num_heads=8))


def _clip_text(vocab: int, width: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or width)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 64, 64),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16, sample_size=256,
                         scaling_factor=0.3611, shift_factor=0.1159)


def _image_encoder(family: str):
    if family == "flux":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=224, patch_size=14, hidden_size=256,
                                                              intermediate_size=512, num_hidden_layers=4,
                                                              num_attention_heads=4, projection_dim=768))
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=1024, num_hidden_layers=2,
                                                num_attention_heads=8, image_size=224, patch_size=14))


def _transformer(family: str):
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
                                      attention_head_dim=128, num_attention_heads=4, joint_attention_dim=T5,
                                      pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=6, attention_head_dim=64,
                                 num_attention_heads=6, joint_attention_dim=T5, caption_projection_dim=384,
                                 pooled_projection_dim=512, out_channels=16, pos_embed_max_size=64, qk_norm="rms_norm")


def factories(family: str, tokenizer) -> dict:
    vocab = len(tokenizer)
    out = {"transformer": lambda: _transformer(family), "vae": _vae, "image_encoder": lambda: _image_encoder(family),
           "tokenizer": lambda: tokenizer, "tokenizer_2": lambda: tokenizer}
    if family == "flux":
        out.update(text_encoder=lambda: _clip_text(vocab, 256), text_encoder_2=lambda: _t5(vocab))
    else:
        out.update(text_encoder=lambda: _clip_text(vocab, 128, 256), text_encoder_2=lambda: _clip_text(vocab, 256, 256),
                   text_encoder_3=lambda: _t5(vocab), tokenizer_3=lambda: tokenizer)
    return out


def run_ours(family: str, steps: int, warmup: int, resolution: int, tok, images: Path) -> dict:
    from ipa_train.hosts.backbone_dit import DitBackbone
    from ipa_train.training.data import load_dataset
    from ipa_train.training.train import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="bench_dit_"))
    backbone = DitBackbone(device="cpu", factories=factories(family, tok), max_sequence_length=TEXT_TOKENS)
    cfg = TrainConfig(output_dir=str(tmp / "out"), format=FORMATS[family], steps=warmup + steps, batch_size=1,
                      resolution=resolution, save_every=0, log_every=0)
    stamps: list[float] = []
    train(cfg, backbone, load_dataset(images, resolution=resolution),
          progress=lambda s, n, loss: stamps.append(time.perf_counter()))
    return {"s_per_step": statistics.median(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))}


def _reference_transformer(family: str, tmp: Path, sizes):
    """The transformer with diffusers' IP-Adapter classes loaded by diffusers from our from-scratch start file."""
    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin, SD3IPAdapterMixin

    from ipa_train.adapter.dit_modules import DitAdapter, init_for_training
    from ipa_train.adapter.formats import save_adapter
    from ipa_train.training.config import TrainConfig
    from ipa_train.training.dit import new_config

    transformer = _transformer(family).requires_grad_(False)
    cfg = new_config(TrainConfig(format=FORMATS[family]), sizes)
    path = save_adapter(init_for_training(DitAdapter(cfg)), tmp / "start.safetensors")
    mixin = FluxIPAdapterMixin if family == "flux" else SD3IPAdapterMixin
    kwargs = {} if family == "flux" else {"image_encoder_folder": None}
    mixin.load_ip_adapter(SimpleNamespace(transformer=transformer), str(tmp), weight_name=path.name, **kwargs)
    params = [p for n, p in transformer.named_parameters() if "ip" in n or "image_proj" in n or "encoder_hid" in n]
    for p in params:
        p.requires_grad_(True)
    if family == "sd3":
        for proc in transformer.attn_processors.values():
            proc.scale = 1.0
    return transformer, params


def _encode_text(family: str, m: dict, ids):
    """Flux: T5 states and CLIP-L pooled; SD3: CLIP-L/G penultimate states padded to T5's width then T5's, and
    both CLIP projections (as the pipelines encode a prompt)."""
    import torch
    import torch.nn.functional as F

    clip = m["text_encoder"](ids, output_hidden_states=True)
    if family == "flux":
        return m["text_encoder_2"](ids)[0], clip.pooler_output
    clip2 = m["text_encoder_2"](ids, output_hidden_states=True)
    states = torch.cat([clip.hidden_states[-2], clip2.hidden_states[-2]], -1)
    t5 = m["text_encoder_3"](ids)[0]
    return torch.cat([F.pad(states, (0, T5 - states.shape[-1])), t5], 1), torch.cat([clip.text_embeds, clip2.text_embeds], -1)


def _forward(family: str, transformer, x0, noise, sigma, hidden, pooled, embeds):
    import torch

    from ipa_train.hosts.diffusers_flux import image_ids, pack, unpack

    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    if family == "sd3":
        return transformer(hidden_states=xt, encoder_hidden_states=hidden, pooled_projections=pooled,
                           timestep=sigma * 1000, joint_attention_kwargs={"ip_adapter_image_embeds": embeds},
                           return_dict=False)[0]
    h, w = x0.shape[-2:]
    out = transformer(hidden_states=pack(xt), encoder_hidden_states=hidden, pooled_projections=pooled, timestep=sigma,
                      img_ids=image_ids(h, w, "cpu"), txt_ids=torch.zeros(hidden.shape[1], 3), guidance=torch.ones(1),
                      joint_attention_kwargs={"ip_adapter_image_embeds": [embeds[:, None]]}, return_dict=False)[0]
    return unpack(out, h, w)


def run_reference(family: str, steps: int, warmup: int, resolution: int, tok, images: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from ipa_train.hosts.backbone_dit import DitBackbone
    from ipa_train.training.data import clip_pixels, target_pixels

    tmp = Path(tempfile.mkdtemp(prefix="bench_dit_ref_"))
    made = factories(family, tok)
    sizes = DitBackbone(device="cpu", factories=made).sizes
    m = {k: f().requires_grad_(False).eval() for k, f in made.items() if "tokenizer" not in k and k != "transformer"}
    transformer, params = _reference_transformer(family, tmp, sizes)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    img = Image.open(next(images.glob("*.png"))).convert("RGB")
    pixels = target_pixels(img, resolution)[None]
    clip_in = clip_pixels(img) if family == "flux" else clip_pixels(img, 224, ((0.5,) * 3, (0.5,) * 3))
    ids = tok("a photo number 0", max_length=TEXT_TOKENS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    stamps = []
    for _ in range(warmup + steps):
        with torch.no_grad():
            dist = m["vae"].encode(pixels).latent_dist
            x0 = (dist.sample() - m["vae"].config.shift_factor) * m["vae"].config.scaling_factor
            hidden, pooled = _encode_text(family, m, ids)
            enc = m["image_encoder"](clip_in[None], output_hidden_states=True)
            embeds = enc.image_embeds if family == "flux" else enc.hidden_states[-2]
        noise = torch.randn_like(x0)
        u = torch.sigmoid(torch.randn(1))
        s = 3.0 if family == "sd3" else 2.718281828 ** (0.5 + 0.65 * ((x0.shape[-1] // 2) ** 2 - 256) / 3840)
        sigma = s * u / (1 + (s - 1) * u)
        loss = F.mse_loss(_forward(family, transformer, x0, noise, sigma, hidden, pooled, embeds).float(), noise - x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
    return {"s_per_step": statistics.median(b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:]))}
