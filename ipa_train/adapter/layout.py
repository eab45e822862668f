"""Where the cross-attention layers of a UNet are, in the two orders that matter.

*Adapter order* is diffusers' processor order (down blocks, up blocks, mid block): layer k's weights are
stored under the official key `2k+1`. *Execution order* is the order a UNet runs its spatial transformers
(input blocks, middle, output blocks): ComfyUI's `transformer_index` counts in it, and the community
style/composition presets are keyed by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import IPAKitError

SECTIONS = ("input", "middle", "output")


@dataclass(frozen=True)
class Group:
    """One spatial transformer: ComfyUI block `(section, block_id)` holding `depth` transformer blocks."""

    section: str  # "input" | "middle" | "output" (diffusers: down_blocks | mid_block | up_blocks)
    block_id: int
    depth: int
    hidden: int


@dataclass(frozen=True)
class Site:
    """One cross-attention layer."""

    index: int  # adapter order; official key 2*index+1
    section: str
    block_id: int
    block_index: int  # transformer block inside its spatial transformer
    transformer_index: int  # execution order of its spatial transformer (ComfyUI tidx)
    hidden: int

    @property
    def key(self) -> tuple[str, int, int]:
        """ComfyUI's full attn2 patch key `(block_name, number, transformer_index-in-block)` (the patch may be
        registered under its first two parts instead: `hosts.comfy.unet.patch_key`)."""
        return (self.section, self.block_id, self.block_index)


def sites_from_groups(groups: list[Group]) -> list[Site]:
    """Groups in execution order -> sites in adapter order."""
    for g in groups:
        if g.section not in SECTIONS:
            raise ValueError(f"unknown section {g.section!r}; expected one of {SECTIONS}")
    tidx = {id(g): i for i, g in enumerate(groups)}
    adapter_order = [g for s in ("input", "output", "middle") for g in groups if g.section == s]
    sites: list[Site] = []
    for g in adapter_order:
        for b in range(g.depth):
            sites.append(Site(len(sites), g.section, g.block_id, b, tidx[id(g)], g.hidden))
    return sites


def _groups(spec: list[tuple[str, list[int], int, int]]) -> list[Group]:
    return [Group(section, bid, depth, hidden) for section, ids, depth, hidden in spec for bid in ids]


# ComfyUI block ids of the official base models, in execution order.
KNOWN_GROUPS: dict[str, list[Group]] = {
    "sd15": _groups(
        [
            ("input", [1, 2], 1, 320),
            ("input", [4, 5], 1, 640),
            ("input", [7, 8], 1, 1280),
            ("middle", [0], 1, 1280),
            ("output", [3, 4, 5], 1, 1280),
            ("output", [6, 7, 8], 1, 640),
            ("output", [9, 10, 11], 1, 320),
        ]
    ),
    "sdxl": _groups(
        [
            ("input", [4, 5], 2, 640),
            ("input", [7, 8], 10, 1280),
            ("middle", [0], 10, 1280),
            ("output", [0, 1, 2], 10, 1280),
            ("output", [3, 4, 5], 2, 640),
        ]
    ),
}


def known_sites(family: str) -> list[Site]:
    return sites_from_groups(KNOWN_GROUPS[family])


# Community presets, keyed by transformer_index (execution order) and given as multipliers of the weight.
# Layers not listed get 0. Sources: the reference notes (ipadapter.md section 3, cubiq's weight types).
PRESETS: dict[str, dict[str, dict[int, float]]] = {
    "style": {
        "sdxl": {6: 1.0},
        "sd15": {t: 1.0 for t in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)},
    },
    "composition": {
        "sdxl": {3: 1.0},
        "sd15": {4: 0.25, 5: 1.0},
    },
}
LAYER_MODES = ("all", "style", "composition", "custom")

_PAIR = re.compile(r"^\s*(\d+)\s*:\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


def parse_layer_weights(text: str) -> dict[int, float]:
    """Parse `"0:1.0, 6:0.5"` (transformer_index: multiplier) into a dict; raise a clear error otherwise."""
    out: dict[int, float] = {}
    for part in re.split(r"[,\n;]", text):
        if not part.strip():
            continue
        m = _PAIR.match(part)
        if not m:
            raise IPAKitError(
                f"layer weights: cannot read {part.strip()!r}; write 'index:weight' pairs separated by commas, "
                "for example '0:1.0, 6:0.5' (index = transformer index in execution order)"
            )
        out[int(m.group(1))] = float(m.group(2))
    return out


def layer_multipliers(sites: list[Site], family: str, mode: str = "all", custom: str = "") -> list[float]:
    """Per-site multiplier of the adapter weight, in adapter order."""
    if mode == "all":
        return [1.0] * len(sites)
    if mode == "custom":
        table = parse_layer_weights(custom)
        n_t = 1 + max((s.transformer_index for s in sites), default=-1)
        bad = [t for t in table if t >= n_t]
        if bad:
            raise IPAKitError(f"layer weights: indices {bad} do not exist; this model has transformer indices 0..{n_t - 1}")
    elif mode in PRESETS:
        if family not in PRESETS[mode]:
            raise IPAKitError(
                f"the '{mode}' layer preset is defined for SD1.5 and SDXL models only, not for family {family!r}; "
                "use 'all' or a custom layer weight string"
            )
        table = PRESETS[mode][family]
    else:
        raise IPAKitError(f"unknown layer mode {mode!r}; expected one of {LAYER_MODES}")
    return [float(table.get(s.transformer_index, 0.0)) for s in sites]


def groups_from_blocks(input_blocks: Any, middle_block: Any, output_blocks: Any) -> list[Group]:
    """Spatial transformers of a ComfyUI-style UNet (input_blocks / middle_block / output_blocks), in execution order.

    Duck-typed: a spatial transformer is any submodule with a `transformer_blocks` list whose blocks have `attn2`.
    """
    groups: list[Group] = []
    for section, blocks in (("input", list(input_blocks)), ("middle", [middle_block]), ("output", list(output_blocks))):
        for block_id, block in enumerate(blocks):
            for layer in block.children() if hasattr(block, "children") else []:
                tbs = getattr(layer, "transformer_blocks", None)
                if tbs is None or not len(tbs) or not hasattr(tbs[0], "attn2"):
                    continue
                hidden = int(tbs[0].attn2.to_k.out_features)
                groups.append(Group(section, 0 if section == "middle" else block_id, len(tbs), hidden))
    return groups


def context_dim_of_blocks(input_blocks: Any, middle_block: Any, output_blocks: Any) -> int | None:
    for blocks in (list(input_blocks), [middle_block], list(output_blocks)):
        for block in blocks:
            for m in block.modules():
                if hasattr(m, "attn2") and hasattr(m.attn2, "to_k"):
                    return int(m.attn2.to_k.in_features)
    return None


def check_fit(hidden: tuple[int, ...], context_dim: int | None, config: Any) -> None:
    """Raise BaseModelMismatchError when an adapter (its AdapterConfig) does not fit a model whose cross-attention
    layers have inner widths `hidden` (adapter order) and text width `context_dim`."""
    from ..errors import BaseModelMismatchError
    from .config import family_for, family_label

    if hidden == tuple(config.layer_hidden_sizes) and (context_dim is None or context_dim == config.cross_attention_dim):
        return
    model_family = family_for(context_dim or -1, len(hidden))
    raise BaseModelMismatchError(
        f"this {family_label(config.family)} adapter ({config.cross_attention_layers} cross-attention layers, text width "
        f"{config.cross_attention_dim}) does not fit this model ({family_label(model_family)}: {len(hidden)} cross-attention "
        f"layers, text width {context_dim}). Use an adapter made for {family_label(model_family)}, or load the "
        "checkpoint the adapter was made for."
    )
