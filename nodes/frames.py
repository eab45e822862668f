"""Animation batches: IPAKitWeightSchedule (per-frame weights) and IPAKitEncodeFrames (one reference per frame)."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, Adapter, Embeds, logger
from .reference import Weights, clip_input, prep_inputs, unconditional_input


class IPAKitWeightSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ipa_train.reference.schedule import CURVES

        return io.Schema(
            node_id="IPAKitWeightSchedule", display_name="IP-Adapter Weight Schedule (Kit)", category=CATEGORY,
            description="One weight per latent frame (fade a reference in or out over an animation); plug into "
                        "the apply node's frame_weights.",
            inputs=[
                io.Int.Input("frames", default=16, min=1, max=10000, tooltip="Number of latent frames (the batch size)."),
                io.Combo.Input("curve", options=list(CURVES), default="linear",
                               tooltip="Shape between start and end frame; custom uses the list below."),
                io.Float.Input("start_weight", default=0.0, min=-1.0, max=5.0, step=0.05, tooltip="Weight up to start_frame."),
                io.Float.Input("end_weight", default=1.0, min=-1.0, max=5.0, step=0.05, tooltip="Weight from end_frame on."),
                io.Int.Input("start_frame", default=0, min=0, max=10000, tooltip="First frame of the curve."),
                io.Int.Input("end_frame", default=-1, min=-1, max=10000, tooltip="Last frame of the curve (-1 = the last frame)."),
                io.String.Input("custom", default="0, 1", tooltip="custom curve: weights spread evenly over "
                                "start..end frame and interpolated, e.g. '0, 1, 0.5'."),
            ],
            outputs=[Weights.Output("frame_weights", display_name="frame_weights", tooltip="Per-frame weights for the apply node."),
                     io.String.Output("text", display_name="text", tooltip="The weights as text, to check them.")],
        )

    @classmethod
    def execute(cls, frames, curve="linear", start_weight=0.0, end_weight=1.0, start_frame=0, end_frame=-1,
                custom="0, 1") -> io.NodeOutput:
        from ipa_train.reference.schedule import weight_schedule

        weights = weight_schedule(frames, curve, start_weight, end_weight, start_frame, end_frame, custom)
        text = ", ".join(f"{w:.3f}" for w in weights)
        return io.NodeOutput(weights, text, ui={"text": [text]})


class IPAKitEncodeFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPAKitEncodeFrames", display_name="Encode Reference Per Frame (Kit)", category=CATEGORY,
            description="Unfold: reference i drives latent frame i (the last one repeats for later frames). "
                        "Encodes in chunks so hundreds of frames fit in memory.",
            inputs=[
                Adapter.Input("adapter", tooltip="From IPAKitLoadAdapter or IPAKitPresetLoader."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter needs."),
                io.Image.Input("images", tooltip="One reference per latent frame (an IMAGE batch, e.g. a loaded video)."),
                io.Int.Input("chunk_size", default=16, min=1, max=1024,
                             tooltip="Images encoded at a time; lower it if the encoder runs out of memory."),
                *prep_inputs(),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Optional negative: one image for all frames, or one per frame."),
            ],
            outputs=[Embeds.Output("embeds", display_name="embeds", tooltip="Per-frame image tokens for IPAKitApply.")],
        )

    @classmethod
    def execute(cls, adapter, clip_vision, images, chunk_size=16, crop="center", interpolation="bicubic",
                sharpening=0.0, image_negative=None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ipa_train.hosts.frames import encode_per_frame

        from .dit import is_dit, refuse_frames

        if is_dit(adapter):
            refuse_frames(adapter, "Encode Reference Per Frame", "use Encode Reference Image (Kit) (a batch there is "
                          "several references)")
        bar = comfy.utils.ProgressBar(images.shape[0])

        def chunks():
            for part in images.split(chunk_size):
                mm.throw_exception_if_processing_interrupted()
                yield clip_input(adapter, clip_vision, part, crop, interpolation, sharpening)

        uncond = unconditional_input(adapter, clip_vision, image_negative, (crop, interpolation, sharpening))
        embeds = encode_per_frame(adapter, chunks(), uncond, progress=lambda done: bar.update_absolute(done))
        logger.info("IPAKitEncodeFrames: %d frames encoded in chunks of %d", images.shape[0], chunk_size)
        return io.NodeOutput(embeds)
