"""IPAKitEncodeImage, IPAKitApply and IPAKitApplySimple: thin translation into ipa_train calls."""

from __future__ import annotations

import torch

from .common import ADAPTER, CATEGORY, EMBEDS, clip_outputs, clip_outputs_of_zero_pixels, host_text_attention, logger

MODES = ["scaled", "fused"]
LAYERS = ["all", "style", "composition", "custom"]
CROPS = ["center", "squash", "pad"]
COMBINE = ["concat", "average"]

_MODE_TIP = ("scaled: text attention + weight x image attention (the original IP-Adapter). "
             "fused: the image tokens first attend to your prompt and are mixed with weight lambda, "
             "which keeps more of the text and raises diversity.")
_WEIGHT_TIP = "Strength of the image prompt. 0 leaves the model unchanged; 0.5-0.8 keeps more of the text."
_MODEL_IN = ("MODEL", {"tooltip": "The diffusion model to patch (SD1.5 or SDXL, matching the adapter)."})
_ADAPTER_IN = (ADAPTER, {"tooltip": "From IPAKitLoadAdapter."})
_CLIP_VISION_IN = ("CLIP_VISION", {"tooltip": "The CLIP vision model the adapter needs (the loader's info says which)."})
_LAMBDA_TIP = ("Fused mode only: share of the raw image tokens (1 = same as scaled mode; lower = more prompt "
               "in the image tokens, more diversity). 0.8 is the published inference value.")


def encode(adapter, clip_vision, image: torch.Tensor, combine: str = "concat", crop: str = "center",
           image_negative: torch.Tensor | None = None):
    """CLIP vision + projection -> ImageEmbeds (cond and uncond tokens)."""
    from ipa_train.hosts.comfy_patch import encode_embeds

    cfg = adapter.config
    embeds, hidden = clip_outputs(clip_vision, image, crop)
    cond = embeds if cfg.clip_output == "image_embeds" else hidden
    adapter.check_clip_input(cond, source="CLIP vision model's output")
    if image_negative is not None:
        n_embeds, n_hidden = clip_outputs(clip_vision, image_negative, crop)
        uncond = n_embeds if cfg.clip_output == "image_embeds" else n_hidden
    elif cfg.clip_output == "image_embeds":
        uncond = torch.zeros_like(cond[:1])  # the reference: zeros through the projection
    else:
        uncond = clip_outputs_of_zero_pixels(clip_vision)[1]  # the encoder on an all-zero normalised image
    return encode_embeds(adapter, cond, uncond, combine)


def apply(model, adapter, embeds, mode: str = "scaled", weight: float = 1.0, fusion_lambda: float = 0.8,
          start_at: float = 0.0, end_at: float = 1.0, layers: str = "all", layer_weights: str = "",
          attn_mask: torch.Tensor | None = None):
    """Clone `model` and patch every cross-attention layer with `adapter`'s image attention."""
    from comfy.patcher_extension import WrappersMP

    from ipa_train.adapter.layout import (
        check_fit,
        context_dim_of_blocks,
        groups_from_blocks,
        layer_multipliers,
        sites_from_groups,
    )
    from ipa_train.hosts.comfy_patch import AdapterApplication, FusionWrapper, chain_patches

    unet = model.get_model_object("diffusion_model")
    blocks = (unet.input_blocks, unet.middle_block, unet.output_blocks)
    sites = sites_from_groups(groups_from_blocks(*blocks))
    check_fit(tuple(s.hidden for s in sites), context_dim_of_blocks(*blocks), adapter.config)
    multipliers = layer_multipliers(sites, adapter.config.family, layers, layer_weights)
    sampling = model.get_model_object("model_sampling")
    app = AdapterApplication(
        adapter, embeds, [weight * m for m in multipliers],
        sigma_start=float(sampling.percent_to_sigma(start_at)), sigma_end=float(sampling.percent_to_sigma(end_at)),
        mask=attn_mask, mode=mode, fusion_lambda=fusion_lambda,
    )
    m = model.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    foreign = [k for k, p in existing.items() if p.__class__.__name__ != "Attn2Replace"]
    if foreign:
        logger.warning("IPAKitApply: replacing %d attn2 patches of another node pack (e.g. %s)", len(foreign), foreign[0])
    for (section, block_id, block_index), patch in chain_patches(existing, app, sites, host_text_attention).items():
        m.set_model_attn2_replace(patch, section, block_id, block_index)
    if app.fused:
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, f"ipakit_fusion_{app.uid}", FusionWrapper(app))
        if adapter.fusion is None:
            logger.info("IPAKitApply: %s has no trained fusion weights; fused mode uses the parameter-free fusion",
                        adapter.config.variant)
    return m


class IPAKitEncodeImage:
    DESCRIPTION = "Encodes reference image(s) with CLIP vision and the adapter's projection model into image tokens."
    CATEGORY = CATEGORY
    RETURN_TYPES = (EMBEDS,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Conditional and unconditional image tokens, for IPAKitApply.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter": _ADAPTER_IN,
                "clip_vision": _CLIP_VISION_IN,
                "image": ("IMAGE", {"tooltip": "Reference image. A batch means several references, combined as below."}),
                "combine": (COMBINE, {"default": "concat", "tooltip": "Several references: concat keeps every image's tokens; average merges them into one."}),
                "crop": (CROPS, {"default": "center", "tooltip": "How a non-square image becomes 224x224: center crop, squash, or pad to a square."}),
            },
            "optional": {
                "image_negative": ("IMAGE", {"tooltip": "Optional negative reference: used for the unconditional side instead of the neutral one."}),
            },
        }

    def run(self, adapter, clip_vision, image, combine="concat", crop="center", image_negative=None):
        return (encode(adapter, clip_vision, image, combine, crop, image_negative),)


class IPAKitApply:
    DESCRIPTION = "Patches every cross-attention layer of the model with image attention (scaled or fused mode)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the IP-Adapter applied; chain several apply nodes to combine adapters.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": _MODEL_IN,
                "adapter": _ADAPTER_IN,
                "embeds": (EMBEDS, {"tooltip": "From IPAKitEncodeImage."}),
                "mode": (MODES, {"default": "scaled", "tooltip": _MODE_TIP}),
                "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 5.0, "step": 0.05, "tooltip": _WEIGHT_TIP}),
                "fusion_lambda": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": _LAMBDA_TIP}),
                "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Fraction of the schedule where the image prompt starts."}),
                "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Fraction of the schedule where the image prompt stops."}),
                "layers": (LAYERS, {"default": "all", "tooltip": "all layers; style only; composition only (SD1.5/SDXL presets); or custom (the string below)."}),
                "layer_weights": ("STRING", {"default": "", "multiline": False, "tooltip": "custom layers: 'index:weight' pairs by transformer index (execution order), e.g. '0:1.0, 6:0.5'; unlisted layers get 0."}),
            },
            "optional": {
                "attn_mask": ("MASK", {"tooltip": "Optional mask: the image prompt acts only where the mask is white."}),
            },
        }

    def run(self, model, adapter, embeds, mode="scaled", weight=1.0, fusion_lambda=0.8, start_at=0.0, end_at=1.0,
            layers="all", layer_weights="", attn_mask=None):
        return (apply(model, adapter, embeds, mode, weight, fusion_lambda, start_at, end_at, layers, layer_weights, attn_mask),)


class IPAKitApplySimple:
    DESCRIPTION = "Encode a reference image and apply the adapter in one node (the common case)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the IP-Adapter applied.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": _MODEL_IN,
                "adapter": _ADAPTER_IN,
                "clip_vision": _CLIP_VISION_IN,
                "image": ("IMAGE", {"tooltip": "Reference image (a batch is concatenated)."}),
                "weight": ("FLOAT", {"default": 0.8, "min": -1.0, "max": 5.0, "step": 0.05, "tooltip": _WEIGHT_TIP}),
                "mode": (MODES, {"default": "scaled", "tooltip": _MODE_TIP}),
            }
        }

    def run(self, model, adapter, clip_vision, image, weight=0.8, mode="scaled"):
        return (apply(model, adapter, encode(adapter, clip_vision, image), mode, weight),)
