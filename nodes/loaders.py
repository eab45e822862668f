"""IPAKitLoadAdapter: a file from models/ipadapter (or the training output) to an adapter."""

from __future__ import annotations

from .common import ADAPTER, CATEGORY, adapter_files, logger


def describe(info: dict) -> str:
    fusion = "trained fusion weights" if info["fusion"] else "no fusion weights (fused mode uses the parameter-free fusion)"
    return (
        f"{info['variant']} adapter for {info['family']} · {info['num_tokens']} tokens · "
        f"needs CLIP vision {info['encoder']} ({info['clip_output']}) · {info['cross_attention_layers']} layers · {fusion}"
    )


class IPAKitLoadAdapter:
    DESCRIPTION = "Loads an IP-Adapter file (official h94 files, or adapters trained with this kit) and reports what it needs."
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (ADAPTER, "STRING")
    RETURN_NAMES = ("adapter", "info")
    OUTPUT_TOOLTIPS = (
        "The loaded IP-Adapter, for the encode and apply nodes.",
        "The detected variant, base model family and the CLIP vision encoder this adapter needs.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "adapter_file": (adapter_files(), {
                    "tooltip": "IP-Adapter weights from ComfyUI/models/ipadapter (shared with other IP-Adapter packs) "
                               "or from output/ipadapter_kit (adapters you trained). .safetensors or .bin."}),
            }
        }

    def load(self, adapter_file: str):
        import folder_paths

        from ipa_train.adapter.formats import build_adapter, detect_config, read_adapter_state

        path = folder_paths.get_full_path_or_raise("ipadapter", adapter_file)
        state = read_adapter_state(path)
        config = detect_config(state)
        adapter = build_adapter(state, config).float().eval()
        info = {
            "file": adapter_file, "variant": config.variant, "family": config.family, "projection": config.projection,
            "num_tokens": config.num_tokens, "encoder": config.encoder, "clip_output": config.clip_output,
            "cross_attention_layers": config.cross_attention_layers, "fusion": config.fusion,
            "parameters": adapter.num_parameters(),
        }
        text = describe(info)
        logger.info("IPAKitLoadAdapter: %s: %s", adapter_file, text)
        return {"ui": {"ipakit_info": [info]}, "result": (adapter, text)}
