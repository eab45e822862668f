"""IPAKitApplyStyleComposition: style from one image, composition from another, in one node (SD1.5 and SDXL)."""

from __future__ import annotations

from comfy_api.latest import io

from .apply import (
    _COMBINE_TIP,
    _SCALING_TIP,
    COMBINE,
    CROPS,
    EMBEDS_SCALING,
    adapter_input,
    apply,
    clip_vision_input,
    encode,
    model_input,
    model_output,
)
from .common import CATEGORY


class IPAKitApplyStyleComposition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitApplyStyleComposition",
            display_name="Apply IP-Adapter Style & Composition (Kit)",
            category=CATEGORY,
            description="Takes the style from one image and the composition from another: the style image drives the "
                        "style layers, the composition image the composition layers (SD1.5 and SDXL).",
            inputs=[
                model_input(),
                adapter_input(),
                clip_vision_input(),
                io.Image.Input("image_style", tooltip="Style reference (a batch is combined as below)."),
                io.Image.Input("image_composition", tooltip="Composition reference (a batch is combined as below)."),
                io.Float.Input("weight_style", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of the style image on the style layers."),
                io.Float.Input("weight_composition", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of the composition image on the composition layers."),
                io.Boolean.Input("expand_style", default=False,
                                 tooltip="Off: style and composition layers only. On: the style image acts on every "
                                         "other layer too (strong style and composition)."),
                io.Combo.Input("combine_embeds", options=COMBINE, default="average", tooltip=_COMBINE_TIP),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule where the image prompts start."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule where the image prompts stop."),
                io.Combo.Input("embeds_scaling", options=EMBEDS_SCALING, default="V only", tooltip=_SCALING_TIP),
                io.Combo.Input("crop", options=CROPS, default="center",
                               tooltip="How a non-square image becomes 224x224: center crop, squash, or pad to a square."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Optional negative reference for the unconditional side of both images."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Optional mask: the image prompts act only where the mask is white."),
            ],
            outputs=[model_output("The model with style and composition applied; chain more apply nodes if you like.")],
        )

    @classmethod
    def execute(cls, model, adapter, clip_vision, image_style, image_composition, weight_style=1.0,
                weight_composition=1.0, expand_style=False, combine_embeds="average", start_at=0.0, end_at=1.0,
                embeds_scaling="V only", crop="center", image_negative=None, attn_mask=None) -> io.NodeOutput:
        style = encode(adapter, clip_vision, image_style, combine_embeds, crop, image_negative)
        composition = encode(adapter, clip_vision, image_composition, combine_embeds, crop, image_negative)
        weight_type = "strong style and composition" if expand_style else "style and composition"
        return io.NodeOutput(apply(model, adapter, style, "scaled", weight_style, start_at=start_at, end_at=end_at,
                                   attn_mask=attn_mask, weight_type=weight_type, embeds_scaling=embeds_scaling,
                                   second=weight_composition, embeds_alt=composition))
