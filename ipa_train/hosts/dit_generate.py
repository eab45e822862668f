"""Sampling a diffusers Flux / SD3.5 backbone with a DiT adapter: the training processors (`install_flux` /
`install_sd3`), an Euler flow-matching sampler on the backbone's own shifted sigmas, classifier-free guidance
by batch (Flux dev's guidance input instead, where the transformer has one), scaled or fused image tokens.

Used for validation samples during training and by the shapes world's measurements.
"""

from __future__ import annotations

from typing import Any

import torch

from ..adapter.dit_modules import DitAdapter, ImageTokens
from ..adapter.modules import TextImageFusion
from ..errors import IPAKitError
from ..training.backbone import TextCondition


def _latent_shape(backbone: Any, size: int) -> tuple[int, int]:
    """(channels, side) of the VAE latents of a `size` px image (downscale 2 ** (len(block_out_channels) - 1))."""
    cfg = backbone.get("vae").config
    return int(cfg.latent_channels), size // 2 ** (len(cfg.block_out_channels) - 1)


def _decode(backbone: Any, latents: torch.Tensor) -> torch.Tensor:
    vae = backbone.get("vae")
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    x = vae.decode((latents / float(vae.config.scaling_factor) + shift).to(vae.dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1)  # [B, 3, H, W]


def _fuse(backbone: Any, tokens: torch.Tensor, text: torch.Tensor, lam: float) -> torch.Tensor:
    """Fused mode, parameter-free: each row's image tokens [T, C] attend to its prompt as the blocks see it (Flux:
    T5 states; SD3: after `context_embedder`) and are mixed back with `lam`."""
    if backbone.family == "sd3":
        text = backbone.transformer.context_embedder(text.to(backbone.transformer.dtype)).float()
    if text.shape[-1] != tokens.shape[-1]:
        raise IPAKitError(f"fused mode: the prompt tokens are {text.shape[-1]} wide but the image tokens "
                          f"{tokens.shape[-1]}; use mode scaled")
    return TextImageFusion(tokens.shape[-1], trainable=False)(tokens.float(), text.float(), lam)


def _cat(a: TextCondition, b: TextCondition) -> TextCondition:
    return TextCondition(torch.cat([a.hidden, b.hidden]), {k: torch.cat([a.extra[k], b.extra[k]]) for k in a.extra})


@torch.no_grad()
def generate_dit(backbone: Any, adapter: DitAdapter, pixels: torch.Tensor, prompts: list[str], *,
                 mode: str = "scaled", weight: float = 1.0, fusion_lambda: float = 0.8, steps: int = 20,
                 guidance: float = 3.5, size: int = 512, seed: int = 0) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1], one per prompt, with the adapter at `weight`.

    pixels: the image encoder's input of the reference(s) [B or 1, 3, S, S] (`backbone.image_input`). The
    unconditional rows take the empty prompt and a zero image embedding, as training drops them; in fused mode
    only the conditional rows' image tokens are fused.
    """
    if mode not in ("scaled", "fused"):
        raise IPAKitError(f"mode must be 'scaled' or 'fused', got {mode!r}")
    b = len(prompts)
    training, was = adapter.training, backbone.installed  # validation during training: put both back after
    backbone.detach()
    adapter = adapter.to(backbone.device).eval()
    embeds = backbone.encode_image(pixels, adapter.config.clip_output)
    embeds = embeds.expand(b, *embeds.shape[1:]) if embeds.shape[0] != b else embeds
    text = backbone.encode_text(prompts)
    cfg = not backbone.guidance_input  # Flux dev: guidance distilled into an input, one batch
    if cfg:
        text, embeds = _cat(backbone.encode_text([""] * b), text), torch.cat([torch.zeros_like(embeds), embeds])
    else:
        text.extra["guidance"] = torch.full((b,), float(guidance))
    channels, side = _latent_shape(backbone, size)
    x = torch.randn(b, channels, side, side, generator=torch.Generator().manual_seed(seed)).to(backbone.device)
    sigmas = backbone.schedule.sampling_sigmas(steps, x)
    backbone.attach(adapter)
    try:
        for i in range(steps):
            rows = torch.cat([x, x]) if cfg else x
            t = sigmas[i].expand(rows.shape[0]).to(backbone.device)
            ip = adapter.image_tokens(embeds.to(backbone.device), t)
            if mode == "fused":
                fused = _fuse(backbone, ip.tokens[-b:], text.hidden[-b:].to(ip.tokens.device), fusion_lambda)
                ip = ImageTokens(torch.cat([ip.tokens[:-b], fused]) if cfg else fused, ip.temb)
            ip.weight = float(weight)
            v = backbone.predict(rows, t, text, ip)
            if cfg:
                uncond, cond = v.chunk(2)
                v = uncond + guidance * (cond - uncond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    finally:
        backbone.detach()
        adapter.train(training)
        if was is not None:
            backbone.attach(was[1])
    return _decode(backbone, x)
