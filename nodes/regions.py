"""IPAKitRegion: an image prompt inside a mask, and optionally the text conditioning masked to the same region."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, Adapter, Embeds

_MODES = ["scaled", "fused"]


class IPAKitRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPAKitRegion", display_name="IP-Adapter Region (Kit)", category=CATEGORY,
            description="Applies a reference only inside a mask; chain several on one model for several regions. "
                        "Connect positive/negative to mask the prompt to the same region (then combine the regions' "
                        "conditionings with Conditioning (Combine)).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (or the output of another region)."),
                Adapter.Input("adapter", tooltip="From IPAKitLoadAdapter or IPAKitPresetLoader."),
                Embeds.Input("embeds", tooltip="This region's reference, from IPAKitEncodeImage."),
                io.Mask.Input("mask", tooltip="Where the reference acts (white); resized to the latent."),
                io.Float.Input("weight", default=0.8, min=-1.0, max=5.0, step=0.05, tooltip="Strength inside the mask."),
                io.Combo.Input("mode", options=_MODES, default="scaled", tooltip="scaled or fused (see IPAKitApply)."),
                io.Float.Input("fusion_lambda", default=0.8, min=0.0, max=1.0, step=0.05, tooltip="Fused mode only."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Where the image prompt starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Where it stops."),
                io.Float.Input("conditioning_strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Strength of the masked text conditioning (the core ConditioningSetMask's strength)."),
                io.Conditioning.Input("positive", optional=True, tooltip="Optional prompt for this region only."),
                io.Conditioning.Input("negative", optional=True, tooltip="Optional negative prompt for this region only."),
            ],
            outputs=[
                io.Model.Output("model", display_name="model", tooltip="The model with this region's image prompt."),
                io.Conditioning.Output("positive", display_name="positive", tooltip="The positive masked to the region (None if not given)."),
                io.Conditioning.Output("negative", display_name="negative", tooltip="The negative masked to the region (None if not given)."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter, embeds, mask, weight=0.8, mode="scaled", fusion_lambda=0.8, start_at=0.0,
                end_at=1.0, conditioning_strength=1.0, positive=None, negative=None) -> io.NodeOutput:
        from ipa_train.hosts.regions import mask_conditioning, region_mask

        from .apply import apply

        m = region_mask(mask)
        patched = apply(model, adapter, embeds, mode=mode, weight=weight, fusion_lambda=fusion_lambda,
                        start_at=start_at, end_at=end_at, attn_mask=m)
        pos = mask_conditioning(positive, m, conditioning_strength) if positive is not None else None
        neg = mask_conditioning(negative, m, conditioning_strength) if negative is not None else None
        return io.NodeOutput(patched, pos, neg)
