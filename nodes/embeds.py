"""IPAKitSaveEmbeds / IPAKitLoadEmbeds: encoded tokens to and from safetensors; the community's .ipadpt read safely."""

from __future__ import annotations

import os

from comfy_api.latest import io

from .common import CATEGORY, Adapter, Embeds, logger

EMBEDS_SUBDIR = "ipadapter_kit_embeds"  # under the output folder; the loader lists it next to the input folder


def embeds_files() -> list[str]:
    """Embeds files in the input folder (any depth) and in output/ipadapter_kit_embeds (annotated '[output]')."""
    import folder_paths

    from ipa_train.adapter.embeds_file import EMBEDS_EXTENSIONS

    out = []
    for root_dir, tag in ((folder_paths.get_input_directory(), ""), (folder_paths.get_output_directory(), " [output]")):
        for root, _, files in os.walk(root_dir):
            for f in files:
                if f.lower().endswith(EMBEDS_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(root, f), root_dir).replace(os.sep, "/")
                    if tag and not rel.startswith(EMBEDS_SUBDIR + "/"):
                        continue
                    out.append(rel + tag)
    return sorted(out)


class IPAKitSaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPAKitSaveEmbeds", display_name="Save IP-Adapter Embeds (Kit)", category=CATEGORY,
            description="Writes encoded image tokens as safetensors (with the adapter they belong to), to reuse "
                        "without the CLIP vision model.",
            inputs=[
                Embeds.Input("embeds", tooltip="From IPAKitEncodeImage or IPAKitEncodeFrames."),
                Adapter.Input("adapter", tooltip="The adapter the embeds were made with (recorded in the file)."),
                io.String.Input("filename_prefix", default="ipadapter_kit_embeds/embeds",
                                tooltip="Under the output folder; the loader lists output/ipadapter_kit_embeds."),
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="The file written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embeds, adapter, filename_prefix="ipadapter_kit_embeds/embeds") -> io.NodeOutput:
        import folder_paths

        from ipa_train.adapter.embeds_file import write_embeds
        from ipa_train.errors import IPAKitError

        if embeds.cond.shape[-1] != adapter.config.cross_attention_dim or embeds.variant != adapter.config.variant:
            raise IPAKitError(f"these embeds ({embeds.variant}, width {embeds.cond.shape[-1]}) were not made with the "
                              f"connected {adapter.config.variant} adapter; connect the adapter that encoded them")
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
        path = write_embeds(os.path.join(folder, f"{name}_{counter:05}_.safetensors"), embeds.cond, embeds.uncond,
                            adapter.config, embeds.num_images)
        logger.info("IPAKitSaveEmbeds: wrote %s", path)
        return io.NodeOutput(str(path), ui={"text": [str(path)]})


class IPAKitLoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPAKitLoadEmbeds", display_name="Load IP-Adapter Embeds (Kit)", category=CATEGORY,
            description="Reads embeds saved by IPAKitSaveEmbeds, or the community pack's .ipadpt (read as tensors "
                        "only, never running pickled code; projected with the connected adapter).",
            inputs=[
                io.Combo.Input("embeds_file", options=embeds_files(),
                               tooltip=".safetensors (this kit) or .ipadpt (community pack) in the input folder, or "
                                       "saved embeds in output/ipadapter_kit_embeds."),
                Adapter.Input("adapter", tooltip="The adapter to use them with; embeds of another variant are refused."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Only for .ipadpt files of plus/full adapters: computes the neutral "
                                            "unconditional side."),
            ],
            outputs=[Embeds.Output("embeds", display_name="embeds", tooltip="Image tokens for the apply nodes.")],
        )

    @classmethod
    def execute(cls, embeds_file, adapter, clip_vision=None) -> io.NodeOutput:
        import folder_paths
        import torch

        from ipa_train.adapter.embeds_file import check_embeds_for, read_embeds
        from ipa_train.errors import IPAKitError
        from ipa_train.hosts.comfy.unet import ImageEmbeds, encode_embeds

        from .common import clip_outputs_of_zero_pixels

        data = read_embeds(folder_paths.get_annotated_filepath(embeds_file))
        if data.kind == "kit":
            check_embeds_for(data, adapter.config)
            n = int((data.metadata or {}).get("num_images", "1"))
            return io.NodeOutput(ImageEmbeds(data.cond, data.uncond, adapter.config.variant, n))
        clip = data.clip
        adapter.check_clip_input(clip, source=f"{embeds_file} (community embeds)")
        if adapter.config.clip_output == "image_embeds":
            uncond = torch.zeros_like(clip[:1])
        elif clip_vision is not None:
            uncond = clip_outputs_of_zero_pixels(clip_vision)[1]
        else:
            raise IPAKitError(f"{embeds_file}: community embeds for a {adapter.config.variant} adapter need the CLIP "
                              "vision model for the unconditional side; connect clip_vision")
        return io.NodeOutput(encode_embeds(adapter, clip, uncond))
