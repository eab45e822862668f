"""Flux IP-Adapters through ComfyUI's `dit` block patches ("double_block" / "single_block", i), host-free.

Inside a patch the block is recomputed from its own modules (the host's `attention` and `apply_mod` included), so
the image attention gets the query the references use, the image stream's QK-normed query before RoPE, and its
result enters where they add it:
- InstantX, double block i: added to the image rows' attention output before `img_attn.proj` (so it passes the
  projection and the gate);
- InstantX, single block i: added to the whole (text + image) attention output before `linear2`;
- XLabs, double block i: added to the image stream after the block, outside any projection or gate.
Args of a double-block call: img [B, L, C], txt [B, S, C], vec [B, C], pe, attn_mask, transformer_options; a
single-block call has img = cat(txt, img).
"""

from __future__ import annotations

from typing import Any

import torch

from ...adapter.dit_attention import flux_image_attention
from ...errors import BaseModelMismatchError, IPAKitError
from .dit import DitApplication, add_to, block_function, chunks_of, host_function
from .dit_call import call_info


def _refuse_modulation(block: Any, vec: Any) -> None:
    if not isinstance(vec, torch.Tensor) or getattr(block, "modulation", True) in (None, False):
        raise IPAKitError("this Flux-type model modulates its blocks from a shared tuple (Flux.2 / Chroma), not per "
                          "block as FLUX.1: the Flux IP-Adapters (InstantX, XLabs) are made for FLUX.1 dev; use a "
                          "FLUX.1 model")


def _heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [B, H, L, D] each
    return q, k, v


def _image_terms(active: list, q: torch.Tensor, labels: list[int], fmt: str, to: dict,
                 lead: int = 0) -> torch.Tensor | None:
    """Sum of w * image attention [* row factor] of the active applications of one format: [B, L, C], or None.

    q: [B, H, L, D]; `lead` rows (a single block's prompt) come before the image rows (see `dit_call`)."""
    info = call_info(to)
    total = None
    for app, j, w in active:
        if app.format != fmt:
            continue
        k_ip, v_ip = app.flux_kv(j, labels, q.device, q.dtype, info)
        term = w * flux_image_attention(q, k_ip, v_ip)
        factor = app.factor(info, q.shape[2], lead, q.shape[0], q.device, q.dtype)
        if factor is not None:
            term = term * factor
        total = term if total is None else total + term
    return total


def run_double(block: Any, active: list, args: dict, extra: dict) -> dict:
    img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
    _refuse_modulation(block, vec)
    to = args.get("transformer_options") or {}
    attention, apply_mod = block_function(block, "attention", to), host_function(block, "apply_mod")
    img_mod1, img_mod2 = block.img_mod(vec)
    txt_mod1, txt_mod2 = block.txt_mod(vec)
    h = block.num_heads
    img_q, img_k, img_v = _heads(block.img_attn.qkv(apply_mod(block.img_norm1(img), 1 + img_mod1.scale, img_mod1.shift, None)), h)
    img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)
    txt_q, txt_k, txt_v = _heads(block.txt_attn.qkv(apply_mod(block.txt_norm1(txt), 1 + txt_mod1.scale, txt_mod1.shift, None)), h)
    txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)
    first, second = ((img_q, img_k, img_v), (txt_q, txt_k, txt_v)) if block.flipped_img_txt else \
        ((txt_q, txt_k, txt_v), (img_q, img_k, img_v))
    q, k, v = (torch.cat((a, b), dim=2) for a, b in zip(first, second))
    attn = attention(q, k, v, pe=pe, mask=args.get("attn_mask"), transformer_options=to)
    if block.flipped_img_txt:
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]
    else:
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

    labels = chunks_of(to, img.shape[0])
    inner = _image_terms(active, img_q, labels, "instantx-flux", to)
    if inner is not None:
        img_attn = img_attn + inner
    img = img + apply_mod(block.img_attn.proj(img_attn), img_mod1.gate, None, None)
    img = img + apply_mod(block.img_mlp(apply_mod(block.img_norm2(img), 1 + img_mod2.scale, img_mod2.shift, None)),
                          img_mod2.gate, None, None)
    txt = txt + apply_mod(block.txt_attn.proj(txt_attn), txt_mod1.gate, None, None)
    txt = txt + apply_mod(block.txt_mlp(apply_mod(block.txt_norm2(txt), 1 + txt_mod2.scale, txt_mod2.shift, None)),
                          txt_mod2.gate, None, None)
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    after = _image_terms(active, img_q, labels, "xlabs-flux", to)
    if after is not None:
        img = img + after
    return {"img": img, "txt": txt}


def run_single(block: Any, active: list, args: dict, extra: dict) -> dict:
    x, vec, pe = args["img"], args["vec"], args["pe"]
    _refuse_modulation(block, vec)
    to = args.get("transformer_options") or {}
    attention, apply_mod = block_function(block, "attention", to), host_function(block, "apply_mod")
    mod, _ = block.modulation(vec)
    qkv, mlp = torch.split(block.linear1(apply_mod(block.pre_norm(x), 1 + mod.scale, mod.shift, None)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = _heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    attn = attention(q, k, v, pe=pe, mask=args.get("attn_mask"), transformer_options=to)
    info = call_info(to)
    lead = info.text_len if info is not None else 0
    inner = _image_terms(active, q, chunks_of(to, x.shape[0]), "instantx-flux", to, lead)
    if inner is not None:
        attn = attn + inner  # the prompt rows too, as the reference
    if getattr(block, "yak_mlp", False):
        half = block.mlp_hidden_dim_first // 2
        mlp = block.mlp_act(mlp[..., half:]) * mlp[..., :half]
    else:
        mlp = block.mlp_act(mlp)
    x = x + apply_mod(block.linear2(torch.cat((attn, mlp), 2)), mod.gate, None, None)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return {"img": x}


def check_flux_model(app_format: str, hidden: int, blocks: int, diffusion_model: Any, file: str) -> tuple[int, int]:
    """(double, single) block counts of the model, after checking the adapter fits it; one line otherwise."""
    double, single = len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)
    width = int(diffusion_model.double_blocks[0].hidden_size)
    params = getattr(diffusion_model, "params", None)
    if getattr(params, "global_modulation", False) or not getattr(diffusion_model.double_blocks[0], "modulation", True):
        raise BaseModelMismatchError(f"{file}: this model is Flux.2 / Chroma (shared modulation); the {app_format} "
                                     "adapter is made for FLUX.1 dev: load a FLUX.1 model")
    want = double + single if app_format == "instantx-flux" else double
    if width != hidden or blocks != want:
        raise BaseModelMismatchError(
            f"{file}: this {app_format} adapter (width {hidden}, {blocks} blocks) does not fit this Flux model "
            f"(width {width}, {double} double + {single} single blocks); load the adapter made for this model")
    return double, single


def flux_patches(diffusion_model: Any, existing: dict, app: DitApplication) -> dict[tuple[str, int], Any]:
    """The `dit` patches to register for `app`: {("double_block" | "single_block", i): patch}."""
    double = len(diffusion_model.double_blocks)
    out = {}
    for j in range(len(app.weights)):
        kind, i = ("double_block", j) if j < double else ("single_block", j - double)
        block = (diffusion_model.double_blocks if kind == "double_block" else diffusion_model.single_blocks)[i]
        run = run_double if kind == "double_block" else run_single
        out[(kind, i)] = add_to(existing.get((kind, i)), run, block, (app, j))
    return out
