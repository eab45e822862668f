"""Tiny random Flux and SD3 models in ComfyUI's own classes, with the same weights in diffusers' transformers.

ComfyUI's detection hard-codes Flux's 24 heads, so the tiny Flux is built from an explicit config and its weights
converted from the diffusers model with ComfyUI's own key map (`convert_diffusers_mmdit`). A tiny MMDiT whose width
is 64 x depth is detected consistently, so the SD3 model goes through ComfyUI's own diffusion-model loader.
"""

from __future__ import annotations

import torch

FLUX = dict(hidden=64, heads=2, depth=2, single=2, context=32, pooled=24, axes=(8, 12, 12))
SD3 = dict(hidden=128, heads=2, depth=2, context=32, pooled=16)


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))


def tiny_flux(comfy, seed: int = 0, sizes: dict | None = None, dtype: torch.dtype = torch.float32):
    """(diffusers FluxTransformer2DModel, ComfyUI ModelPatcher of comfy.model_base.Flux), the same weights (fp32
    in diffusers; ComfyUI's in `dtype`, which it also computes in, as a bf16 checkpoint on a GPU).

    sizes: keys as FLUX (the benchmark's wider model); head width hidden / heads = sum(axes)."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    from diffusers import FluxTransformer2DModel

    f = sizes or FLUX
    ref = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=f["depth"], num_single_layers=f["single"],
                                 attention_head_dim=f["hidden"] // f["heads"], num_attention_heads=f["heads"],
                                 joint_attention_dim=f["context"], pooled_projection_dim=f["pooled"],
                                 guidance_embeds=True, axes_dims_rope=f["axes"]).eval()
    randomize(ref, seed)
    unet_config = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=f["pooled"],
                       context_in_dim=f["context"], hidden_size=f["hidden"], mlp_ratio=4.0, num_heads=f["heads"],
                       depth=f["depth"], depth_single_blocks=f["single"], axes_dim=list(f["axes"]), theta=10000,
                       patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
    config = comfy.supported_models.Flux(unet_config)
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.Flux(config, device=torch.device("cpu"))
    sd = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in ref.state_dict().items()}, "")
    model.diffusion_model.load_state_dict(sd, strict=True)
    cpu = torch.device("cpu")
    return ref, comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_sd3(comfy, seed: int = 0, sizes: dict | None = None):
    """(diffusers SD3Transformer2DModel, ComfyUI ModelPatcher from ComfyUI's own loader), the same fp32 weights.

    sizes: keys as SD3, pos_max (patches per side, 16) (ComfyUI reads depth = hidden / 64, so hidden = 64 x depth)."""
    import comfy.sd
    from diffusers import SD3Transformer2DModel

    s = sizes or SD3
    ref = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=s["depth"],
                                attention_head_dim=s["hidden"] // s["heads"], num_attention_heads=s["heads"],
                                joint_attention_dim=s["context"], caption_projection_dim=s["hidden"],
                                pooled_projection_dim=s["pooled"], out_channels=16, pos_embed_max_size=s.get("pos_max", 16),
                                qk_norm="rms_norm").eval()
    randomize(ref, seed)
    patcher = comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in ref.state_dict().items()},
                                                       model_options={"dtype": torch.float32})
    return ref, patcher


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> Flux's [B, H/2*W/2, C*4] tokens (diffusers' _pack_latents, ComfyUI's process_img)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = t.shape
    c = d // 4
    return t.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def flux_ids(h: int, w: int, txt_len: int):
    img = torch.zeros(h // 2, w // 2, 3)
    img[..., 1] = torch.arange(h // 2)[:, None]
    img[..., 2] = torch.arange(w // 2)[None, :]
    return img.reshape(-1, 3), torch.zeros(txt_len, 3)
