"""workflows/*.json against the registered node definitions, without ComfyUI.

Our nodes are checked against tests/data/kit_nodes.json (their /object_info entries, kept equal to the host's by
tests/host/test_host_node_specs.py; see tests/node_specs.py); core nodes against
tests/data/core_nodes.json, a snapshot of ComfyUI's /object_info (input/output specs only) for the core types the
workflows use. Regenerate it from a running server when a workflow starts using another core node.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .node_specs import load_specs

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CORE = {k: v for k, v in json.loads((ROOT / "tests" / "data" / "core_nodes.json").read_text()).items() if not k.startswith("_")}

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Frontend-only node types (no backend class) and the widget values each serializes.
VIRTUAL = {"Note": 1, "MarkdownNote": 1, "Reroute": 0, "PrimitiveNode": None}
# Display widgets the frontend adds to some core nodes, serialized after the real ones (not validated).
FRONTEND_EXTRA_WIDGETS = {"PreviewAny": 3}
MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
# loader type -> the models/ folder of each of its leading widget values: every file a workflow names must be in
# its note, with the folder.
MODEL_WIDGETS = {"CheckpointLoaderSimple": ("checkpoints",), "CLIPVisionLoader": ("clip_vision",),
                 "IPAKitLoadAdapter": ("ipadapter",), "IPAKitLoadFaceModels": ("insightface/models",),
                 "UNETLoader": ("diffusion_models",), "DualCLIPLoader": ("text_encoders", "text_encoders"),
                 "TripleCLIPLoader": ("text_encoders",) * 3, "VAELoader": ("vae",)}
EXPECTED = {
    "ipadapter_generate_scaled", "ipadapter_generate_fused", "ipadapter_scaled_vs_fused_diversity",
    "ipadapter_train_folder", "ipadapter_train_then_generate", "ipadapter_weight_sweep", "ipadapter_animation_per_frame",
    "ipadapter_faceid", "ipadapter_faceid_portrait", "ipadapter_flux", "ipadapter_sd35",
}
DIT_WORKFLOWS = {"ipadapter_flux", "ipadapter_sd35"}


@pytest.fixture(scope="module")
def specs():
    """node type -> {"input": {"required": {...}, "optional": {...}}, "output": [types]} for ours and the core snapshot."""
    ours = {name: {"input": spec["input"], "output": spec["output"]} for name, spec in load_specs().items()}
    assert not set(ours) & set(CORE)
    return {**CORE, **ours}


def _is_widget(decl) -> bool:
    typ, opts = decl[0], (decl[1] if len(decl) > 1 else {})
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _check_value(node_type: str, name: str, decl, value) -> str | None:
    typ, opts = decl[0], (decl[1] if len(decl) > 1 else {})
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(typ, list) or typ == "COMBO":
        options = typ if isinstance(typ, list) else opts.get("options", [])
        if not isinstance(value, str):
            return f"{where}: combo value is not a string"
        is_file = opts.get("image_upload") or not options or all("." in o for o in options)
        if is_file and value.lower().endswith(MODEL_EXTS + IMAGE_EXTS):
            exts = IMAGE_EXTS if opts.get("image_upload") else MODEL_EXTS
            return None if value.lower().endswith(exts) else f"{where}: not a {'/'.join(exts)} file"
        return None if value in options else f"{where}: not one of {options}"
    if typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{where}: not a boolean"
    if typ == "STRING":
        return None if isinstance(value, str) else f"{where}: not a string"
    if typ in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{where}: not a number"
        if typ == "INT" and value != int(value):
            return f"{where}: not an integer"
        if "min" in opts and value < opts["min"]:
            return f"{where}: below min {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{where}: above max {opts['max']}"
        return None
    return f"{where}: unknown widget type {typ!r}"


def widget_errors(node: dict, spec: dict) -> list[str]:
    """Map widgets_values onto the widget inputs in INPUT_TYPES order (required, then optional), as the frontend does."""
    node_type, values = node["type"], list(node.get("widgets_values") or [])
    errors, i = [], 0
    for section in ("required", "optional"):
        for name, decl in spec["input"].get(section, {}).items():
            if not _is_widget(decl):
                continue
            if i >= len(values):
                return errors + [f"{node_type}: no value for widget {name!r}"]
            if err := _check_value(node_type, name, decl, values[i]):
                errors.append(err)
            i += 1
            opts = decl[1] if len(decl) > 1 else {}
            if decl[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                if i >= len(values) or values[i] not in CONTROL_VALUES:
                    errors.append(f"{node_type}.{name}: expected a control_after_generate value after it")
                i += 1
            if opts.get("image_upload"):
                i += 1  # the upload button's value
    i += FRONTEND_EXTRA_WIDGETS.get(node_type, 0)
    if i != len(values):
        errors.append(f"{node_type}: {len(values)} widget values for {i} widgets: {values}")
    return errors


def widget_values(node: dict, spec: dict) -> dict:
    """widgets_values -> {widget name: value}, mapped as the frontend maps them (INPUT_TYPES order); a widget the
    saved list has no value for (one added after the workflow was saved) gets its declared default."""
    values, out, i = list(node.get("widgets_values") or []), {}, 0
    for section in ("required", "optional"):
        for name, decl in spec["input"].get(section, {}).items():
            if not _is_widget(decl):
                continue
            opts = decl[1] if len(decl) > 1 else {}
            out[name] = values[i] if i < len(values) else opts.get("default")
            i += 1 + bool(decl[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")))
            i += bool(opts.get("image_upload"))
    return out


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_workflows_are_there_with_thumbnails():
    assert {p.stem for p in WORKFLOWS} == EXPECTED
    for path in WORKFLOWS:
        # the frontend's template browser fetches <name>.jpg for a custom node pack's templates
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), f"{path.name}: no {thumb.name} (the template browser shows <name>.jpg)"
        assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"
        assert 10_000 < thumb.stat().st_size < 150_000, thumb.name
        assert not path.with_suffix(".png").exists(), f"{path.stem}.png: a thumbnail the template browser never shows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_format(path):
    wf = _load(path)
    assert wf["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf, key
    # the frontend's schema takes extra.reroutes as a list or absent; null raises an alert when the workflow loads
    assert isinstance(wf["extra"].get("reroutes", []), list), "extra.reroutes: a list or absent, not null"
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and max(ids) <= wf["last_node_id"]
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and max(link_ids) <= wf["last_link_id"]
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in n, f"node {n.get('id')}: no {key}"
        assert n["mode"] == 0, f"node {n['id']} ({n['type']}) is muted or bypassed"
        if n["type"] not in VIRTUAL:
            assert n["properties"].get("Node name for S&R") == n["type"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_node_types_and_widget_values(path, specs):
    wf, errors = _load(path), []
    for node in wf["nodes"]:
        t = node["type"]
        if t in VIRTUAL:
            want = VIRTUAL[t]
            if want is not None and len(node.get("widgets_values") or []) != want:
                errors.append(f"{t} {node['id']}: {want} widget values expected")
            continue
        if t not in specs:
            errors.append(f"node {node['id']}: unknown type {t!r} (not ours, not in tests/data/core_nodes.json)")
            continue
        errors += widget_errors(node, specs[t])
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_connect_matching_types(path, specs):
    wf, errors = _load(path), []
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        if src not in nodes or dst not in nodes:
            errors.append(f"link {link_id}: node {src if src not in nodes else dst} does not exist")
            continue
        a, b = nodes[src], nodes[dst]
        out, inp = a["outputs"][src_slot], b["inputs"][dst_slot]
        if link_id not in (out.get("links") or []) or inp.get("link") != link_id:
            errors.append(f"link {link_id}: not recorded on both ends ({a['type']} -> {b['type']})")
        out_type = specs[a["type"]]["output"][src_slot] if a["type"] in specs else out["type"]
        in_decl = None
        if b["type"] in specs:
            spec_in = specs[b["type"]]["input"]
            in_decl = spec_in.get("required", {}).get(inp["name"]) or spec_in.get("optional", {}).get(inp["name"])
            if in_decl is None:
                errors.append(f"link {link_id}: {b['type']} has no input {inp['name']!r}")
                continue
        in_type = in_decl[0] if in_decl else inp["type"]
        if isinstance(in_type, list):
            in_type = "COMBO"
        where = f"link {link_id}: {a['type']}.{out['name']} ({out_type}) -> {b['type']}.{inp['name']} ({in_type})"
        if out["type"] != out_type or typ != out_type:
            errors.append(f"{where}: the saved type {typ!r}/{out['type']!r} is not the output's")
        if in_type != "*" and out_type != "*" and in_type != out_type:
            errors.append(f"{where}: types differ")
    # every required socket-only input is connected, so the workflow can be queued as is
    for n in wf["nodes"]:
        if n["type"] not in specs:
            continue
        connected = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for name, decl in specs[n["type"]]["input"].get("required", {}).items():
            if not _is_widget(decl) and name not in connected:
                errors.append(f"{n['type']} {n['id']}: required input {name!r} is not connected")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_note_names_the_model_files_and_folders(path):
    wf = _load(path)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, f"{path.name}: no Note node"
    text = "\n".join(notes)
    files = []
    for n in wf["nodes"]:
        for folder, value in zip(MODEL_WIDGETS.get(n["type"], ()), n.get("widgets_values", [])):
            files.append(f"models/{folder}/{value}")
    assert files, f"{path.name}: loads no model file"
    for f in files:
        assert f in text, f"{path.name}: the note does not say {f}"


def test_checker_catches_mistakes(specs):
    """The checks above fail on a broken copy."""
    wf = _load(ROOT / "workflows" / "ipadapter_generate_scaled.json")
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert not widget_errors(ks, specs["KSampler"])
    bad = dict(ks, widgets_values=[42, "fixed", 25, 6.5, "no_such_sampler", "karras", 1.0])
    assert any("no_such_sampler" in e for e in widget_errors(bad, specs["KSampler"]))
    bad = dict(ks, widgets_values=[42, 25, 6.5, "euler", "karras", 1.0])  # control_after_generate missing
    assert widget_errors(bad, specs["KSampler"])
    apply = next(n for n in wf["nodes"] if n["type"] == "IPAKitApply")
    bad = dict(apply, widgets_values=["scaled", 9.0, 0.8, 0.0, 1.0, "all", ""])
    assert any("above max" in e for e in widget_errors(bad, specs["IPAKitApply"]))
    bad = dict(apply, widgets_values=["scaled", 0.8, 0.8, 0.0, "all", ""])
    assert widget_errors(bad, specs["IPAKitApply"])
    loader = next(n for n in wf["nodes"] if n["type"] == "IPAKitLoadAdapter")
    assert widget_errors(dict(loader, widgets_values=["ip-adapter_sd15.txt"]), specs["IPAKitLoadAdapter"])


def test_saved_apply_nodes_keep_their_meaning(specs):
    """IPAKitApply takes the community pack's Advanced-node defaults: the boosts' default is 'the same as
    the weight' and weight_composition (1.0) is appended. A saved workflow stores its boosts positionally (1.0 / 0.0,
    the old defaults): mapped as the frontend maps them they still land on style_boost / composition_boost and still
    are the boosts, so every weight type gives the layer weights it gave before, except the style-and-composition
    types, whose composition layers now get weight_composition instead of the weight (README). Checked on the
    shipped workflows and on their form before the issue (11 values, no weight_composition)."""
    from ipa_train.adapter.layout import known_sites
    from ipa_train.adapter.weight_types import WEIGHT_TYPES, application_plans, second_weight

    spec = specs["IPAKitApply"]
    # the UNet workflows (the Flux and SD3.5 ones' apply nodes read no weight type or boost)
    nodes = [n for path in WORKFLOWS if path.stem not in DIT_WORKFLOWS for n in _load(path)["nodes"]
             if n["type"] == "IPAKitApply"]
    assert len(nodes) == 8
    names = [n for n, d in {**spec["input"]["required"], **spec["input"].get("optional", {})}.items() if _is_widget(d)]
    # the boosts keep their slots; weight_composition and faceid_lora_strength come after them
    assert names[-4:] == ["style_boost", "composition_boost", "weight_composition", "faceid_lora_strength"]
    for node in nodes:
        saved = widget_values(node, spec)
        before = widget_values(dict(node, widgets_values=node["widgets_values"][:-2]), spec)
        assert len(node["widgets_values"]) == len(names) and before == saved  # the appended values are the defaults
        assert (saved["style_boost"], saved["composition_boost"], saved["weight_composition"]) == (1.0, 0.0, 1.0)
        # the node's rule before the issue: the precise types read their boost, the other types only the weight
        old_second = {"style transfer precise": saved["style_boost"], "composition precise": saved["composition_boost"]}
        new_second = {wt: second_weight(wt, saved["weight_composition"], saved["style_boost"], saved["composition_boost"])
                      for wt in WEIGHT_TYPES}
        assert new_second["style transfer precise"] == 1.0 and new_second["composition precise"] == 0.0
        for family in ("sd15", "sdxl"):
            sites = known_sites(family)
            for wt in WEIGHT_TYPES:
                if "style and composition" in wt:
                    continue
                plans = [application_plans(sites, family, wt, saved["weight"], second, saved["layers"], saved["layer_weights"])
                         for second in (new_second[wt], old_second.get(wt))]
                assert plans[0] == plans[1], f"{node['id']} {family} {wt}"
