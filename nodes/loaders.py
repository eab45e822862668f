"""IPAKitLoadAdapter: a file from models/ipadapter (or the training output) to an adapter."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, Adapter, adapter_files, logger
from .dit import describe as describe_dit


def describe(info: dict) -> str:
    if "format" in info:
        return describe_dit(info)
    fusion = "trained fusion weights" if info["fusion"] else "no fusion weights (fused mode uses the parameter-free fusion)"
    if str(info["projection"]).startswith("faceid"):
        clip = "no CLIP vision" if info["encoder"] == "none" else f"CLIP vision {info['encoder']} for the face crop"
        lora = f"LoRA rank {info['lora_rank']} inside" if info.get("lora_rank") else "no LoRA"
        return (f"{info['variant']} adapter for {info['family']} · {info['num_tokens']} tokens per face · face models "
                f"(Load Face Models) · {clip} · {lora} · {info['cross_attention_layers']} layers")
    return (
        f"{info['variant']} adapter for {info['family']} · {info['num_tokens']} tokens · "
        f"needs CLIP vision {info['encoder']} ({info['clip_output']}) · {info['cross_attention_layers']} layers · {fusion}"
    )


def load(adapter_file: str):
    """-> (adapter, info dict) for a file name of the `ipadapter` model folder."""
    import folder_paths

    from ipa_train.adapter.dit_formats import find_variant
    from ipa_train.adapter.dit_modules import load_dit
    from ipa_train.adapter.formats import build_adapter, detect_config, read_tensors, split_groups

    path = folder_paths.get_full_path_or_raise("ipadapter", adapter_file)
    tensors, metadata, real = read_tensors(path)
    if find_variant(tensors) is not None:  # Flux / SD3.5 (InstantX, XLabs)
        adapter, info = load_dit(tensors, str(real), metadata)
        return adapter.float().eval(), {**info, "file": adapter_file}
    state = split_groups(tensors, metadata, str(real))
    config = detect_config(state)
    adapter = build_adapter(state, config).float().eval()
    info = {
        "file": adapter_file, "variant": config.variant, "family": config.family, "projection": config.projection,
        "num_tokens": config.num_tokens, "encoder": config.encoder, "clip_output": config.clip_output,
        "cross_attention_layers": config.cross_attention_layers, "fusion": config.fusion,
        "parameters": adapter.num_parameters(), "lora_rank": config.lora_rank or None,
    }
    return adapter, info


class IPAKitLoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitLoadAdapter",
            display_name="Load IP-Adapter (Kit)",
            category=f"{CATEGORY}/loaders",
            description="Loads an IP-Adapter file (official h94 files, or adapters trained with this kit) and reports what it needs.",
            inputs=[
                io.Combo.Input("adapter_file", options=adapter_files(), tooltip=(
                    "IP-Adapter weights from ComfyUI/models/ipadapter (shared with other IP-Adapter packs) "
                    "or from output/ipadapter_kit (adapters you trained). .safetensors or .bin.")),
            ],
            outputs=[
                Adapter.Output("adapter", display_name="adapter",
                               tooltip="The loaded IP-Adapter, for the encode and apply nodes."),
                io.String.Output("info", display_name="info",
                                 tooltip="The detected variant, base model family and the CLIP vision encoder this adapter needs."),
            ],
        )

    @classmethod
    def execute(cls, adapter_file: str) -> io.NodeOutput:
        adapter, info = load(adapter_file)
        text = describe(info)
        logger.info("IPAKitLoadAdapter: %s: %s", adapter_file, text)
        # the web extension (web/js/loader_info.js) reads ui.ipakit_info in onExecuted
        return io.NodeOutput(adapter, text, ui={"ipakit_info": [info]})
