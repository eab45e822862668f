"""Weight types: how the adapter weight is spread over the cross-attention layers, one table per model family.

The value names and per-layer numbers are those of the community pack (cubiq/ComfyUI_IPAdapter_plus), whose
rules are keyed by the *transformer index* t (execution order of the spatial transformers, `layout.Site.
transformer_index`): SD1.5 has 16 (t = 6 is the middle block), SDXL 11 (t = 4 is the middle block, 10 transformer
blocks each for t = 2..7). Every transformer block of one spatial transformer gets the same multiplier.

A rule gives each layer a `Term`: a factor of one of two user weights ("w" = weight, "c" = the second weight:
weight_composition for the style-and-composition types, style_boost / composition_boost for the precise types)
and a *route*, which says what the cond and uncond rows of the batch attend to at that layer:
- "ref": cond rows attend to the reference, uncond rows to the unconditional tokens (the plain case);
- "alt": cond rows attend to the second (composition) image instead;
- "neg": the precise types' swap: the reference moves to the uncond rows (it acts as a negative there) and the
  cond rows get no image term.
Unlike the community pack, the middle block is always patched (its own middle key is never called by ComfyUI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import IPAKitError
from .layout import Site

ROUTES = ("ref", "alt", "neg")


@dataclass(frozen=True)
class Term:
    factor: float = 1.0
    weight: str = "w"  # "w" | "c"
    route: str = "ref"


@dataclass(frozen=True)
class LayerPlan:
    """What one cross-attention layer does: its effective weight and its route (see the module docstring)."""

    weight: float
    route: str = "ref"


W, C = Term(), Term(weight="c")


def _w(factor: float) -> Term:
    return Term(factor)


def _c(factor: float, route: str) -> Term:
    return Term(factor, "c", route)


# A rule maps (site, number of spatial transformers) to a Term.
Rule = Callable[[Site, int], Term]


def by_index(table: dict[int, Term]) -> Rule:
    """Layers listed by transformer index; the others get weight 0."""
    return lambda site, n: table.get(site.transformer_index, Term(0.0))


def by_section(factors: dict[str, float]) -> Rule:
    """A factor per UNet section (input, middle, output); unlisted sections get 1."""
    return lambda site, n: Term(factors.get(site.section, 1.0))


def curve(fn: Callable[[float, int], float]) -> Rule:
    """A factor that is a function of the transformer index t and the number of spatial transformers n."""
    return lambda site, n: Term(fn(site.transformer_index, n))


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


COMMON: dict[str, Rule] = {
    "linear": by_section({}),
    "ease in": curve(lambda t, n: 0.05 + 0.95 * (1 - t / n)),
    "ease out": curve(lambda t, n: 0.05 + 0.95 * (t / n)),
    "ease in-out": curve(lambda t, n: 0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2))),
    "reverse in-out": curve(lambda t, n: 0.05 + 0.95 * (abs(t - n / 2) / (n / 2))),
    "weak input": by_section({"input": 0.2}),
    "weak output": by_section({"output": 0.2}),
    "weak middle": by_section({"middle": 0.2}),
    "strong middle": by_section({"input": 0.2, "output": 0.2}),
}

_SD15_STYLE = _r(0, 3) + _r(9, 15)
_SD15_COMP = {4: 0.25, 5: 1.0}

SD15: dict[str, Rule] = {
    **COMMON,
    "style transfer": by_index({t: W for t in _SD15_STYLE}),
    "composition": by_index({t: _w(f) for t, f in _SD15_COMP.items()}),
    "strong style transfer": by_index({t: W for t in _r(0, 3) + _r(6, 15)}),
    "style and composition": by_index({**{t: W for t in _SD15_STYLE}, **{t: _c(f, "alt") for t, f in _SD15_COMP.items()}}),
    "strong style and composition": by_index({**{t: W for t in _r(0, 3) + _r(6, 15)}, 4: _c(1.0, "alt"), 5: _c(1.0, "alt")}),
    "style transfer precise": by_index({**{t: W for t in _SD15_STYLE}, **{t: _c(f, "neg") for t, f in _SD15_COMP.items()}}),
    "composition precise": by_index({**{t: _c(1.0, "neg") for t in _SD15_STYLE}, **{t: _w(f) for t, f in _SD15_COMP.items()},
                                     **{t: _c(0.1, "neg") for t in _r(6, 8)}}),
}

SDXL: dict[str, Rule] = {
    **COMMON,
    "style transfer": by_index({6: W}),
    "composition": by_index({3: W}),
    "strong style transfer": by_index({t: W for t in _r(0, 2) + _r(4, 10)}),
    "style and composition": by_index({3: _c(1.0, "alt"), 6: W}),
    "strong style and composition": by_index({**{t: W for t in _r(0, 2) + _r(4, 10)}, 3: _c(1.0, "alt")}),
    "style transfer precise": by_index({3: _c(1.0, "neg"), 6: W}),
    "composition precise": by_index({**{t: _c(0.1, "neg") for t in _r(0, 2) + _r(4, 10)}, 3: W, 6: _c(1.0, "neg")}),
}

TABLES: dict[str, dict[str, Rule]] = {"sd15": SD15, "sdxl": SDXL}

# The community pack's order of the values (its list, plus "strong style and composition" which it handles too).
WEIGHT_TYPES = (
    "linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output", "weak middle",
    "strong middle", "style transfer", "composition", "strong style transfer", "style and composition",
    "strong style and composition", "style transfer precise", "composition precise",
)
# Types that read the second weight, and the node input that gives it.
SECOND_WEIGHT = {
    "style and composition": "weight_composition",
    "strong style and composition": "weight_composition",
    "style transfer precise": "style_boost",
    "composition precise": "composition_boost",
}
# The nodes' defaults are the community pack's Advanced / Embeds nodes' (its `ipadapter_execute` defaults), so a
# workflow moved from them gives the same picture: the precise types' boost is the weight itself, and the
# style-and-composition types' composition layers get weight_composition = 1.0 whatever the weight.
# BOOST_SAME_AS_WEIGHT is the boost inputs' default and minimum, outside the -5..5 its dedicated precise nodes
# offer; any other value is the boost itself (their style_boost 1.0 / composition_boost 0.0 defaults included).
BOOST_SAME_AS_WEIGHT = -10.0
DEFAULT_WEIGHT_COMPOSITION = 1.0


def second_weight(weight_type: str, weight_composition: float = DEFAULT_WEIGHT_COMPOSITION,
                  style_boost: float | None = None, composition_boost: float | None = None) -> float | None:
    """The second weight ("c") of `weight_type` from the nodes' inputs; None means the weight itself.

    weight_composition serves the style-and-composition types; style_boost / composition_boost the precise types,
    where None or BOOST_SAME_AS_WEIGHT (or lower) means the weight; the other types read no second weight (None).
    """
    if weight_type in ("style and composition", "strong style and composition"):
        return float(weight_composition)
    boost = {"style transfer precise": style_boost, "composition precise": composition_boost}.get(weight_type)
    return None if boost is None or boost <= BOOST_SAME_AS_WEIGHT else float(boost)


def layer_plans(sites: list[Site], family: str, weight_type: str = "linear", weight: float = 1.0,
                second: float | None = None) -> list[LayerPlan]:
    """Each site's effective weight and route, in adapter order.

    Args:
        sites: the model's cross-attention sites (adapter order).
        family: "sd15", "sdxl" or another family (which gets the family-independent types only).
        weight: the adapter weight ("w").
        second: the second weight ("c"); None means the same as `weight` (the community pack's default for the
            precise types when no boost is given).
    """
    table = TABLES.get(family, COMMON)
    rule = table.get(weight_type)
    if rule is None:
        if weight_type in WEIGHT_TYPES:
            raise IPAKitError(
                f"weight type {weight_type!r} is defined for SD1.5 and SDXL models only, not for family {family!r}; "
                f"use one of: {', '.join(COMMON)}"
            )
        raise IPAKitError(f"unknown weight type {weight_type!r}; expected one of: {', '.join(WEIGHT_TYPES)}")
    n = 1 + max((s.transformer_index for s in sites), default=-1)
    values = {"w": float(weight), "c": float(weight if second is None else second)}
    plans = []
    for site in sites:
        term = rule(site, n)
        plans.append(LayerPlan(term.factor * values[term.weight], term.route))
    return plans


def uses_second_image(weight_type: str) -> bool:
    """Whether some layer of this type reads the composition image (route "alt")."""
    return weight_type in ("style and composition", "strong style and composition")


def application_plans(sites: list[Site], family: str, weight_type: str = "linear", weight: float = 1.0,
                      second: float | None = None, layers: str = "all", custom: str = "") -> list[LayerPlan]:
    """The weight type's plans times the `layers` preset (or custom per-layer string) multipliers."""
    from .layout import layer_multipliers

    multipliers = layer_multipliers(sites, family, layers, custom)
    return [LayerPlan(p.weight * m, p.route) for p, m in zip(layer_plans(sites, family, weight_type, weight, second), multipliers)]
