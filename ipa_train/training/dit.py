"""The Flux / SD3.5 side of `train()`: which official layout a run trains, the adapter it starts from (new, or an
official file of that layout to fine-tune) and the checks that stop a mismatch in one line before work starts."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from ..adapter.dit_formats import DitConfig, detect_dit_config, find_variant, training_config
from ..adapter.dit_modules import DitAdapter, init_for_training, module_state
from ..adapter.files import read_tensors, state_mismatch
from ..errors import TrainConfigError
from .backbone import BackboneSizes
from .config import DEFAULT_DIT_FORMAT, DIT_TRAIN_FORMATS, TrainConfig

logger = logging.getLogger(__name__)

PATCH_PIXELS = 16  # VAE downscale 8 x the transformers' 2x2 latent patches
FAMILY_LABEL = {"flux": "Flux", "sd3": "SD3.5", "unet": "UNet (SD1.5 / SDXL)"}


def resolve_format(config: TrainConfig, family: str) -> TrainConfig:
    """`config` with `format` made concrete for a base model of `family`; one line for a format of another family,
    a UNet run asked for a DiT format (or the reverse) and a resolution the transformer cannot patch."""
    if family not in DEFAULT_DIT_FORMAT:
        if config.is_dit:
            raise TrainConfigError(f"--format {config.format} trains a {FAMILY_LABEL[DIT_TRAIN_FORMATS[config.format][0]]} "
                                   f"adapter, but the base model is a {FAMILY_LABEL.get(family, family)} model; use "
                                   "--format auto for it, or give a Flux / SD3.5 base model")
        return config
    fmt = DEFAULT_DIT_FORMAT[family] if config.format == "auto" else config.format
    if DIT_TRAIN_FORMATS[fmt][0] != family:
        choices = ", ".join(f for f, (fam, _) in DIT_TRAIN_FORMATS.items() if fam == family)
        raise TrainConfigError(f"--format {fmt} is a {FAMILY_LABEL[DIT_TRAIN_FORMATS[fmt][0]]} layout, but the base "
                               f"model is {FAMILY_LABEL[family]}; use --format {choices} (or auto)")
    unet_only = ([f"--projection {config.projection}"] if config.projection != "plain" else []) + \
        (["--fusion"] if config.fusion else [])
    if unet_only:
        raise TrainConfigError(f"the base model is {FAMILY_LABEL[family]}: {' and '.join(unet_only)} "
                               f"{'is a UNet option' if len(unet_only) == 1 else 'are UNet options'}; leave "
                               f"{'it' if len(unet_only) == 1 else 'them'} out (--format {fmt} sets the projection)")
    if config.resolution % PATCH_PIXELS:
        lo = config.resolution // PATCH_PIXELS * PATCH_PIXELS
        raise TrainConfigError(f"--resolution {config.resolution}: {FAMILY_LABEL[family]} patches the latent in 2x2 "
                               f"blocks, so the resolution must be a multiple of {PATCH_PIXELS}; use {lo or 16} or "
                               f"{lo + PATCH_PIXELS}")
    return dataclasses.replace(config, format=fmt)


def new_config(config: TrainConfig, sizes: BackboneSizes) -> DitConfig:
    """The adapter a from-scratch run of `config.format` trains on a transformer of these sizes."""
    clip = sizes.clip_embedding_dim(DIT_TRAIN_FORMATS[config.format][1])  # type: ignore[arg-type]
    hidden = int(sizes.layer_hidden_sizes[0])
    return training_config(config.format, config.tokens, int(sizes.cross_attention_dim), hidden, sizes.double_blocks,
                           sizes.single_blocks, clip, sizes.head_dim)


def init_file_config(path: str, config: TrainConfig) -> tuple[DitConfig, dict[str, torch.Tensor]]:
    """The layout and tensors of an `--init-adapter` file for a DiT run; one line when it is a UNet / FaceID
    file or a file of another format."""
    tensors, metadata, real = read_tensors(path)
    if find_variant(tensors) is None:
        raise TrainConfigError(f"{path}: a UNet (SD1.5 / SDXL / FaceID) adapter cannot start a {config.format} run; "
                               f"give an official {config.format} file as --init-adapter, or leave it out to train "
                               "from scratch")
    cfg = detect_dit_config(tensors, os.fspath(real), metadata)
    if cfg.format != config.format:
        raise TrainConfigError(f"{path}: this is a {FAMILY_LABEL[cfg.family]} adapter of format {cfg.format}, the run trains "
                               f"{config.format}; use --format {cfg.format} (on a {FAMILY_LABEL[cfg.family]} base "
                               "model) or an init file of the run's format")
    return cfg, tensors


def build_dit_adapter(config: TrainConfig, sizes: BackboneSizes) -> DitAdapter:
    """A new adapter for `config.format` (`init_for_training`), or the `--init-adapter` file's tensors placed in an
    adapter of this transformer's shape (one line when the file was made for another width or block count)."""
    want = new_config(config, sizes)
    if not config.init_adapter:
        return init_for_training(DitAdapter(want))
    file_cfg, tensors = init_file_config(config.init_adapter, config)
    cfg = fitted_config(file_cfg, want, config.init_adapter)
    adapter = DitAdapter(cfg)
    load_state(adapter, tensors, config.init_adapter)
    if config.num_tokens and config.num_tokens != cfg.num_tokens:
        logger.info("fine-tuning %s: %d tokens taken from the file (option says %d)", config.init_adapter,
                    cfg.num_tokens, config.num_tokens)
    return adapter


def fitted_config(file_cfg: DitConfig, want: DitConfig, path: str) -> DitConfig:
    """The config of a fine-tuning run: the transformer's widths and block split, the file's projection sizes;
    one line when the file was made for another transformer (width, token width or block count)."""
    if (file_cfg.hidden_size, file_cfg.context_dim, file_cfg.blocks) != (want.hidden_size, want.context_dim, want.blocks):
        raise TrainConfigError(
            f"{path}: this {file_cfg.format} adapter (width {file_cfg.hidden_size}, tokens {file_cfg.context_dim} "
            f"wide, {file_cfg.blocks} blocks) was made for another transformer than the one being trained (width "
            f"{want.hidden_size}, tokens {want.context_dim} wide, {want.blocks} blocks): give the adapter made for "
            "this base model")
    return dataclasses.replace(want, num_tokens=file_cfg.num_tokens, proj_hidden=file_cfg.proj_hidden,
                               resampler_dim=file_cfg.resampler_dim, resampler_depth=file_cfg.resampler_depth,
                               resampler_heads=file_cfg.resampler_heads, timestep_in_dim=file_cfg.timestep_in_dim,
                               timestep_emb_dim=file_cfg.timestep_emb_dim)


def load_state(adapter: DitAdapter, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Copy a file's tensors (official flat keys) into `adapter`; one line when they do not fit."""
    sd = module_state(adapter.config, tensors)
    mismatch = state_mismatch(adapter.state_dict(), sd)
    if mismatch:
        raise TrainConfigError(f"{path}: does not fit the {adapter.config.format} adapter being trained: {mismatch}")
    adapter.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


_TRANSFORMER_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


def _transformer_config(base_model: str | os.PathLike) -> Path | None:
    """The transformer's config.json: in a local diffusers folder, or for a hub id in the local hub cache (no network:
    a hub id not downloaded yet has none, and the family then comes from `--format`)."""
    local = Path(base_model, "transformer", "config.json")
    if local.is_file() or Path(base_model).exists():
        return local if local.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(base_model), "transformer/config.json")
    except (ValueError, OSError):  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def transformer_family(base_model: str | os.PathLike) -> str | None:
    """"flux" | "sd3" from the transformer's config.json (one small file), else None. Loads no weights."""
    config = _transformer_config(base_model)
    if config is None:
        return None
    try:
        return _TRANSFORMER_CLASSES.get(json.loads(config.read_text()).get("_class_name"))
    except (OSError, ValueError):
        return None


def base_model_family(base_model: str | os.PathLike | None, config: TrainConfig) -> str:
    """The family of a run's base model without loading it: its transformer config (a local diffusers folder, or a
    hub id already in the hub cache), or a local folder's unet/, else the family of `--format`, else "unet"."""
    if base_model:
        found = transformer_family(base_model)
        if found or Path(base_model, "unet").is_dir():
            return found or "unet"
    return DIT_TRAIN_FORMATS[config.format][0] if config.is_dit else "unet"


def check_run(config: TrainConfig, base_model: str | os.PathLike | None) -> tuple[TrainConfig, str]:
    """What the command line checks before any model loads: the format against the base model's family, the
    resolution, and the init file's family and format. Returns the resolved config and the family."""
    family = base_model_family(base_model, config)
    config = resolve_format(config, family)
    if config.init_adapter and config.is_dit:
        init_file_config(config.init_adapter, config)
    elif config.init_adapter:
        tensors, _, _ = read_tensors(config.init_adapter)
        v = find_variant(tensors)
        if v is not None:
            raise TrainConfigError(f"{config.init_adapter}: this is a {v.format} ({FAMILY_LABEL[v.family]}) adapter; it "
                                   f"fine-tunes on a {FAMILY_LABEL[v.family]} base model with --format {v.format}, "
                                   f"not on this {FAMILY_LABEL['unet']} model")
    return config, family
