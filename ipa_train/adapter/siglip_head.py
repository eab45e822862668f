"""SigLIP's attention-pooling head, for the InstantX Flux adapter, which reads SigLIP's pooled output.

ComfyUI's SigLIP returns the post-LayerNorm sequence but not the pooled output (its loader drops the
`vision_model.head.*` weights), so the kit computes it from the head's weights, read from a SigLIP file that has
them (transformers' `model.safetensors` of google/siglip-so400m-patch14-384 does):
pooled = h[:, 0] with h = a + MLP(LN(a)), a = MultiheadAttention(probe, seq, seq); MLP = fc1, GELU (tanh), fc2.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

HEAD_PREFIXES = ("vision_model.head.", "head.")


class SiglipHead(nn.Module):
    """Multihead attention pooling [B, L, D] -> [B, D], with transformers' parameter names."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, mlp_dim)
        self.mlp.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        probe = self.probe.to(seq.dtype).expand(seq.shape[0], -1, -1)
        a = self.attention(probe, seq, seq, need_weights=False)[0]
        h = a + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layernorm(a)), approximate="tanh"))
        return h[:, 0]


def head_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The head's tensors of a safetensors SigLIP file (names without the prefix), {} when it has none."""
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            prefix = next((p for p in HEAD_PREFIXES if f"{p}probe" in keys), None)
            if prefix is None:
                return {}
            return {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    except Exception:  # not a readable safetensors file: it has no head we can use
        return {}


def head_from_tensors(t: dict[str, torch.Tensor], heads: int = 16) -> SiglipHead:
    """Build the head; so400m has 16 heads (the head count is not stored in the weights)."""
    dim, mlp_dim = t["probe"].shape[-1], t["mlp.fc1.weight"].shape[0]
    head = SiglipHead(dim, heads, mlp_dim)
    head.load_state_dict(t, strict=True)
    return head.eval()


def find_head(paths: Iterable[str | os.PathLike], width: int, heads: int = 16) -> tuple[SiglipHead, str] | None:
    """The first file among `paths` with a head of `width`, as (head, file); None when none has one."""
    for p in paths:
        if not os.fspath(p).lower().endswith(".safetensors"):
            continue
        t = head_tensors(p)
        if t and t["probe"].shape[-1] == width:
            return head_from_tensors(t, heads), os.fspath(p)
    return None


NO_HEAD = ("the InstantX Flux IP-Adapter reads SigLIP's pooled output, made by its attention-pooling head "
           "(weights 'vision_model.head.*'); ComfyUI's CLIP vision loader drops that head and {where}. Put the "
           "transformers SigLIP file that has it, google/siglip-so400m-patch14-384's model.safetensors, in "
           "ComfyUI/models/clip_vision (the encoder weights can stay in the file you load)")
