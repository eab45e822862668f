"""IPAKitApplyTiled: a non-square or large reference as square tiles, each attending through its own mask."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, Adapter, logger
from .reference import INTERP_TIP, SHARP_TIP, clip_input, unconditional_input

_MODES = ["scaled", "fused"]


class IPAKitApplyTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ipa_train.reference.prep import INTERPOLATIONS

        return io.Schema(
            node_id="IPAKitApplyTiled", display_name="Apply IP-Adapter Tiled (Kit)", category=CATEGORY,
            description="Cuts the reference into square tiles; each tile drives the part of the latent it covers "
                        "(the reference laid over the latent), so nothing of a wide or tall reference is cropped away.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch."),
                Adapter.Input("adapter", tooltip="From IPAKitLoadAdapter or IPAKitPresetLoader."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter needs."),
                io.Image.Input("image", tooltip="One reference image, any size and aspect."),
                io.Float.Input("weight", default=0.8, min=-1.0, max=5.0, step=0.05, tooltip="Strength of every tile."),
                io.Combo.Input("mode", options=_MODES, default="scaled", tooltip="scaled or fused (see IPAKitApply)."),
                io.Float.Input("fusion_lambda", default=0.8, min=0.0, max=1.0, step=0.05, tooltip="Fused mode only."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Where the image prompt starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Where it stops."),
                io.Int.Input("short_side_tiles", default=1, min=1, max=8,
                             tooltip="Tiles along the short side (1 = tiles of the short side; more for large references)."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="bicubic", tooltip=INTERP_TIP),
                io.Float.Input("sharpening", default=0.0, min=0.0, max=2.0, step=0.05, tooltip=SHARP_TIP),
                io.Image.Input("image_negative", optional=True, tooltip="Optional negative image for every tile."),
            ],
            outputs=[
                io.Model.Output("model", display_name="model", tooltip="The model with one masked application per tile."),
                io.Image.Output("tiles", display_name="tiles", tooltip="The square tiles as the encoder sees them."),
                io.Mask.Output("masks", display_name="masks", tooltip="Each tile's mask over the latent (reference resolution)."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter, clip_vision, image, weight=0.8, mode="scaled", fusion_lambda=0.8, start_at=0.0,
                end_at=1.0, short_side_tiles=1, interpolation="bicubic", sharpening=0.0, image_negative=None) -> io.NodeOutput:
        from ipa_train.hosts.comfy.unet import encode_embeds
        from ipa_train.reference.tiles import tile_grid, tile_images, tile_masks

        from .apply import apply

        image = image[:1]
        h, w = image.shape[1], image.shape[2]
        grid = tile_grid(h, w, short_side_tiles)
        size = int(getattr(clip_vision, "image_size", 224))
        tiles = tile_images(image, grid, size, interpolation)
        masks = tile_masks(grid, h, w, h, w)  # [K, H, W], a partition of the reference (and so of the latent)
        uncond = unconditional_input(adapter, clip_vision, image_negative, ("center", interpolation, sharpening))
        m = model
        for i in range(len(grid)):
            cond = clip_input(adapter, clip_vision, tiles[i : i + 1], "squash", interpolation, sharpening)
            embeds = encode_embeds(adapter, cond, uncond)
            m = apply(m, adapter, embeds, mode=mode, weight=weight, fusion_lambda=fusion_lambda, start_at=start_at,
                      end_at=end_at, attn_mask=masks[i : i + 1])
        logger.info("IPAKitApplyTiled: %dx%d reference -> %d tiles of %d px", w, h, len(grid), grid[0][2])
        return io.NodeOutput(m, tiles, masks)
