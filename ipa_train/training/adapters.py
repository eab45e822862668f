"""The adapter a run trains, by family: a UNet `IPAdapter` (plain / plus / FaceID, fused or not) or a Flux /
SD3.5 `DitAdapter` in the official layout of `--format`; new, or an adapter file to fine-tune."""

from __future__ import annotations

import logging

from ..adapter.config import AdapterConfig, ResamplerConfig
from ..adapter.dit_modules import DitAdapter
from ..adapter.formats import load_adapter
from ..adapter.modules import IPAdapter
from ..errors import TrainConfigError
from .backbone import Backbone
from .config import TrainConfig
from .dit import build_dit_adapter, fitted_config, init_file_config, new_config
from .faceid import face_adapter_config

logger = logging.getLogger(__name__)



def resampler_config(cross_dim: int) -> ResamplerConfig:
    """The official resampler shape for SD1.5 (768) and SDXL (2048) widths, a proportional one otherwise."""
    if cross_dim == 768:
        return ResamplerConfig(dim=768, depth=4, heads=12, dim_head=64, ff_mult=4)
    if cross_dim == 2048:
        return ResamplerConfig(dim=1280, depth=4, heads=20, dim_head=64, ff_mult=4)
    return ResamplerConfig(dim=cross_dim, depth=4, heads=max(1, cross_dim // 64), dim_head=64, ff_mult=4)


def adapter_config_for(config: TrainConfig, backbone: Backbone) -> AdapterConfig:
    """The adapter a from-scratch run trains on `backbone` (from its config-only sizes: nothing is loaded)."""
    sizes = backbone.sizes
    if config.is_faceid:
        return face_adapter_config(config, sizes)
    cross = int(sizes.cross_attention_dim)
    return AdapterConfig(
        projection=config.projection,
        num_tokens=config.tokens,
        clip_embedding_dim=sizes.clip_embedding_dim(config.clip_output),
        cross_attention_dim=cross,
        layer_hidden_sizes=tuple(sizes.layer_hidden_sizes),
        clip_output=config.clip_output,
        fusion=config.fusion,
        resampler=resampler_config(cross) if config.projection == "plus" else None,
    )


def build_adapter(config: TrainConfig, backbone: Backbone) -> IPAdapter | DitAdapter:
    """A new adapter (UNet: image K/V from the UNet's to_k/to_v; Flux / SD3.5: the official layout of
    `config.format`, `dit.build_dit_adapter`), or the `init_adapter` file to fine-tune."""
    if config.is_dit:
        adapter = build_dit_adapter(config, backbone.sizes)
        backbone.init_adapter(adapter)
        return adapter
    if not config.init_adapter:
        adapter = IPAdapter(adapter_config_for(config, backbone))
        backbone.init_adapter(adapter)
        return adapter
    loaded = load_adapter(config.init_adapter)
    cfg = loaded.config.replace(fusion=config.fusion or loaded.config.fusion)
    if cfg.is_faceid != config.is_faceid:
        raise TrainConfigError(f"{config.init_adapter}: a {cfg.variant} adapter cannot be fine-tuned as {config.projection} "
                               f"(one reads face embeddings, the other CLIP images); use --projection {cfg.projection}")
    if cfg.projection != config.projection:
        logger.info("fine-tuning %s: projection %r taken from the file (option says %r)",
                    config.init_adapter, cfg.projection, config.projection)
    adapter = IPAdapter(cfg)
    missing, unexpected = adapter.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not k.startswith("fusion.") for k in missing):
        raise TrainConfigError(f"{config.init_adapter}: cannot load into a {cfg.variant} adapter "
                               f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    adapter.lora = dict(loaded.lora)
    sizes = backbone.sizes
    hidden = tuple(sizes.layer_hidden_sizes)
    if cfg.layer_hidden_sizes != hidden or cfg.cross_attention_dim != sizes.cross_attention_dim:
        raise TrainConfigError(
            f"{config.init_adapter}: this adapter ({cfg.cross_attention_layers} layers, text width "
            f"{cfg.cross_attention_dim}) was made for another base model than the one being trained "
            f"({len(hidden)} layers, text width {sizes.cross_attention_dim}); pick an adapter of the same family")
    return adapter


def adapter_shape(config: TrainConfig, backbone: Backbone) -> AdapterConfig | object:
    """The config of the adapter a run trains, without building it (no model loads): for the pre-flight."""
    if config.is_dit:
        want = new_config(config, backbone.sizes)
        if not config.init_adapter:
            return want
        return fitted_config(init_file_config(config.init_adapter, config)[0], want, config.init_adapter)
    cfg = load_adapter(config.init_adapter).config if config.init_adapter else adapter_config_for(config, backbone)
    return cfg.replace(fusion=cfg.fusion or config.fusion)
