"""Flux and SD3.5 adapters on the existing load / encode / apply nodes: thin translation into ipa_train calls."""

from __future__ import annotations

import torch

from .common import logger

_HEADS: dict[str, object] = {}  # SigLIP pooling heads by file, read once


def is_dit(adapter) -> bool:
    from ipa_train.adapter.dit_modules import DitAdapter

    return isinstance(adapter, DitAdapter)


def describe(info: dict) -> str:
    """The loader's info line for a DiT adapter: family, format, encoder, tokens, blocks."""
    return (f"{info['format']} adapter for {info['family']} · {info['num_tokens']} tokens · needs CLIP vision "
            f"{info['encoder']} ({info['clip_output']}) · {info['blocks']} blocks")


def _pooling_head():
    import folder_paths

    from ipa_train.adapter.siglip_head import NO_HEAD, find_head
    from ipa_train.errors import EncoderMismatchError

    paths = [folder_paths.get_full_path("clip_vision", n) for n in folder_paths.get_filename_list("clip_vision")]
    for p in paths:
        if p in _HEADS:
            return _HEADS[p]
    found = find_head([p for p in paths if p], width=1152)
    if found is None:
        raise EncoderMismatchError(NO_HEAD.format(where="no .safetensors file in ComfyUI/models/clip_vision has it"))
    head, path = found
    logger.info("IPAKit: SigLIP pooling head from %s", path)
    _HEADS[path] = head
    return head


def _features(adapter, clip_vision, image: torch.Tensor, crop: str) -> torch.Tensor:
    from ipa_train.adapter.dit_encoder import check_features

    out = clip_vision.encode_image(image, crop=(crop == "center"))
    fmt = adapter.config.format
    if fmt == "xlabs-flux":
        feats = out["image_embeds"].float()
    elif fmt == "instantx-sd3":
        feats = out["penultimate_hidden_states"].float()
    else:
        seq = out["last_hidden_state"].float()
        if seq.dim() != 3 or seq.shape[-1] != 1152:
            check_features(adapter.config, seq if seq.dim() == 2 else seq[:, 0])
        with torch.no_grad():
            feats = _pooling_head()(seq)
    check_features(adapter.config, feats)
    return feats.cpu()


def encode_dit(adapter, clip_vision, image: torch.Tensor, combine: str = "concat", crop: str = "center",
               image_negative: torch.Tensor | None = None, reference_weights: str = ""):
    """CLIP vision outputs of the references and of the unconditional side -> DitEmbeds."""
    from ipa_train.adapter.dit_encoder import negative_is_black_image
    from ipa_train.adapter.references import parse_weight_list
    from ipa_train.hosts.comfy.dit import DitEmbeds

    cond = _features(adapter, clip_vision, image, crop)
    if image_negative is not None:
        uncond = _features(adapter, clip_vision, image_negative, crop)
    elif negative_is_black_image(adapter.config):
        uncond = _features(adapter, clip_vision, torch.zeros_like(image[:1]), crop)
    else:
        uncond = torch.zeros_like(cond[:1])
    weights = parse_weight_list(reference_weights or "")
    return DitEmbeds(cond, uncond, adapter.config.format, combine, tuple(weights) or None)


def block_weights(adapter, layers: str, layer_weights: str) -> list[float]:
    """`layers` all / custom ("index:weight" by block index: Flux double blocks first, then single) -> [blocks]."""
    from ipa_train.errors import IPAKitError

    n = adapter.config.blocks
    if layers == "all":
        return [1.0] * n
    if layers != "custom":
        raise IPAKitError(f"layers '{layers}' is a SD1.5/SDXL preset; for {adapter.config.format} choose 'all' or "
                          f"'custom' with 'index:weight' pairs over its {n} blocks")
    out = [0.0] * n
    for part in (layer_weights or "").replace(";", ",").split(","):
        if not part.strip():
            continue
        try:
            idx, w = part.split(":")
            i, value = int(idx), float(w)
        except ValueError:
            raise IPAKitError(f"layer_weights: cannot read {part.strip()!r}; write 'index:weight' pairs such as "
                              "'0:1.0, 5:0.5'") from None
        if not 0 <= i < n:
            raise IPAKitError(f"layer_weights: block {i} does not exist; this {adapter.config.format} adapter has "
                              f"blocks 0..{n - 1}")
        out[i] = value
    return out


def refuse_frames(adapter, what: str, fix: str) -> None:
    """Per-frame inputs with a Flux / SD3.5 adapter: one line naming the family (these models have no frames)."""
    from ipa_train.errors import IPAKitError

    family = {"flux": "Flux", "sd3": "SD3.5"}[adapter.config.family]
    raise IPAKitError(f"{what}: {family} models make one image per latent and have no animation frames, so the "
                      f"{adapter.config.format} adapter takes no per-frame input; {fix}")


def apply_dit_node(model, adapter, embeds, mode: str = "scaled", weight: float = 1.0, start_at: float = 0.0,
                   end_at: float = 1.0, layers: str = "all", layer_weights: str = "", attn_mask=None,
                   frame_weights=None, weight_type: str = "linear", fusion_lambda: float = 0.8):
    from ipa_train.errors import IPAKitError
    from ipa_train.hosts.comfy.dit import DitEmbeds
    from ipa_train.hosts.comfy.dit_apply import apply_dit

    fmt = adapter.config.format
    if frame_weights is not None:
        refuse_frames(adapter, "frame_weights", "disconnect frame_weights")
    if weight_type != "linear":
        raise IPAKitError(f"weight_type '{weight_type}' is a SD1.5/SDXL layer table; for the {fmt} adapter use "
                          "linear, and 'custom' layers with 'index:weight' pairs for per-block weights")
    if not isinstance(embeds, DitEmbeds):
        raise IPAKitError(f"these embeds were encoded for a SD1.5/SDXL adapter; encode the image with this {fmt} adapter")
    return apply_dit(model, adapter, embeds, weight, start_at, end_at, block_weights(adapter, layers, layer_weights),
                     file=fmt, attn_mask=attn_mask, mode=mode, fusion_lambda=fusion_lambda)


def refuse_unet_adapter_on_dit(model, adapter) -> None:
    """A SD1.5/SDXL adapter on a Flux or SD3 model: one line naming both sides."""
    from ipa_train.errors import BaseModelMismatchError
    from ipa_train.hosts.comfy.dit_apply import model_family

    fam = model_family(model.get_model_object("diffusion_model"))
    if fam in ("flux", "sd3"):
        raise BaseModelMismatchError(
            f"this {adapter.config.variant} adapter is made for {adapter.config.family} (a UNet), but the model is "
            f"{'a Flux' if fam == 'flux' else 'an SD3 (MMDiT)'} model: load a Flux / SD3.5 IP-Adapter (InstantX, "
            "XLabs) for this model, or a SD1.5/SDXL checkpoint for this adapter")
