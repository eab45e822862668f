"""The toy shapes-world Flux (`ipa_train.toy.flux`) as ComfyUI's own Flux model, from the same file.

ComfyUI's detection assumes full-size Flux (24 heads of 128), so, as `dit_models.tiny_flux`, the model is built
from an explicit unet_config (derived here from the transformer config stored in the file) and the diffusers
weights are converted with ComfyUI's own key map. The toy's VAE gives 16x16 latents already normalised (the
learned autoencoder's 2 channels, or 12 for the pixel-unshuffle), so ComfyUI gets a latent format of that many
channels, scale 1 and no shift; its sampling shift is the one the toy trained with (Flux's resolution-dependent
shift at 64 tokens).
"""

from __future__ import annotations

import math
import os

import torch

from ipa_train.toy.flux import FLUX_FORMAT, REBUILD, build_flux_components, default_flux_configs, weighted
from ipa_train.toy.model import read_model_file, save_components
from ipa_train.toy.pretrain_flux import SCHEDULE

LATENT_SIDE = 16  # 32 px images, downscaled 2x by the toy's VAE


def unet_config(transformer: dict) -> dict:
    """ComfyUI's Flux unet_config for a diffusers `FluxTransformer2DModel` config.

    diffusers takes latents already packed 2x2 (in_channels = 4 x latent channels, its patch_size 1); ComfyUI
    packs them itself (patch_size 2) and counts latent channels. Head width = sum(axes_dims_rope)."""
    t = transformer
    heads, head_dim = int(t["num_attention_heads"]), int(t["attention_head_dim"])
    if t.get("patch_size", 1) != 1 or t["in_channels"] % 4 or sum(t["axes_dims_rope"]) != head_dim:
        raise ValueError(f"not a packed-2x2 Flux transformer config with RoPE axes summing to the head width: {t}")
    channels = int(t["in_channels"]) // 4
    return dict(image_model="flux", in_channels=channels, out_channels=int(t.get("out_channels") or channels * 4) // 4,
                vec_in_dim=int(t["pooled_projection_dim"]), context_in_dim=int(t["joint_attention_dim"]),
                hidden_size=heads * head_dim, mlp_ratio=4.0, num_heads=heads, depth=int(t["num_layers"]),
                depth_single_blocks=int(t["num_single_layers"]), axes_dim=list(t["axes_dims_rope"]), theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=bool(t.get("guidance_embeds", False)), txt_ids_dims=[])


def toy_shift_mu() -> float:
    """ComfyUI's Flux `shift` is mu (its sigmas are shifted by exp(mu)); the toy trains and samples with Flux's
    resolution-dependent shift at its 16x16 latents (64 tokens)."""
    return math.log(SCHEDULE.shift_for(torch.zeros(1, 1, LATENT_SIDE, LATENT_SIDE)))  # depends on the tokens only


def comfy_flux(comfy, config: dict, diffusers_state: dict, latent_format=None, shift: float | None = None):
    """A ComfyUI ModelPatcher (CPU, fp32) of `comfy.model_base.Flux` for `config` (a unet_config), holding the
    diffusers transformer weights `diffusers_state` through ComfyUI's own key map (strict)."""
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(config)
    if latent_format is not None:
        model_config.latent_format = latent_format
    if shift is not None:  # read by ModelSamplingFlux when the model is built
        model_config.sampling_settings["shift"] = shift
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(model_config, device=torch.device("cpu"))
    sd = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in diffusers_state.items()}, "")
    model.diffusion_model.load_state_dict(sd, strict=True)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def toy_latent_format(comfy, channels: int):
    """`channels`, scale 1, no shift: ComfyUI's process_in / process_out leave the toy's latents as they are."""
    import comfy.latent_formats

    class ToyShapesLatent(comfy.latent_formats.LatentFormat):
        latent_channels = channels
        scale_factor = 1.0

    return ToyShapesLatent()


def comfy_toy_flux(comfy, path: str | os.PathLike):
    """The toy Flux file at `path` as a ComfyUI ModelPatcher of `comfy.model_base.Flux` (fp32, CPU)."""
    configs, tensors = read_model_file(path, FLUX_FORMAT, REBUILD)
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    channels = int(configs["transformer"]["in_channels"]) // 4
    return comfy_flux(comfy, unet_config(configs["transformer"]), state, toy_latent_format(comfy, channels),
                      toy_shift_mu())


def random_toy_file(path: str | os.PathLike, seed: int = 5, vae: str = "autoencoder"):
    """A toy Flux file of the layout `default_flux_configs(vae)` with untrained weights (what pretraining starts
    from)."""
    configs = default_flux_configs(vae)
    return save_components(path, build_flux_components(configs, seed), configs, {"random": True}, weighted(configs),
                           FLUX_FORMAT)
