"""Reference preparation nodes: IPAKitPrepImage, IPAKitNoiseImage, IPAKitApplyTiled, IPAKitRegion (V3 schema).

Thin translation into `ipa_train.reference` / `ipa_train.hosts.regions`; the math lives there.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .common import CATEGORY, clip_outputs_of_zero_pixels

CROP_TIP = ("How a non-square reference becomes a square: a square at center/top/bottom/left/right, pad to a "
            "square, or squash the whole image.")
INTERP_TIP = "Resize filter: nearest, bilinear, bicubic (ComfyUI's default) or lanczos (sharpest for photos)."
SHARP_TIP = "Unsharp-mask amount after the resize (0 = none; 0.3-1 restores detail lost to the 224 px downscale)."


def prep_inputs(default_crop: str = "center") -> list:
    from ipa_train.reference.prep import CROP_POSITIONS, INTERPOLATIONS

    return [
        io.Combo.Input("crop", options=list(CROP_POSITIONS), default=default_crop, tooltip=CROP_TIP),
        io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="bicubic", tooltip=INTERP_TIP),
        io.Float.Input("sharpening", default=0.0, min=0.0, max=2.0, step=0.05, tooltip=SHARP_TIP),
    ]


def prepared_clip_outputs(clip_vision, image: torch.Tensor, crop: str = "center", interpolation: str = "bicubic",
                          sharpening: float = 0.0, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE -> (image_embeds [N, P], penultimate [N, L, D]), prepared by ipa_train (exactly CLIP size, so ComfyUI
    does not resize again). `chunk` > 0 encodes that many images at a time."""
    from ipa_train.reference.prep import prepare

    size = int(getattr(clip_vision, "image_size", 224))
    fill = getattr(clip_vision, "image_mean", None)
    embeds, hidden = [], []
    for part in image.split(chunk if chunk > 0 else image.shape[0]):
        out = clip_vision.encode_image(prepare(part, size, crop, interpolation, sharpening, fill), crop=False)
        embeds.append(out["image_embeds"].float().cpu())
        hidden.append(out["penultimate_hidden_states"].float().cpu())
    return torch.cat(embeds), torch.cat(hidden)


def clip_input(adapter, clip_vision, image, crop="center", interpolation="bicubic", sharpening=0.0,
               enhance_tiles=1, enhance_ratio=1.0) -> torch.Tensor:
    """The adapter's CLIP input for `image` (pooled or hidden states), with the optional tile enhance mixed in."""
    from ipa_train.reference.tiles import enhance
    from ipa_train.reference.tiles import enhance_tiles as split

    penultimate = adapter.config.clip_output == "penultimate"
    embeds, hidden = prepared_clip_outputs(clip_vision, image, crop, interpolation, sharpening)
    cond = hidden if penultimate else embeds
    if enhance_tiles > 1 and enhance_ratio < 1.0:
        size = int(getattr(clip_vision, "image_size", 224))
        mixed = []
        for i in range(image.shape[0]):
            t_embeds, t_hidden = prepared_clip_outputs(clip_vision, split(image[i : i + 1], enhance_tiles, size, interpolation),
                                                       "squash", interpolation, sharpening)
            mixed.append(enhance(cond[i : i + 1], t_hidden if penultimate else t_embeds, enhance_tiles, enhance_ratio))
        cond = torch.cat(mixed)
    return cond


def unconditional_input(adapter, clip_vision, image_negative=None, prep=("center", "bicubic", 0.0)) -> torch.Tensor:
    """CLIP input of the unconditional side: the negative image, else the reference implementations' neutral one."""
    penultimate = adapter.config.clip_output == "penultimate"
    if image_negative is not None:
        embeds, hidden = prepared_clip_outputs(clip_vision, image_negative, *prep)
        return hidden if penultimate else embeds
    if penultimate:
        return clip_outputs_of_zero_pixels(clip_vision)[1]
    return torch.zeros(1, adapter.config.clip_embedding_dim)


class IPAKitPrepImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPAKitPrepImage", display_name="Prepare Reference Image (Kit)", category=CATEGORY,
            description="Crops, resizes and sharpens a reference exactly as the encoder will see it.",
            inputs=[io.Image.Input("image", tooltip="Reference image(s)."), *prep_inputs(),
                    io.Int.Input("size", default=224, min=16, max=1024, step=1,
                                 tooltip="Output side in pixels: 224 for the ViT-H/ViT-bigG encoders.")],
            outputs=[io.Image.Output("image", display_name="image", tooltip="The prepared square image(s).")],
        )

    @classmethod
    def execute(cls, image, crop="center", interpolation="bicubic", sharpening=0.0, size=224) -> io.NodeOutput:
        from ipa_train.reference.prep import prepare

        return io.NodeOutput(prepare(image, size, crop, interpolation, sharpening))


class IPAKitNoiseImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ipa_train.reference.noise import NOISE_TYPES

        return io.Schema(
            node_id="IPAKitNoiseImage", display_name="Noise Negative Image (Kit)", category=CATEGORY,
            description="A noise image for the encode node's image_negative: same seed and inputs, same image.",
            inputs=[
                io.Combo.Input("noise_type", options=list(NOISE_TYPES), default="fade",
                               tooltip="fade: blend to noise; dissolve: replace pixels; gaussian: add noise; "
                                       "shuffle: swap pixel positions."),
                io.Float.Input("strength", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="How much noise."),
                io.Float.Input("blur", default=0.0, min=0.0, max=32.0, step=0.5, tooltip="Gaussian blur sigma in pixels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise seed (no hidden global seed: same inputs give the same image)."),
                io.Int.Input("width", default=224, min=16, max=4096, tooltip="Output width."),
                io.Int.Input("height", default=224, min=16, max=4096, tooltip="Output height."),
                io.Image.Input("reference", optional=True,
                               tooltip="Optional base image (resized); without it the noise starts from nothing."),
            ],
            outputs=[io.Image.Output("image", display_name="image", tooltip="The noise image; connect it to image_negative.")],
        )

    @classmethod
    def execute(cls, noise_type, strength, blur, seed, width, height, reference=None) -> io.NodeOutput:
        from ipa_train.reference.noise import noise_image

        return io.NodeOutput(noise_image(noise_type, width, height, strength, blur, seed, reference))


Weights = io.Custom("IPAKIT_WEIGHTS")  # per-frame weights: a list of floats, frame i of the latent batch
_HOST_CROPS = ("center", "squash", "pad")


def encode_extra_inputs() -> list:
    """The encode node's preparation and enhance inputs (appended after its original inputs)."""
    from ipa_train.reference.prep import INTERPOLATIONS

    return [
        io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="bicubic", optional=True, tooltip=INTERP_TIP),
        io.Float.Input("sharpening", default=0.0, min=0.0, max=2.0, step=0.05, optional=True, tooltip=SHARP_TIP),
        io.Int.Input("enhance_tiles", default=1, min=1, max=8, optional=True,
                     tooltip="Plus adapters: also encode an N x N split of the image and mix the tiles' detail into "
                             "the hidden states (1 = off)."),
        io.Float.Input("enhance_ratio", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="Share of the whole image against the tiles' mosaic (1 = whole image only)."),
    ]


def uses_host_preprocessing(crop, interpolation, sharpening, enhance_tiles, enhance_ratio) -> bool:
    """True when the options are the encode node's original ones: ComfyUI's own preprocessing, same results as before."""
    return crop in _HOST_CROPS and interpolation == "bicubic" and sharpening == 0 and (enhance_tiles <= 1 or enhance_ratio >= 1)


def encode_prepared(adapter, clip_vision, image, combine="concat", crop="center", image_negative=None,
                    interpolation="bicubic", sharpening=0.0, enhance_tiles=1, enhance_ratio=1.0, reference_weights=""):
    """ImageEmbeds with ipa_train's preparation (crop position, filter, sharpening) and the optional tile enhance."""
    from ipa_train.adapter.references import parse_weight_list
    from ipa_train.hosts.comfy.unet import encode_embeds

    cond = clip_input(adapter, clip_vision, image, crop, interpolation, sharpening, enhance_tiles, enhance_ratio)
    adapter.check_clip_input(cond, source="CLIP vision model's output")
    uncond = unconditional_input(adapter, clip_vision, image_negative, (crop, interpolation, sharpening))
    return encode_embeds(adapter, cond, uncond, combine, parse_weight_list(reference_weights or "") or None)
