"""SD3.5 IP-Adapters through ComfyUI's MMDiT joint-block patches (`dit`, "double_block", i), host-free.

Inside a patch the joint block is recomputed from its own modules (the host's `optimized_attention` and
`modulate`), so the adapter gets the image stream's raw q/k, before the model's ln_q/ln_k (it applies its own
norm_q/norm_k), and its term is added to the image rows of the joint attention before the x block's `proj`
(so `gate_msa` scales it). The resampler runs once per step and cond/uncond side (cached by sigma), not per block.
Args of a call: img = x [B, L, C], txt = context [B, S, C], vec = c_mod [B, C], transformer_options.
"""

from __future__ import annotations

from typing import Any

import torch

from ...adapter.dit_attention import sd3_image_attention, sd3_image_kv
from ...errors import BaseModelMismatchError, IPAKitError
from .dit import DitApplication, add_to, block_function, chunks_of, host_function, sigma_of
from .dit_call import call_info


def _raw_qkv(x_block: Any, x: torch.Tensor, c: torch.Tensor):
    """The x stream's projections before ln_q/ln_k [B, L, H, D] each, and the post-attention intermediates."""
    if getattr(x_block, "x_block_self_attn", False) or getattr(x_block, "scale_mod_only", False):
        raise IPAKitError("this MMDiT block has a second self-attention or scale-only modulation (SD3.5 Medium / "
                          "SD3 variants): the InstantX SD3.5 IP-Adapter is made for SD3.5 Large: use SD3.5 Large")
    modulate = host_function(x_block, "modulate")
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = x_block.adaLN_modulation(c).chunk(6, dim=1)
    qkv = x_block.attn.qkv(modulate(x_block.norm1(x), shift_msa, scale_msa))
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, -1, x_block.attn.head_dim).movedim(2, 0)
    return (q, k, v), (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)


def _add_image_terms(x_attn: torch.Tensor, active: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     to: dict) -> torch.Tensor:
    """x_attn [B, L, H*D] + the sum of w * the SD3.5 image branch over the active applications (the weight applied
    in the same pass as the sum)."""
    labels = chunks_of(to, q.shape[0])
    sigma = sigma_of(to)
    info = call_info(to)
    heads = q.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    for app, j, w in active:
        block = app.on(q.device).blocks[j]
        own = next(block.parameters()).dtype  # the branch runs in the adapter's dtype (fp32), the sum in q's
        tokens, temb, tw = app.sd3_tokens(sigma, labels, q.device, own, info)
        k_ip, v_ip = sd3_image_kv(block, tokens, temb, heads)
        if tw is not None:
            v_ip = v_ip * tw.to(v_ip).view(1, 1, -1, 1)
        term = sd3_image_attention(block, *(t.to(own) for t in (qh, kh, vh)), k_ip, v_ip).to(q.dtype)
        factor = app.factor(info, q.shape[1], 0, q.shape[0], q.device, q.dtype)
        x_attn = torch.add(x_attn, term if factor is None else term * factor, alpha=w)  # mask of ones: as none
    return x_attn


def run_joint(block: Any, active: list, args: dict, extra: dict) -> dict:
    x, context, c = args["img"], args["txt"], args["vec"]
    to = args.get("transformer_options") or {}
    attention = block_function(block.x_block, "optimized_attention", to)
    cb, xb = block.context_block, block.x_block
    context_qkv, context_rest = cb.pre_attention(context, c)
    (q_raw, k_raw, v), x_rest = _raw_qkv(xb, x, c)
    b, n = q_raw.shape[:2]
    q = xb.attn.ln_q(q_raw).reshape(b, n, -1)
    k = xb.attn.ln_k(k_raw).reshape(b, n, -1)
    qkv = [torch.cat((ct, t), dim=1) for ct, t in zip(context_qkv, (q, k, v))]
    attn = attention(qkv[0], qkv[1], qkv[2], heads=xb.attn.num_heads, transformer_options=to)
    s = context_qkv[0].shape[1]
    context_attn, x_attn = attn[:, :s], attn[:, s:]
    context = None if cb.pre_only else cb.post_attention(context_attn, *context_rest)
    x_attn = _add_image_terms(x_attn, active, q_raw, k_raw, v, to)
    return {"txt": context, "img": xb.post_attention(x_attn, *x_rest)}


def check_mmdit_model(hidden: int, blocks: int, diffusion_model: Any, file: str) -> None:
    joint = len(diffusion_model.joint_blocks)
    width = int(diffusion_model.joint_blocks[0].x_block.attn.qkv.in_features)
    if width != hidden or joint != blocks:
        name = {2432: "SD3.5 Large", 1536: "SD3.5 Medium / SD3 Medium"}.get(width, "an MMDiT model")
        raise BaseModelMismatchError(
            f"{file}: this InstantX SD3.5 adapter (width {hidden}, {blocks} joint blocks) does not fit this model "
            f"({name}: width {width}, {joint} joint blocks); the InstantX adapter is made for SD3.5 Large: load SD3.5 Large")


def prompt_embedder(diffusion_model: Any, file: str = "adapter"):
    """Fused mode: the prompt as the joint blocks see it, in the width of the SD3.5 image tokens (the model's own
    `context_embedder`, in the dtype the model stores its weights in unless those are fp8, which cast on use)."""
    embed = getattr(diffusion_model, "context_embedder", None)
    if embed is None:
        raise IPAKitError(f"{file}: fused mode needs the model's prompt embedding (context_embedder), which this "
                          "MMDiT model has not: use mode scaled")
    dtype = getattr(diffusion_model, "dtype", None)

    def run(text: torch.Tensor) -> torch.Tensor:
        use = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else text.dtype
        with torch.no_grad():
            return embed(text.to(use))
    return run


def mmdit_patches(diffusion_model: Any, existing: dict, app: DitApplication) -> dict[tuple[str, int], Any]:
    """The `dit` patches to register for `app`: {("double_block", i): patch} for every joint block."""
    return {("double_block", j): add_to(existing.get(("double_block", j)), run_joint, diffusion_model.joint_blocks[j],
                                        (app, j))
            for j in range(len(app.weights))}
