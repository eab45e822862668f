"""The weight-type table: every layer's multiplier for every type, SD1.5 (16 layers) and SDXL (70 layers), against
values written out by hand from the community pack's rules (reference notes, ipadapter.md section 3)."""

from __future__ import annotations

import pytest

from ipa_train.adapter.layout import known_sites
from ipa_train.adapter.weight_types import BOOST_SAME_AS_WEIGHT, WEIGHT_TYPES, layer_plans, second_weight
from ipa_train.errors import IPAKitError

# Transformer index (execution order) of each adapter layer, adapter order = down, up, mid.
SD15_T = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 6]
SDXL_T = [0] * 2 + [1] * 2 + [2] * 10 + [3] * 10 + [5] * 10 + [6] * 10 + [7] * 10 + [8] * 2 + [9] * 2 + [10] * 2 + [4] * 10
# Section of each transformer index.
SD15_SECTION = ["input"] * 6 + ["middle"] + ["output"] * 9
SDXL_SECTION = ["input"] * 4 + ["middle"] + ["output"] * 6

W, C = 1.0, 10.0  # the test's weight and second weight: a value of 10 (or 2.5, 1.0 x 10...) shows which one a layer uses
_ = None  # a layer with weight 0

# Expected (value, route) per transformer index; a bare number means route "ref", None means weight 0.
SD15 = {
    "linear": [1.0] * 16,
    "ease in": [1.0, 0.940625, 0.88125, 0.821875, 0.7625, 0.703125, 0.64375, 0.584375, 0.525, 0.465625, 0.40625,
                0.346875, 0.2875, 0.228125, 0.16875, 0.109375],
    "ease out": [0.05, 0.109375, 0.16875, 0.228125, 0.2875, 0.346875, 0.40625, 0.465625, 0.525, 0.584375, 0.64375,
                 0.703125, 0.7625, 0.821875, 0.88125, 0.940625],
    "ease in-out": [0.05, 0.16875, 0.2875, 0.40625, 0.525, 0.64375, 0.7625, 0.88125, 1.0, 0.88125, 0.7625, 0.64375,
                    0.525, 0.40625, 0.2875, 0.16875],
    "reverse in-out": [1.0, 0.88125, 0.7625, 0.64375, 0.525, 0.40625, 0.2875, 0.16875, 0.05, 0.16875, 0.2875,
                       0.40625, 0.525, 0.64375, 0.7625, 0.88125],
    "weak input": [0.2] * 6 + [1.0] * 10,
    "weak output": [1.0] * 7 + [0.2] * 9,
    "weak middle": [1.0] * 6 + [0.2] + [1.0] * 9,
    "strong middle": [0.2] * 6 + [1.0] + [0.2] * 9,
    "style transfer": [1, 1, 1, 1, _, _, _, _, _, 1, 1, 1, 1, 1, 1, 1],
    "composition": [_, _, _, _, 0.25, 1, _, _, _, _, _, _, _, _, _, _],
    "strong style transfer": [1, 1, 1, 1, _, _, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "style and composition": [1, 1, 1, 1, (2.5, "alt"), (10, "alt"), _, _, _, 1, 1, 1, 1, 1, 1, 1],
    "strong style and composition": [1, 1, 1, 1, (10, "alt"), (10, "alt"), 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "style transfer precise": [1, 1, 1, 1, (2.5, "neg"), (10, "neg"), _, _, _, 1, 1, 1, 1, 1, 1, 1],
    "composition precise": [(10, "neg")] * 4 + [0.25, 1.0] + [(1.0, "neg")] * 3 + [(10, "neg")] * 7,
}
SDXL = {
    "linear": [1.0] * 11,
    "ease in": [1.0, 0.913636, 0.827273, 0.740909, 0.654545, 0.568182, 0.481818, 0.395455, 0.309091, 0.222727, 0.136364],
    "ease out": [0.05, 0.136364, 0.222727, 0.309091, 0.395455, 0.481818, 0.568182, 0.654545, 0.740909, 0.827273, 0.913636],
    "ease in-out": [0.05, 0.222727, 0.395455, 0.568182, 0.740909, 0.913636, 0.913636, 0.740909, 0.568182, 0.395455, 0.222727],
    "reverse in-out": [1.0, 0.827273, 0.654545, 0.481818, 0.309091, 0.136364, 0.136364, 0.309091, 0.481818, 0.654545,
                       0.827273],
    "weak input": [0.2] * 4 + [1.0] * 7,
    "weak output": [1.0] * 5 + [0.2] * 6,
    "weak middle": [1.0] * 4 + [0.2] + [1.0] * 6,
    "strong middle": [0.2] * 4 + [1.0] + [0.2] * 6,
    "style transfer": [_, _, _, _, _, _, 1, _, _, _, _],
    "composition": [_, _, _, 1, _, _, _, _, _, _, _],
    "strong style transfer": [1, 1, 1, _, 1, 1, 1, 1, 1, 1, 1],
    "style and composition": [_, _, _, (10, "alt"), _, _, 1, _, _, _, _],
    "strong style and composition": [1, 1, 1, (10, "alt"), 1, 1, 1, 1, 1, 1, 1],
    "style transfer precise": [_, _, _, (10, "neg"), _, _, 1, _, _, _, _],
    "composition precise": [(1.0, "neg")] * 3 + [1] + [(1.0, "neg")] * 2 + [(10, "neg")] + [(1.0, "neg")] * 4,
}


def _expand(per_t: list, order: list[int]) -> list[tuple[float, str]]:
    out = []
    for t in order:
        e = per_t[t]
        out.append((0.0, "ref") if e is None else (float(e[0]), e[1]) if isinstance(e, tuple) else (float(e), "ref"))
    return out


@pytest.mark.parametrize("family,table,order,sections", [("sd15", SD15, SD15_T, SD15_SECTION),
                                                          ("sdxl", SDXL, SDXL_T, SDXL_SECTION)])
def test_every_layer_of_every_type(family, table, order, sections):
    sites = known_sites(family)
    assert [s.transformer_index for s in sites] == order and len(sites) == {"sd15": 16, "sdxl": 70}[family]
    assert [sections[s.transformer_index] for s in sites] == [s.section for s in sites]
    assert set(table) == set(WEIGHT_TYPES)
    for weight_type, per_t in table.items():
        plans = layer_plans(sites, family, weight_type, W, C)
        got = [(p.weight, p.route) for p in plans]
        expected = _expand(per_t, order)
        assert len(got) == len(expected)
        for i, ((gw, gr), (ew, er)) in enumerate(zip(got, expected)):
            assert gr == er and gw == pytest.approx(ew, abs=1e-6), f"{family} {weight_type} layer {i}: {gw, gr} != {ew, er}"


def test_weight_scales_and_second_weight_defaults_to_weight():
    sites = known_sites("sd15")
    lin = layer_plans(sites, "sd15", "ease in", 0.5)
    assert [p.weight for p in lin] == pytest.approx([0.5 * v for v, _ in _expand(SD15["ease in"], SD15_T)])
    # precise types without a boost: the community pack uses the weight itself
    same = layer_plans(sites, "sd15", "style transfer precise", 0.7)
    assert same == layer_plans(sites, "sd15", "style transfer precise", 0.7, 0.7)


def test_unknown_type_and_unsupported_family_are_clear_errors():
    sites = known_sites("sd15")
    with pytest.raises(IPAKitError, match="unknown weight type 'eased'"):
        layer_plans(sites, "sd15", "eased")
    with pytest.raises(IPAKitError, match="SD1.5 and SDXL models only"):
        layer_plans(sites, "other", "style transfer")
    # family-independent types work on any layout
    assert [p.weight for p in layer_plans(sites, "other", "weak middle")] == [1.0] * 15 + [0.2]


def test_second_weight_from_node_inputs_follows_the_community_advanced_node():
    """Node inputs -> second weight: by default what the community pack's Advanced / Embeds nodes use (boost = the
    weight, weight_composition = 1.0); a given boost (its dedicated nodes' 1.0 / 0.0 included) is the boost."""
    assert second_weight("style transfer precise") is None and second_weight("composition precise") is None
    assert second_weight("style transfer precise", style_boost=BOOST_SAME_AS_WEIGHT) is None
    assert second_weight("composition precise", composition_boost=BOOST_SAME_AS_WEIGHT - 1) is None
    assert second_weight("style transfer precise", style_boost=1.0, composition_boost=2.0) == 1.0
    assert second_weight("composition precise", style_boost=1.0, composition_boost=0.0) == 0.0
    assert second_weight("composition precise", composition_boost=-5.0) == -5.0  # the dedicated nodes' minimum
    for weight_type in ("style and composition", "strong style and composition"):
        assert second_weight(weight_type) == 1.0 and second_weight(weight_type, 0.6, 2.0, 3.0) == 0.6
    for weight_type in set(WEIGHT_TYPES) - {"style and composition", "strong style and composition",
                                            "style transfer precise", "composition precise"}:
        assert second_weight(weight_type, 0.6, 2.0, 3.0) is None
    sites = known_sites("sdxl")
    # a fresh node at weight 0.8: composition layer (t = 3) at 1.0 for style and composition, 0.8 for the precise one
    assert {p.weight for p in layer_plans(sites, "sdxl", "style and composition", 0.8, second_weight("style and composition"))} == {0.0, 0.8, 1.0}
    assert {p.weight for p in layer_plans(sites, "sdxl", "style transfer precise", 0.8, second_weight("style transfer precise"))} == {0.0, 0.8}
