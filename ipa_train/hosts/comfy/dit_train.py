"""Training a Flux or SD3.5 adapter through ComfyUI's own model and the block patches that sample with it, host-free.

The adapter being trained is one `TrainingApplication`. Its image tokens arrive with each model call, one row per
sample and with gradients (`CallInfo.trained`), and every patched block computes its image K/V from the trainable
weights in that call (never cached, never under no_grad), so the loss reaches the projection, every block's K/V
and the norms the format has through the same `run_double` / `run_single` / `run_joint` that sampling uses.

Blocks the adapter does not patch (XLabs' single blocks) are recomputed out of place by the same functions with
no adapter term: ComfyUI's blocks add into their input in place, which autograd refuses once that input carries
gradients. The frozen model's attention runs as `TRAINING_FUNCTIONS` (differentiable). With `use_checkpoint`
every block is recomputed in the backward pass instead of keeping its activations (torch.utils.checkpoint), the
memory plan for large frozen transformers.

Sigma and timestep: the model's own `model_sampling.timestep(sigma)` (Flux: sigma; SD3: sigma * 1000), the
same call a sampler makes; `x_t = (1 - sigma) x0 + sigma noise` and the model predicts `noise - x0` in both.
`model` arguments are ComfyUI objects used through their attributes; ComfyUI is never imported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ...adapter.dit_attention import flux_image_kv, flux_joint_attention, mmdit_joint_attention
from ...adapter.dit_modules import DitAdapter
from ...errors import IPAKitError
from .dit import DitApplication, DitEmbeds
from .dit_apply import model_family
from .dit_call import CALL_KEY, CallInfo, token_grid
from .flux import check_flux_model, run_double, run_single
from .mmdit import check_mmdit_model, run_joint

# The model's own attention during training: PyTorch SDPA after a differentiable RoPE. ComfyUI's Flux RoPE is a
# compiled op without a backward, and its attention backend may be one without a backward (sage attention).
TRAINING_FUNCTIONS = {"attention": flux_joint_attention, "optimized_attention": mmdit_joint_attention}


class TrainingApplication(DitApplication):
    """The adapter being trained, applied at weight 1 on every one of its blocks at every sigma."""

    def __init__(self, adapter: DitAdapter, heads: int):
        cfg = adapter.config
        empty = torch.zeros(1, 1)
        super().__init__(adapter, DitEmbeds(empty, empty, cfg.format), 1.0, [1.0] * cfg.blocks, heads=heads)

    def _rows(self, info: CallInfo | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if info is None or self.uid not in info.trained:
            raise IPAKitError("the training patch ran outside a training step (no image tokens for this call)")
        return info.trained[self.uid]

    def flux_kv(self, j, labels, device, dtype, info=None):
        tokens, _ = self._rows(info)
        return flux_image_kv(self.adapter.blocks[j], tokens, self.heads, self.format)  # [B, H, T, D], with grad

    def sd3_tokens(self, sigma, labels, device, dtype, info=None):
        tokens, temb = self._rows(info)
        return tokens, temb, None

    def on(self, device: Any) -> DitAdapter:
        return self.adapter  # the trained parameters themselves, already on the training device


class TrainingPatch:
    """The `dit` patch of one block during training: `run(block, entries, args, extra)` with this call's entries
    (none for a block the adapter does not patch), optionally under activation checkpointing."""

    def __init__(self, run, block: Any, entries: list, outputs: tuple[str, ...], use_checkpoint: bool = False):
        self.run, self.block, self.entries, self.outputs = run, block, entries, outputs
        self.use_checkpoint = use_checkpoint

    def __deepcopy__(self, memo: dict) -> TrainingPatch:
        return self

    def to(self, device: Any) -> TrainingPatch:
        return self

    def __call__(self, args: dict, extra: dict) -> dict:
        if not self.use_checkpoint or not torch.is_grad_enabled():
            return self.run(self.block, self.entries, args, extra)
        names = [k for k in ("img", "txt", "vec") if isinstance(args.get(k), torch.Tensor)]

        def forward(*streams: torch.Tensor) -> tuple:
            out = self.run(self.block, self.entries, {**args, **dict(zip(names, streams))}, extra)
            return tuple(out.get(k) for k in self.outputs)

        values = checkpoint(forward, *(args[k] for k in names), use_reentrant=False)
        return dict(zip(self.outputs, values))


def check_fit(adapter: DitAdapter, diffusion_model: Any, file: str = "adapter") -> int:
    """The model's attention heads after checking the adapter fits this model; one line naming both otherwise."""
    cfg = adapter.config
    fam = model_family(diffusion_model)
    if fam != cfg.family:
        raise IPAKitError(f"{file}: a {cfg.format} adapter ({cfg.family}) cannot be trained on this {fam} model: "
                          f"pick the format of the model's family")
    if fam == "flux":
        check_flux_model(cfg.format, cfg.hidden_size, cfg.blocks, diffusion_model, file)
        return int(diffusion_model.double_blocks[0].num_heads)
    check_mmdit_model(cfg.hidden_size, cfg.blocks, diffusion_model, file)
    return int(diffusion_model.joint_blocks[0].x_block.attn.num_heads)


def training_patches(diffusion_model: Any, app: TrainingApplication,
                     use_checkpoint: bool = False) -> dict[tuple[str, int], TrainingPatch]:
    """{("double_block" | "single_block", i): patch} for every block of the model (see the module docstring)."""
    out = {}
    if model_family(diffusion_model) == "sd3":
        for j, block in enumerate(diffusion_model.joint_blocks):
            out[("double_block", j)] = TrainingPatch(run_joint, block, [(app, j, 1.0)], ("txt", "img"), use_checkpoint)
        return out
    double = len(diffusion_model.double_blocks)
    adapted = app.adapter.config.blocks
    for i, block in enumerate(diffusion_model.double_blocks):
        entries = [(app, i, 1.0)] if i < adapted else []
        out[("double_block", i)] = TrainingPatch(run_double, block, entries, ("img", "txt"), use_checkpoint)
    for i, block in enumerate(diffusion_model.single_blocks):
        entries = [(app, double + i, 1.0)] if double + i < adapted else []
        out[("single_block", i)] = TrainingPatch(run_single, block, entries, ("img",), use_checkpoint)
    return out


def patch_size(diffusion_model: Any) -> int:
    if model_family(diffusion_model) == "flux":
        return int(diffusion_model.patch_size)
    return int(diffusion_model.x_embedder.patch_size[0])


def predict(diffusion_model: Any, model_sampling: Any, app: TrainingApplication, noisy: torch.Tensor,
            sigmas: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, tokens: torch.Tensor,
            temb: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
            transformer_options: dict | None = None) -> torch.Tensor:
    """The model's velocity prediction [B, C, H, W] with the adapter's image attention, differentiable in the
    adapter's parameters (through `tokens` [B, T, C] and `temb` [B, E] and every block's K/V).

    Args:
        noisy: latents x_t [B, C, H, W] (the model's latent format, `process_latent_in` applied).
        sigmas: [B] flow-matching sigma of each sample; the model gets `model_sampling.timestep(sigmas)`.
        context, pooled: the text conditioning as ComfyUI's CLIP gives it ([B, S, C], [B, P]).
        guidance: Flux-dev's distilled guidance [B] (ignored by models without a guidance input).
        transformer_options: the patched model's (holding the training patches); copied, never changed.
    """
    to = dict(transformer_options or {})
    info = CallInfo(token_grid(tuple(noisy.shape[-2:]), patch_size(diffusion_model)), int(context.shape[1]))
    info.trained[app.uid] = (tokens, temb)
    info.functions.update(TRAINING_FUNCTIONS)
    to[CALL_KEY] = info
    to["cond_or_uncond"], to["sigmas"] = [0], sigmas
    timestep = model_sampling.timestep(sigmas).float()
    if model_family(diffusion_model) == "flux":
        uses_guidance = bool(getattr(getattr(diffusion_model, "params", None), "guidance_embed", False))
        return diffusion_model(noisy, timestep, context, y=pooled, guidance=guidance if uses_guidance else None,
                               transformer_options=to)
    return diffusion_model(noisy, timestep, context=context, y=pooled, transformer_options=to)
