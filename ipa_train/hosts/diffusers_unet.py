"""Install an adapter into a diffusers `UNet2DConditionModel` (scaled or fused mode) and remove it again.

The image tokens travel appended to the text tokens in `encoder_hidden_states` ([B, S+T, C]), as in the
reference training script; each patched cross-attention layer splits them off, attends to text and image
separately and adds `weight * image attention` before the layer's output projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..adapter.attention import add_image_attention
from ..adapter.layout import check_fit
from ..adapter.modules import IPAdapter, IPLayer, multihead_attention
from ..errors import IPAKitError

Mode = Literal["scaled", "fused"]


def cross_attention_names(unet: Any) -> list[str]:
    """Names of the cross-attention processors (attn2) in diffusers processor order."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor") and "motion_modules" not in n]


def _attention_module(unet: Any, processor_name: str) -> Any:
    return unet.get_submodule(processor_name[: -len(".processor")])


def unet_layer_hidden_sizes(unet: Any) -> list[int]:
    """Inner width of every cross-attention layer (to_k output features), in processor order."""
    return [_attention_module(unet, n).to_k.out_features for n in cross_attention_names(unet)]


def check_unet_fits(unet: Any, adapter: IPAdapter) -> None:
    """Raise BaseModelMismatchError when the adapter was made for another base model."""
    check_fit(tuple(unet_layer_hidden_sizes(unet)), int(unet.config.cross_attention_dim), adapter.config)


@dataclass
class _Binding:
    """State shared by the processors of one installed adapter."""

    num_tokens: int = 0  # image tokens at the end of encoder_hidden_states for the current call
    weights: list[float] = field(default_factory=list)  # per layer, adapter order


class IPAttnProcessor:
    """Cross-attention processor with an added image branch. Not an nn.Module: the UNet's state dict stays clean."""

    def __init__(self, base: Any, layer: IPLayer, index: int, binding: _Binding):
        self.base = base
        self.layer = layer
        self.index = index
        self.binding = binding

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        n = self.binding.num_tokens
        weight = self.binding.weights[self.index]
        if encoder_hidden_states is None or n == 0:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        text, image = encoder_hidden_states[:, :-n], encoder_hidden_states[:, -n:]
        if weight == 0:
            # Exactly the unpatched layer on the text tokens alone.
            return self.base(attn, hidden_states, text, attention_mask, temb, *args, **kwargs)
        return self._forward(attn, hidden_states, text, image, attention_mask, temb, weight)

    def _forward(self, attn: Any, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor,
                 attention_mask: torch.Tensor | None, temb: torch.Tensor | None, weight: float) -> torch.Tensor:
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise IPAKitError("attention layers with q/k normalisation are not supported by the IP-Adapter patch")
        residual = x
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        input_ndim = x.ndim
        if input_ndim == 4:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        batch = text.shape[0]
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])  # [B, H, 1|Lq, S]
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(x)  # [B, Lq, inner]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        out = multihead_attention(q, attn.to_k(text), attn.to_v(text), attn.heads, mask)  # [B, Lq, inner]
        out = add_image_attention(out, q, self.layer.to_k_ip(image), self.layer.to_v_ip(image), attn.heads, weight)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class DiffusersAdapterPatch:
    """An adapter installed in a diffusers UNet. Build the UNet's `encoder_hidden_states` with
    `encoder_hidden_states()`; call `remove()` to restore the original processors.

    Args:
        unet: a diffusers `UNet2DConditionModel`.
        adapter: the adapter to install (its parameters keep receiving gradients: training uses this path).
        weight: image attention weight (0 reproduces the unpatched UNet exactly).
        mode: "scaled" (decoupled attention) or "fused" (image tokens first attend to the prompt).
        fusion_lambda: lambda of the fused mode; 1 equals the scaled mode.
        layer_weights: optional multiplier of `weight` per cross-attention layer (adapter order).
    """

    def __init__(self, unet: Any, adapter: IPAdapter, weight: float = 1.0, mode: Mode = "scaled",
                 fusion_lambda: float = 0.8, layer_weights: list[float] | None = None):
        check_unet_fits(unet, adapter)
        if mode not in ("scaled", "fused"):
            raise IPAKitError(f"mode must be 'scaled' or 'fused', got {mode!r}")
        self.unet = unet
        self.adapter = adapter
        self.mode = mode
        self.fusion_lambda = fusion_lambda
        self.binding = _Binding()
        self.set_weight(weight, layer_weights)
        self._original = dict(unet.attn_processors)
        names = cross_attention_names(unet)
        procs = dict(self._original)
        for i, (name, layer) in enumerate(zip(names, adapter.layers)):
            procs[name] = IPAttnProcessor(self._original[name], layer, i, self.binding)
        unet.set_attn_processor(procs)

    def set_weight(self, weight: float, layer_weights: list[float] | None = None) -> None:
        n = self.adapter.config.cross_attention_layers
        mult = layer_weights if layer_weights is not None else [1.0] * n
        if len(mult) != n:
            raise IPAKitError(f"layer_weights has {len(mult)} entries; the adapter has {n} layers")
        self.binding.weights = [float(weight) * float(m) for m in mult]

    def image_tokens(self, clip_embeds: torch.Tensor, text: torch.Tensor | None = None,
                     fuse_rows: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP output -> image tokens [B, T, C], fused with `text` [B, S, C] in fused mode.

        `fuse_rows` ([B] bool) limits fusion to some rows (e.g. only the conditional half under CFG).
        """
        tokens = self.adapter.project(clip_embeds)
        if self.mode == "fused":
            if text is None:
                raise IPAKitError("fused mode needs the prompt's text hidden states")
            fused = self.adapter.fuse(tokens, text, self.fusion_lambda)
            if fuse_rows is not None:
                fused = torch.where(fuse_rows.view(-1, 1, 1), fused, tokens.expand_as(fused))
            tokens = fused
        return tokens

    def encoder_hidden_states(self, text: torch.Tensor, clip_embeds: torch.Tensor | None = None,
                              ip_tokens: torch.Tensor | None = None, fuse_rows: torch.Tensor | None = None) -> torch.Tensor:
        """`cat([text, image tokens])` [B, S+T, C] to pass as the UNet's encoder_hidden_states."""
        if ip_tokens is None:
            if clip_embeds is None:
                raise IPAKitError("give clip_embeds or ip_tokens")
            ip_tokens = self.image_tokens(clip_embeds, text, fuse_rows)
        if ip_tokens.shape[0] != text.shape[0]:
            ip_tokens = ip_tokens.expand(text.shape[0], -1, -1)
        self.binding.num_tokens = ip_tokens.shape[1]
        return torch.cat([text, ip_tokens.to(text.dtype)], dim=1)

    def remove(self) -> None:
        self.unet.set_attn_processor(self._original)
        self.binding.num_tokens = 0


def install_adapter(unet: Any, adapter: IPAdapter, **kwargs: Any) -> DiffusersAdapterPatch:
    """Install `adapter` into `unet`; see `DiffusersAdapterPatch` for the arguments."""
    return DiffusersAdapterPatch(unet, adapter, **kwargs)


def init_from_unet(adapter: IPAdapter, unet: Any) -> None:
    """Initialise every layer's image K/V from the layer's own text to_k/to_v, as the reference training does."""
    check_unet_fits(unet, adapter)
    with torch.no_grad():
        for name, layer in zip(cross_attention_names(unet), adapter.layers):
            attn = _attention_module(unet, name)
            layer.to_k_ip.weight.copy_(attn.to_k.weight)
            layer.to_v_ip.weight.copy_(attn.to_v.weight)


def attention_names(unet: Any) -> list[str]:
    """Every attention processor (attn1 and attn2) in diffusers processor order: FaceID's LoRA numbering."""
    return [n for n in unet.attn_processors if "motion_modules" not in n]


def install_lora(unet: Any, lora: Any) -> list[Any]:
    """A FaceID LoRA on every attention processor of `unet` (`ipa_train.training.faceid.hook_lora`); the handles."""
    from ..training.faceid import hook_lora

    names = attention_names(unet)
    return hook_lora([_attention_module(unet, n) for n in names], lora, names)
