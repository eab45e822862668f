"""IPAKitEncodeImage, IPAKitApply and IPAKitApplySimple: thin translation into ipa_train calls."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ipa_train.adapter.weight_types import BOOST_SAME_AS_WEIGHT, DEFAULT_WEIGHT_COMPOSITION, second_weight

from .common import (
    CATEGORY,
    Adapter,
    Embeds,
    clip_outputs,
    clip_outputs_of_zero_pixels,
    host_text_attention,
    logger,
)
from .dit import apply_dit_node, encode_dit, is_dit, refuse_unet_adapter_on_dit
from .reference import Weights, encode_extra_inputs

MODES = ["scaled", "fused"]
LAYERS = ["all", "style", "composition", "custom"]
CROPS = ["center", "squash", "pad", "top", "bottom", "left", "right"]  # positions after "pad": saved workflows keep their values
COMBINE = ["concat", "add", "subtract", "average", "norm average", "max", "min"]
WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "strong style and composition", "style transfer precise", "composition precise"]
EMBEDS_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]

_MODE_TIP = ("scaled: text attention + weight x image attention (the original IP-Adapter). "
             "fused: the image tokens first attend to your prompt and are mixed with weight lambda, "
             "which keeps more of the text and raises diversity.")
_WEIGHT_TIP = "Strength of the image prompt. 0 leaves the model unchanged; 0.5-0.8 keeps more of the text."
_WEIGHT_TYPE_TIP = ("How the weight is spread over the layers (the community pack's names and numbers): linear = "
                    "every layer; ease in/out, ease in-out, reverse in-out = a ramp over the layers; weak/strong "
                    "input, middle, output = 0.2 on some blocks; style transfer / composition = only the layers that "
                    "carry style / composition; style and composition = both, the composition layers at "
                    "weight_composition (1.0 unless set); precise = the reference also acts as a negative on the other "
                    "layers (style_boost / composition_boost, the weight unless set). Defaults as the community pack's "
                    "Advanced node. Multiplied by the 'layers' choice.")
# The community pack's Advanced / Embeds nodes' defaults (ipa_train.adapter.weight_types.second_weight).
_BOOST_TIP = ("{which} only: weight of the {layers} layers, where the reference acts as a negative. "
              f"{BOOST_SAME_AS_WEIGHT:g} (the default and minimum) = the same as the weight, as the community pack's "
              "Advanced and Embeds nodes do; any other value is the boost itself, as on its {node} node (its "
              "default {default}).")
_COMPOSITION_TIP = ("style and composition / strong style and composition only: weight of the composition layers. "
                    "1.0 (the default) whatever the weight, as the community pack's Advanced and Embeds nodes do; "
                    "its Style & Composition node shows it as weight_composition.")
_SCALING_TIP = ("Where the weight enters the image attention: V only = weight x attention (the original); K+V = "
                "keys and values scaled (sharper at weight > 1); w/ C penalty = scaled down on the shallow layers; "
                "K+mean(V) w/ C penalty = only the mean of the values scaled (high weights without burning).")
_COMBINE_TIP = ("Several references (an image batch): concat keeps every image's tokens; add, subtract (first "
                "minus the mean of the others), average, norm average, max, min merge their CLIP outputs into one.")
_LAMBDA_TIP = ("Fused mode only: share of the raw image tokens (1 = same as scaled mode; lower = more prompt "
               "in the image tokens, more diversity). 0.8 is the published inference value.")


def model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The diffusion model to patch (SD1.5 or SDXL, matching the adapter).")


def adapter_input() -> io.Input:
    return Adapter.Input("adapter", tooltip="From IPAKitLoadAdapter.")


def clip_vision_input() -> io.ClipVision.Input:
    return io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter needs (the loader's info says which).")


def weight_type_inputs() -> list[io.Input]:
    return [io.Combo.Input("weight_type", options=WEIGHT_TYPES, default="linear", optional=True, tooltip=_WEIGHT_TYPE_TIP)]


def model_output(tooltip: str) -> io.Model.Output:
    return io.Model.Output("model", display_name="model", tooltip=tooltip)


def clip_pair(adapter, clip_vision, image: torch.Tensor, crop: str = "center",
              image_negative: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP outputs the adapter reads, for the references [N, ...] and for the unconditional side."""
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
    return cond, uncond


def encode(adapter, clip_vision, image: torch.Tensor, combine: str = "concat", crop: str = "center",
           image_negative: torch.Tensor | None = None, reference_weights: str = ""):
    """CLIP vision + projection -> ImageEmbeds (cond and uncond tokens); reference_weights: "1.0, 0.5" or ""."""
    from ipa_train.adapter.references import parse_weight_list
    from ipa_train.hosts.comfy.unet import encode_embeds

    if is_dit(adapter):
        return encode_dit(adapter, clip_vision, image, combine, crop, image_negative, reference_weights)
    weights = parse_weight_list(reference_weights or "")
    cond, uncond = clip_pair(adapter, clip_vision, image, crop, image_negative)
    return encode_embeds(adapter, cond, uncond, combine, weights or None)


def apply(model, adapter, embeds, mode: str = "scaled", weight: float = 1.0, fusion_lambda: float = 0.8,
          start_at: float = 0.0, end_at: float = 1.0, layers: str = "all", layer_weights: str = "",
          attn_mask: torch.Tensor | None = None, frame_weights: list[float] | None = None, weight_type: str = "linear",
          embeds_scaling: str = "V only", second: float | None = None, embeds_alt=None):
    """Clone `model` and patch every cross-attention layer with `adapter`'s image attention.

    Per-frame embeds (IPAKitEncodeFrames) drive latent i with reference i; `frame_weights` scale frame i.
    weight_type / second: the per-layer spread (`ipa_train.adapter.weight_types`; second = weight_composition or
    the precise types' boost, None = the weight); embeds_alt: the composition image's tokens.
    """
    if is_dit(adapter):
        return apply_dit_node(model, adapter, embeds, mode, weight, start_at, end_at, layers, layer_weights, attn_mask,
                              frame_weights, weight_type, fusion_lambda)
    refuse_unet_adapter_on_dit(model, adapter)
    from comfy.patcher_extension import WrappersMP

    from ipa_train.adapter.layout import check_fit, context_dim_of_blocks, groups_from_blocks, sites_from_groups
    from ipa_train.adapter.weight_types import application_plans
    from ipa_train.hosts.comfy.unet import AdapterApplication, Attn2Replace, FusionWrapper, chain_patches

    unet = model.get_model_object("diffusion_model")
    blocks = (unet.input_blocks, unet.middle_block, unet.output_blocks)
    sites = sites_from_groups(groups_from_blocks(*blocks))
    check_fit(tuple(s.hidden for s in sites), context_dim_of_blocks(*blocks), adapter.config)
    plans = application_plans(sites, adapter.config.family, weight_type, weight, second, layers, layer_weights)
    sampling = model.get_model_object("model_sampling")
    app = AdapterApplication(
        adapter, embeds, plans,
        sigma_start=float(sampling.percent_to_sigma(start_at)), sigma_end=float(sampling.percent_to_sigma(end_at)),
        mask=attn_mask, mode=mode, fusion_lambda=fusion_lambda, frame_weights=frame_weights,
        embeds_scaling=embeds_scaling, embeds_alt=embeds_alt,
    )
    m = model.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    foreign = [k for k, p in existing.items() if not isinstance(p, Attn2Replace)]
    if foreign:
        logger.info("IPAKitApply: chaining onto %d attn2 patches of another node pack (e.g. %s)", len(foreign), foreign[0])
    for key, patch in chain_patches(existing, app, sites, host_text_attention).items():
        m.set_model_attn2_replace(patch, *key)
    if app.fused:
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, f"ipakit_fusion_{app.uid}", FusionWrapper(app))
        if adapter.fusion is None:
            logger.info("IPAKitApply: %s has no trained fusion weights; fused mode uses the parameter-free fusion",
                        adapter.config.variant)
    return m


class IPAKitEncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitEncodeImage",
            display_name="Encode Reference Image (Kit)",
            category=CATEGORY,
            description="Encodes reference image(s) with CLIP vision and the adapter's projection model into image tokens.",
            inputs=[
                adapter_input(),
                clip_vision_input(),
                io.Image.Input("image", tooltip="Reference image. A batch means several references, combined as below."),
                io.Combo.Input("combine", options=COMBINE, default="concat", tooltip=_COMBINE_TIP),
                io.Combo.Input("crop", options=CROPS, default="center",
                               tooltip="How a non-square image becomes 224x224: center crop, squash, or pad to a square."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Optional negative reference: used for the unconditional side instead of the neutral one."),
                *encode_extra_inputs(),  # appended, so saved workflows keep their widget values
                io.String.Input("reference_weights", default="", optional=True,
                                tooltip="One weight per image of the batch, e.g. '1.0, 0.5' (empty = all 1). With concat "
                                        "it scales that image's share of the image attention; with a merge it "
                                        "multiplies that image's CLIP output first. The negative side gets the same."),
            ],
            outputs=[Embeds.Output("embeds", display_name="embeds",
                                   tooltip="Conditional and unconditional image tokens, for IPAKitApply.")],
        )

    @classmethod
    def execute(cls, adapter, clip_vision, image, combine="concat", crop="center", image_negative=None,
                interpolation="bicubic", sharpening=0.0, enhance_tiles=1, enhance_ratio=1.0,
                reference_weights="") -> io.NodeOutput:
        from .reference import encode_prepared, uses_host_preprocessing

        if is_dit(adapter) or uses_host_preprocessing(crop, interpolation, sharpening, enhance_tiles, enhance_ratio):
            return io.NodeOutput(encode(adapter, clip_vision, image, combine, crop, image_negative, reference_weights))
        return io.NodeOutput(encode_prepared(adapter, clip_vision, image, combine, crop, image_negative, interpolation,
                                             sharpening, enhance_tiles, enhance_ratio, reference_weights))


class IPAKitApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitApply",
            display_name="Apply IP-Adapter (Kit)",
            category=CATEGORY,
            description="Patches every cross-attention layer of the model with image attention (scaled or fused mode).",
            inputs=[
                model_input(),
                adapter_input(),
                Embeds.Input("embeds", tooltip="From IPAKitEncodeImage."),
                io.Combo.Input("mode", options=MODES, default="scaled", tooltip=_MODE_TIP),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05, tooltip=_WEIGHT_TIP),
                io.Float.Input("fusion_lambda", default=0.8, min=0.0, max=1.0, step=0.05, tooltip=_LAMBDA_TIP),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule where the image prompt starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule where the image prompt stops."),
                io.Combo.Input("layers", options=LAYERS, default="all",
                               tooltip="all layers; style only; composition only (SD1.5/SDXL presets); or custom (the string below)."),
                io.String.Input("layer_weights", default="", multiline=False,
                                tooltip="custom layers: 'index:weight' pairs by transformer index (execution order), "
                                        "e.g. '0:1.0, 6:0.5'; unlisted layers get 0."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Optional mask: the image prompt acts only where the mask is white."),
                Weights.Input("frame_weights", optional=True,
                              tooltip="Optional per-frame weights from IPAKitWeightSchedule (frame i of the latent batch)."),
                *weight_type_inputs(),
                io.Combo.Input("embeds_scaling", options=EMBEDS_SCALING, default="V only", optional=True,
                               tooltip=_SCALING_TIP),
                # defaults: the community pack's Advanced / Embeds nodes; a saved value stays the boost
                io.Float.Input("style_boost", default=BOOST_SAME_AS_WEIGHT, min=BOOST_SAME_AS_WEIGHT, max=5.0, step=0.05,
                               optional=True, tooltip=_BOOST_TIP.format(
                                   which="style transfer precise", layers="composition", node="Precise Style Transfer",
                                   default="1.0; SDXL: try 2")),
                io.Float.Input("composition_boost", default=BOOST_SAME_AS_WEIGHT, min=BOOST_SAME_AS_WEIGHT, max=5.0,
                               step=0.05, optional=True, tooltip=_BOOST_TIP.format(
                                   which="composition precise", layers="style", node="Precise Composition",
                                   default="0.0 = only the composition layers act")),
                io.Float.Input("weight_composition", default=DEFAULT_WEIGHT_COMPOSITION, min=-1.0, max=5.0, step=0.05,
                               optional=True, tooltip=_COMPOSITION_TIP),  # appended: saved workflows keep their values
                io.Float.Input("faceid_lora_strength", default=1.0, min=-2.0, max=2.0, step=0.05, optional=True,
                               tooltip="FaceID adapters with a LoRA inside: its strength on the model (1.0 as diffusers; "
                                       "the community pack's unified loader uses 0.6). No separate LoRA file needed."),
            ],
            outputs=[model_output("The model with the IP-Adapter applied; chain several apply nodes to combine adapters.")],
        )

    @classmethod
    def execute(cls, model, adapter, embeds, mode="scaled", weight=1.0, fusion_lambda=0.8, start_at=0.0, end_at=1.0,
                layers="all", layer_weights="", attn_mask=None, frame_weights=None, weight_type="linear",
                embeds_scaling="V only", style_boost=BOOST_SAME_AS_WEIGHT, composition_boost=BOOST_SAME_AS_WEIGHT,
                weight_composition=DEFAULT_WEIGHT_COMPOSITION, faceid_lora_strength=1.0) -> io.NodeOutput:
        from ipa_train.hosts.face_embeds import check_embeds_fit

        from .faceid import apply_face_lora

        if not is_dit(adapter):  # the DiT path checks its own embeds
            check_embeds_fit(adapter, embeds)
        m = apply(model, adapter, embeds, mode, weight, fusion_lambda, start_at, end_at, layers, layer_weights,
                  attn_mask, frame_weights, weight_type, embeds_scaling,
                  second_weight(weight_type, weight_composition, style_boost, composition_boost))
        return io.NodeOutput(apply_face_lora(m, adapter, faceid_lora_strength))


class IPAKitApplySimple(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitApplySimple",
            display_name="Apply IP-Adapter Simple (Kit)",
            category=CATEGORY,
            description="Encode a reference image and apply the adapter in one node (the common case).",
            inputs=[
                model_input(),
                adapter_input(),
                clip_vision_input(),
                io.Image.Input("image", tooltip="Reference image (a batch is concatenated)."),
                io.Float.Input("weight", default=0.8, min=-1.0, max=5.0, step=0.05, tooltip=_WEIGHT_TIP),
                io.Combo.Input("mode", options=MODES, default="scaled", tooltip=_MODE_TIP),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of the schedule where the image prompt starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001, optional=True,
                               tooltip="Fraction of the schedule where the image prompt stops."),
                *weight_type_inputs(),
            ],
            outputs=[model_output("The model with the IP-Adapter applied.")],
        )

    @classmethod
    def execute(cls, model, adapter, clip_vision, image, weight=0.8, mode="scaled", start_at=0.0, end_at=1.0,
                weight_type="linear") -> io.NodeOutput:
        # the same defaults as IPAKitApply (the community pack's Advanced node): boost = weight, composition 1.0
        return io.NodeOutput(apply(model, adapter, encode(adapter, clip_vision, image), mode, weight,
                                   start_at=start_at, end_at=end_at, weight_type=weight_type,
                                   second=second_weight(weight_type)))
