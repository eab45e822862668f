"""What a DiT block patch needs to know about the model call it runs in, and cannot read from the block's args.

One APPLY_MODEL wrapper per applied adapter (ComfyUI calls it as `wrapper(executor, x, t, c_concat, c_crossattn,
control, transformer_options, **kwargs)` around every model call) records, under `transformer_options[CALL_KEY]`:
- the generated latent's token grid: Flux packs 2x2 latent patches (SD3 patchifies the same way), row-major, and
  Kontext-style workflows append reference latents to `img` after those h*w rows; the image attention covers only
  the generated image (as in the references, which have no appended latents), and an attention mask maps onto it;
- the prompt's length: a Flux single block holds cat(txt, img);
- in fused mode, the image tokens of that adapter fused with each cond row's prompt (once per call, not per block).

Row factors: an image term of shape [B, L, C] is multiplied per row by [B, L, 1]: the generated image's rows by the
mask resized to its token grid (1 without a mask), appended reference-latent rows by 0, and the prompt rows of a
single block (which the InstantX reference also updates) by the mask's mean over the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...adapter.attention import mask_for_layer
from ...adapter.modules import TextImageFusion
from ...errors import EncoderMismatchError, IPAKitError

CALL_KEY = "ipakit_dit_call"
APPLY_MODEL = "apply_model"  # ComfyUI's WrappersMP.APPLY_MODEL


@dataclass
class CallInfo:
    """grid: token grid (h, w) of the generated latent; text_len: prompt tokens as the model received them;
    fused: application uid -> per-row image tokens [B, T, C] (cond rows fused, uncond rows as projected);
    ran: (application uid, adapter block) pairs applied in this call, so that a patch of another pack that calls
    ours inside its own, under ours put back on top of it, cannot apply one adapter block twice;
    trained: application uid -> (image tokens [B, T, C], SD3.5 time embedding [B, E] or None) of an adapter being
    trained, one row per sample and with gradients (`dit_train`);
    functions: host functions the block patches use instead of the host's in this call (by name: "attention",
    "optimized_attention"), e.g. differentiable attention during training."""

    grid: tuple[int, int]
    text_len: int
    fused: dict[str, torch.Tensor] = field(default_factory=dict)
    ran: set[tuple[str, int]] = field(default_factory=set)
    trained: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    functions: dict[str, Callable] = field(default_factory=dict)


def call_info(transformer_options: dict) -> CallInfo | None:
    return transformer_options.get(CALL_KEY)


def token_grid(latent_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """Token grid of a latent [.., H, W] patchified by `patch` (padded up to a multiple of it, as both hosts do)."""
    h, w = latent_hw
    return -(-h // patch), -(-w // patch)


def check_mask(mask: torch.Tensor | None, family: str) -> torch.Tensor | None:
    """A ComfyUI MASK [H, W] or [1, H, W] -> [1, H, W] float; several masks are one per frame, which Flux and
    SD3.5 (one image per latent) have not: one line."""
    if mask is None:
        return None
    m = mask if mask.dim() == 3 else mask.reshape(1, *mask.shape[-2:])
    if m.dim() != 3 or m.shape[0] != 1:
        raise IPAKitError(f"attn_mask has shape {tuple(mask.shape)}: {family} models take one mask [H, W] (a batch "
                          "of masks is one per animation frame, which this family has not); pass a single mask")
    return m.float()


def row_factor(mask: torch.Tensor | None, info: CallInfo | None, rows: int, lead: int, batch: int,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """[batch, rows, 1] multiplier of an image term over a block's sequence, or None when every row gets 1.

    Args:
        mask: [1, H, W] or None.
        rows: the sequence length of the term; `lead` of them (a single block's prompt rows) come before the image.
    """
    image = rows - lead
    grid = info.grid if info is not None else None
    main = min(image, grid[0] * grid[1]) if grid is not None else image
    if mask is None and main == image:
        return None
    if mask is None:
        m = torch.ones(1, main, 1, device=device)
    else:
        # without a recorded grid the mask's own aspect ratio finds it (`mask_for_layer`)
        hw = grid if grid is not None and main == grid[0] * grid[1] else tuple(mask.shape[-2:])
        m = mask_for_layer(mask.to(device), hw, main)  # [1, main, 1]
    parts = [m.mean(dim=1, keepdim=True).expand(1, lead, 1), m, torch.zeros(1, image - main, 1, device=device)]
    return torch.cat(parts, dim=1).to(dtype).expand(batch, rows, 1)


def fuse_rows(tokens: torch.Tensor, text: torch.Tensor, labels: list[int], lam: float) -> torch.Tensor:
    """Fused mode, parameter-free (these files carry no fusion weights): each cond row's image tokens [T, C] attend
    to that row's prompt [S, C] and are mixed back with lambda; uncond rows keep their tokens. [B, T, C] in fp32."""
    if text.shape[-1] != tokens.shape[-1]:
        raise EncoderMismatchError(
            f"fused mode: the prompt tokens are {text.shape[-1]} wide but this adapter's image tokens are "
            f"{tokens.shape[-1]}: use the text encoder of the adapter's base model, or mode scaled")
    tokens = tokens.float()
    fused = TextImageFusion(tokens.shape[-1], trainable=False)(tokens, text.float(), lam)
    is_cond = torch.tensor([lab != 1 for lab in labels], device=tokens.device).view(-1, 1, 1)
    return torch.where(is_cond, fused, tokens)


class DitCallWrapper:
    """The APPLY_MODEL wrapper of one applied DiT adapter (see the module docstring).

    Args:
        app: the `DitApplication`; its `fused_tokens(text, labels, opts)` gives the fused per-row tokens.
        patch: the model's patch size; embed_text: the prompt as the blocks see it, in the image tokens' width
            (identity for Flux, whose adapters' tokens live in the text encoder's width; SD3's `context_embedder`).
        restore: puts our block patches back when a pack registered its own over them after us (`dit.restorer`).
    """

    def __init__(self, app: Any, patch: int, embed_text: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 restore: Callable[[dict], dict | None] | None = None):
        self.app, self.patch, self.embed_text, self.restore = app, int(patch), embed_text, restore

    def __deepcopy__(self, memo: dict) -> DitCallWrapper:
        return self

    def __call__(self, executor: Any, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None,
                 control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> Any:
        opts = dict(transformer_options or {})
        prev = opts.get(CALL_KEY)
        text_len = int(c_crossattn.shape[1]) if isinstance(c_crossattn, torch.Tensor) else 0
        info = CallInfo(token_grid(tuple(x.shape[-2:]), self.patch), text_len, dict(prev.fused) if prev else {})
        if self.app.fused and isinstance(c_crossattn, torch.Tensor):
            text = c_crossattn if self.embed_text is None else self.embed_text(c_crossattn)
            info.fused[self.app.uid] = self.app.fused_tokens(text, opts)
        opts[CALL_KEY] = info
        replaced = opts.get("patches_replace") or {}
        dit = self.restore(replaced.get("dit") or {}) if self.restore is not None else None
        if dit is not None:
            opts["patches_replace"] = {**replaced, "dit": dit}
        return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)
