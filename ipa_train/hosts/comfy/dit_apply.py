"""Applying a Flux or SD3.5 adapter to a ComfyUI model: fit checks, then one `dit` patch per adapted block.

`model` is a ComfyUI ModelPatcher, used only through its methods (`clone`, `get_model_object`, `model_options`,
`set_model_patch_replace`); ComfyUI is never imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ...adapter.dit_modules import DitAdapter
from ...errors import BaseModelMismatchError
from .dit import BlockPatch, DitApplication, DitEmbeds, restorer
from .dit_call import APPLY_MODEL, DitCallWrapper, check_mask
from .flux import check_flux_model, flux_patches
from .mmdit import check_mmdit_model, mmdit_patches, prompt_embedder

logger = logging.getLogger(__name__)

_FAMILY_LABEL = {"flux": "Flux", "sd3": "SD3.5"}


def model_family(diffusion_model: Any) -> str:
    """"flux" (double/single blocks), "sd3" (MMDiT joint blocks), "unet" (input/output blocks) or "unknown"."""
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks"):
        return "flux"
    if hasattr(diffusion_model, "joint_blocks"):
        return "sd3"
    if hasattr(diffusion_model, "input_blocks"):
        return "unet"
    return "unknown"


def check_family(adapter: DitAdapter, diffusion_model: Any, file: str) -> str:
    """The model's family after checking it is the adapter's; one line naming both sides otherwise."""
    cfg = adapter.config
    fam = model_family(diffusion_model)
    if fam != cfg.family:
        have = {"unet": "a UNet model (SD1.5 / SDXL)", "flux": "a Flux model", "sd3": "an SD3 (MMDiT) model"}.get(
            fam, f"a {type(diffusion_model).__name__} model")
        want = {"flux": "a FLUX.1 dev checkpoint", "sd3": "an SD3.5 Large checkpoint"}[cfg.family]
        raise BaseModelMismatchError(
            f"{file}: this {cfg.format} adapter is made for {_FAMILY_LABEL[cfg.family]}, but the model is {have}: "
            f"load {want}, or an adapter made for this model")
    return fam


def apply_dit(model: Any, adapter: DitAdapter, embeds: DitEmbeds, weight: float = 1.0, start_at: float = 0.0,
              end_at: float = 1.0, block_weights: Sequence[float] | None = None, file: str = "adapter",
              attn_mask: Any = None, mode: str = "scaled", fusion_lambda: float = 1.0) -> Any:
    """A clone of `model` with the adapter's image attention in every adapted block.

    Args:
        start_at, end_at: ComfyUI percents of the sampling, turned into sigmas by the model's own sampling
            (right under SD3's shift).
        block_weights: one multiplier per adapter block (file order: Flux double then single blocks), default 1.
        attn_mask: optional ComfyUI MASK [H, W] / [1, H, W]: the image term acts where it is white.
        mode, fusion_lambda: "fused": the image tokens first attend to the prompt (parameter-free), mixed by lambda.
    """
    cfg = adapter.config
    dm = model.get_model_object("diffusion_model")
    fam = check_family(adapter, dm, file)
    if fam == "flux":
        check_flux_model(cfg.format, cfg.hidden_size, cfg.blocks, dm, file)
        heads = int(dm.double_blocks[0].num_heads)
    else:
        check_mmdit_model(cfg.hidden_size, cfg.blocks, dm, file)
        heads = int(dm.joint_blocks[0].x_block.attn.num_heads)
    if embeds.format != cfg.format:
        raise BaseModelMismatchError(f"{file}: the image embeds were encoded for a {embeds.format} adapter, not this "
                                     f"{cfg.format} one: encode the image with this adapter")
    weights = list(block_weights) if block_weights is not None else [1.0] * cfg.blocks
    if len(weights) != cfg.blocks:
        raise ValueError(f"{len(weights)} block weights for the {cfg.blocks} blocks of this {cfg.format} adapter")
    sampling = model.get_model_object("model_sampling")
    app = DitApplication(adapter, embeds, weight, weights, sigma_start=float(sampling.percent_to_sigma(start_at)),
                         sigma_end=float(sampling.percent_to_sigma(end_at)), heads=heads,
                         mask=check_mask(attn_mask, _FAMILY_LABEL[fam]), mode=mode, fusion_lambda=fusion_lambda)
    m = model.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    patches = flux_patches(dm, existing, app) if fam == "flux" else mmdit_patches(dm, existing, app)
    foreign = [k for k in patches if k in existing and not isinstance(existing[k], BlockPatch)]
    if foreign:
        logger.info("chaining onto %d dit block patches of another node pack (e.g. %s)", len(foreign), foreign[0])
    for (kind, i), patch in patches.items():
        m.set_model_patch_replace(patch, "dit", kind, i)
    if fam == "flux":
        wrapper = DitCallWrapper(app, int(dm.patch_size), restore=restorer(app, patches))
    else:
        embed = prompt_embedder(dm, file) if app.fused else None
        wrapper = DitCallWrapper(app, int(dm.x_embedder.patch_size[0]), embed, restorer(app, patches))
    m.add_wrapper_with_key(APPLY_MODEL, f"ipakit_dit_{app.uid}", wrapper)
    if app.fused:
        logger.info("%s: fused mode with the parameter-free fusion (these files carry no fusion weights)", file)
    return m
