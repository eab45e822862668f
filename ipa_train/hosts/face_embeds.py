"""FaceID tokens as ordinary ImageEmbeds, so every apply control (weights, weight types, masks, frames, regions,
several references) works on them unchanged.

The unconditional side is the projection of zero face embeddings (tencent, diffusers, the community pack); for the
plus variants with the CLIP states of the unconditional image (an all-zero normalised image, a black image, or the
negative image, chosen by the caller). Several faces: `concat` projects each face and concatenates the tokens
(portrait: 16 per face); the merges combine the face embeddings and the crops' CLIP states before the projection,
as for CLIP references.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapter.modules import IPAdapter
from ..adapter.references import combine_clip, reference_weights, token_weights
from ..errors import IPAKitError
from .comfy.unet import ImageEmbeds


def _expand(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if t is None or t.shape[0] == n:
        return t
    return t[:1].expand(n, *t.shape[1:])


def _project(adapter: IPAdapter, face: torch.Tensor, clip: torch.Tensor | None, scale: float) -> torch.Tensor:
    """face [N, F] (+ clip [N, L, D]) -> [N, T, C]."""
    return adapter.project_face(face, clip, shortcut_scale=scale)


def encode_face_embeds(adapter: IPAdapter, faces: torch.Tensor, clip: torch.Tensor | None = None,
                       clip_uncond: torch.Tensor | None = None, method: str = "concat",
                       weights: Sequence[float] | torch.Tensor | None = None, shortcut_scale: float = 1.0,
                       per_frame: bool = False) -> ImageEmbeds:
    """N face embeddings [N, F] (and their crops' CLIP states [N, L, D] for plus) -> ImageEmbeds.

    per_frame: keep one row of tokens per face ([N, T, C]), for animation batches where frame i uses face i.
    """
    if not adapter.config.is_faceid:
        raise IPAKitError(f"face embeddings need a FaceID adapter; this one is {adapter.config.variant}: use Encode "
                          "Reference Image (Kit) for it, or load a FaceID adapter")
    n = faces.shape[0]
    if n == 0:
        raise IPAKitError("no face embeddings to encode; every image of the batch was skipped (no face found)")
    faces = faces.float()
    clip, clip_uncond = _expand(clip, n), _expand(clip_uncond, n)
    w = reference_weights(weights, n)
    with torch.no_grad():
        if per_frame:
            cond = _project(adapter, faces, clip, shortcut_scale)  # [N, T, C]
            uncond = _project(adapter, torch.zeros_like(faces[:1]), None if clip_uncond is None else clip_uncond[:1],
                              shortcut_scale)
            return ImageEmbeds(cond, uncond, adapter.config.variant, n)
        merge_w = None if method == "concat" else w
        face_in = combine_clip(faces, method, merge_w)  # [1, N, F] (concat) or [1, F]
        clip_in = None if clip is None else combine_clip(clip, method, merge_w)
        clip_u = None if clip_uncond is None else combine_clip(clip_uncond, method, merge_w)
        rows = face_in.reshape(-1, face_in.shape[-1])  # [N or 1, F]
        cond = _project(adapter, rows, None if clip_in is None else clip_in.reshape(-1, *clip_in.shape[-2:]), shortcut_scale)
        uncond = _project(adapter, torch.zeros_like(rows), None if clip_u is None else clip_u.reshape(-1, *clip_u.shape[-2:]),
                          shortcut_scale)
    groups = n if method == "concat" else 1
    cond, uncond = cond.reshape(1, -1, cond.shape[-1]), uncond.reshape(1, -1, uncond.shape[-1])
    tw = token_weights(w, cond.shape[1] // groups) if method == "concat" else None
    return ImageEmbeds(cond, uncond, adapter.config.variant, n, groups, tw)


def check_embeds_fit(adapter: IPAdapter, embeds: ImageEmbeds) -> None:
    """FaceID embeds go with FaceID adapters only, and the other way round (their token widths may even agree)."""
    face_embeds = str(embeds.variant).startswith("faceid")
    if face_embeds == adapter.config.is_faceid:
        return
    if face_embeds:
        raise IPAKitError(f"these are FaceID embeds ({embeds.variant}) but the adapter is {adapter.config.variant}: "
                          "connect the FaceID adapter that encoded them")
    raise IPAKitError(f"this {adapter.config.variant} adapter needs FaceID embeds from Encode Face (Kit), but these "
                      f"come from a {embeds.variant} adapter's image encoder")


def check_face_options(config, has_negative: bool, shortcut_scale: float) -> None:
    """Options of the plus variants given to an adapter that has no use for them: one line naming the input."""
    plus = config.projection in ("faceid-plus", "faceid-plusv2")
    if has_negative and not plus:
        raise IPAKitError(f"image_negative: this {config.variant} adapter reads no CLIP image, so a negative image "
                          "does nothing; disconnect it (it is for FaceID-Plus / Plus v2)")
    if shortcut_scale != 1.0 and config.projection != "faceid-plusv2":
        raise IPAKitError(f"faceid_v2_weight is {shortcut_scale:g}, but this {config.variant} adapter has no plus v2 "
                          "shortcut; set it back to 1.0 (it is for FaceID-Plus v2)")
