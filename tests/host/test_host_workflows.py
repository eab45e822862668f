"""workflows/*.json in the real frontend (headless Chromium on a running ComfyUI with this pack): each loads with no
missing node types and converts to an API prompt, which then runs with random-weight models standing in for the
official files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from .conftest import ROOT
from .dit_standins import workflow_base
from .server import get, running_comfyui
from .test_host_server import _error, _run
from .test_host_web import CHROMIUM, CHROMIUM_ARGS, _playwright
from .workflow_api import STAND_INS, WORKFLOWS, output_nodes, shrink, to_api_prompt

LOAD_AND_CONVERT = """async (wf) => {
  const app = window.comfyAPI.app.app;
  const missing = [...new Set(wf.nodes.map((n) => n.type))].filter((t) => !LiteGraph.registered_node_types[t]);
  await app.loadGraphData(wf, true, true, null, { showMissingNodesDialog: false, showMissingModelsDialog: false });
  const loaded = app.graph._nodes.map((n) => ({ id: n.id, type: n.type, widgets: (n.widgets || []).map((w) => w.value) }));
  const { output } = await app.graphToPrompt();
  return { missing, loaded, links: app.graph.links.size ?? Object.keys(app.graph.links).length, output };
}"""


PRE_18 = "generate_scaled saved with 11 IPAKitApply values"


def _saved_with_11_apply_values() -> dict:
    """ipadapter_generate_scaled as saved before IPAKitApply's weight_composition was appended: 11 widget values,
    the precise weight type and non-default boosts."""
    wf = json.loads((ROOT / "workflows" / "ipadapter_generate_scaled.json").read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "IPAKitApply")
    node["widgets_values"] = node["widgets_values"][:7] + ["style transfer precise", "V only", 2.0, 0.5]
    return wf


@pytest.fixture(scope="module")
def browser_server(comfy, tmp_path_factory):
    sync_playwright = _playwright()
    base = workflow_base(comfy, tmp_path_factory.mktemp("comfy_workflows"), reference_name="reference.png",
                         browser=True)
    with running_comfyui(base) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_function(
                    "() => window.comfyAPI?.app?.app?.graph && LiteGraph.registered_node_types['IPAKitApply']",
                    timeout=120_000)
                converted = {path.stem: page.evaluate(LOAD_AND_CONVERT, json.loads(path.read_text())) for path in WORKFLOWS}
                converted[PRE_18] = page.evaluate(LOAD_AND_CONVERT, _saved_with_11_apply_values())
            finally:
                browser.close()
        yield url, base, converted, errors, get(url + "/object_info")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_and_converts_in_the_frontend(browser_server, path):
    _, _, converted, errors, _ = browser_server
    wf = json.loads(path.read_text())
    result = converted[path.stem]
    assert result["missing"] == [], f"missing node types: {result['missing']}"
    assert sorted(n["id"] for n in result["loaded"]) == sorted(n["id"] for n in wf["nodes"])
    assert result["links"] == len(wf["links"])
    # the frontend keeps the saved widget values
    saved = {n["id"]: n.get("widgets_values", []) for n in wf["nodes"]}
    for n in result["loaded"]:
        if n["type"] not in ("PreviewAny", "LoadImage"):
            assert n["widgets"] == saved[n["id"]], n["type"]
    # every executable node is in the API prompt, links resolved
    output = result["output"]
    runnable = {str(n["id"]): n["type"] for n in wf["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    assert {k: v["class_type"] for k, v in output.items()} == runnable
    for node in output.values():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in output
    assert not errors, "\n".join(errors)


def test_workflow_saved_with_11_apply_values_keeps_its_boosts(browser_server):
    """The frontend maps an older IPAKitApply's 11 values onto the same widgets: its boosts stay on style_boost /
    composition_boost (so they still are the boosts), the appended weight_composition and faceid_lora_strength get
    their defaults."""
    result = browser_server[2][PRE_18]
    node = next(n for n in result["loaded"] if n["type"] == "IPAKitApply")
    saved = next(n for n in _saved_with_11_apply_values()["nodes"] if n["type"] == "IPAKitApply")["widgets_values"]
    assert node["widgets"] == saved + [1.0, 1.0]
    inputs = result["output"][str(node["id"])]["inputs"]
    assert (inputs["weight_type"], inputs["style_boost"], inputs["composition_boost"], inputs["weight_composition"]) \
        == ("style transfer precise", 2.0, 0.5, 1.0)


@pytest.mark.parametrize("name", [p.stem for p in WORKFLOWS])
def test_workflow_runs(browser_server, name):
    """Every workflow, as the API prompt the frontend made from it, runs with the stand-in models, and each of its
    output nodes produced something."""
    url, base, converted, _, _ = browser_server
    prompt = shrink(copy.deepcopy(converted[name]["output"]), Path(base))  # the frontend's prompt stays as it was
    wf_files = [v for n in prompt.values() for v in n["inputs"].values() if isinstance(v, str) and v in STAND_INS.values()]
    assert wf_files, "the workflow names none of the official model files"
    entry = _run(url, prompt)
    assert entry["status"]["status_str"] == "success", _error(entry)
    outputs = output_nodes(prompt)
    assert outputs and all(entry["outputs"].get(k) for k in outputs), sorted(entry["outputs"])
    for k in outputs:
        for image in entry["outputs"][k].get("images", []):
            assert (Path(base) / image["type"] / image["subfolder"] / image["filename"]).is_file()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_python_conversion_matches_the_frontend(browser_server, path):
    """workflow_api.to_api_prompt (used where no browser is installed) gives the frontend's API prompt."""
    _, _, converted, _, object_info = browser_server
    def declared(kind: str) -> set:
        spec = object_info.get(kind, {}).get("input", {})
        return {name for section in spec.values() for name in section}

    # the frontend adds a _meta title to each node, and the values of its display-only widgets (PreviewAny's
    # preview / previewMode), which the server does not declare and ignores
    frontend = {k: {"class_type": v["class_type"], "inputs": {n: x for n, x in v["inputs"].items()
                                                            if n in declared(v["class_type"])}}
                for k, v in converted[path.stem]["output"].items()}
    ours = to_api_prompt(json.loads(path.read_text()), object_info)
    differ = {k: {"ours": ours.get(k), "frontend": frontend.get(k)} for k in set(ours) | set(frontend)
              if ours.get(k) != frontend.get(k)}
    assert not differ, json.dumps(differ)[:3000]  # a short message: pytest's own diff of two prompts is slow


def test_template_browser_lists_every_workflow_with_its_thumbnail(browser_server):
    """The pinned frontend (comfyui-frontend-package 1.35.9) lists a pack's templates from /api/workflow_templates and
    shows each one's thumbnail from /api/workflow_templates/<pack>/<name>.jpg (mediaSubtype "jpg" for custom nodes;
    see getTemplateThumbnailUrl in its bundle): every workflow is listed and its .jpg is served as a JPEG."""
    import urllib.request

    from .server import PACK, get

    url = browser_server[0]
    listed = get(url + "/api/workflow_templates")
    assert sorted(listed.get(PACK, [])) == sorted(p.stem for p in WORKFLOWS)
    for name in listed[PACK]:
        with urllib.request.urlopen(f"{url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg", name
            assert r.read(3) == b"\xff\xd8\xff", name
