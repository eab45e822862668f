"""The web extensions (web/js) in a real browser: headless Chromium on a running ComfyUI with this pack.

Needs Chromium (`/usr/bin/chromium`, or CHROMIUM_PATH) and the `playwright` Python package (its API only; no
downloaded browser). The training node is stood in for by a test-only pack written at run time: a node
that pushes "ipakit.training" events the way IPAKitTrain does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from .conftest import missing
from .server import PACK, prepare_base, running_comfyui, write_dataset
from .server import get as _get
from .test_host_server import _write_models

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser") or ""
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOSSES = [1.0, 0.8, 0.6, 0.5, 0.45]

EMITTER = textwrap.dedent('''
    """Test-only pack: pushes "ipakit.training" events like IPAKitTrain, under its own unique_id."""
    import time

    from server import PromptServer


    class IPAKitTestEmitter:
        CATEGORY = "ipadapter_kit/test"
        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"steps": ("INT", {"default": 5})}, "hidden": {"unique_id": "UNIQUE_ID"}}

        @classmethod
        def IS_CHANGED(cls, **kwargs):
            return float("nan")

        def run(self, steps, unique_id):
            server = PromptServer.instance
            losses = %r
            for step in range(1, steps + 1):
                event = {"node": str(unique_id), "step": step, "total": steps, "loss": losses[step - 1],
                         "done": step == steps, "status": "done" if step == steps else "training"}
                server.send_sync("ipakit.training", event, server.client_id)
                time.sleep(0.5)
            return {}


    NODE_CLASS_MAPPINGS = {"IPAKitTestEmitter": IPAKitTestEmitter}
''') % (LOSSES,)


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright Python package is not installed (pip install playwright; no browser download needed)")
    if not CHROMIUM or not os.access(CHROMIUM, os.X_OK):
        missing("Chromium not found (apt-get install chromium, or set CHROMIUM_PATH)")
    return sync_playwright


@pytest.fixture(scope="module")
def web_server(comfy, tmp_path_factory):
    sync_playwright = _playwright()
    base = prepare_base(tmp_path_factory.mktemp("comfy_web"), _write_models(comfy),
                        extra_nodes={"ipakit_test_emitter": EMITTER}, browser=True)
    with running_comfyui(base) as url:
        yield url, base, sync_playwright


def test_extensions_are_served(web_server):
    url, base, _ = web_server
    listed = _get(url + "/extensions")
    assert f"/extensions/{PACK}/js/loader_info.js" in listed, listed
    assert f"/extensions/{PACK}/js/training_loss.js" in listed, listed


# Builds: IPAKitLoadAdapter -> PreviewAny (so the loader runs), and the emitter; queues it as the UI would.
BUILD_AND_QUEUE = """async ([adapterFile]) => {
  const app = window.comfyAPI.app.app;
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  app.graph.clear();
  const loader = add("IPAKitLoadAdapter", [120, 140]);
  loader.widgets.find((w) => w.name === "adapter_file").value = adapterFile;
  const preview = add("PreviewAny", [560, 140]);
  loader.connect(1, preview, 0);
  const emitter = add("IPAKitTestEmitter", [120, 360]);
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  await app.queuePrompt(0);
  return { loader: loader.id, emitter: emitter.id };
}"""


def test_loss_curve_and_adapter_info_in_browser(web_server, tmp_path):
    url, base, sync_playwright = web_server
    errors: list[str] = []
    shot = Path(os.environ.get("IPAKIT_WEB_SCREENSHOT", Path(tempfile.gettempdir()) / "ipakit_web.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("console", lambda m: errors.append(f"console: {m.text}")
                    if m.type == "error" and "ipadapter" in (m.text + str(m.location)).lower() else None)
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_function(
                """() => { const app = window.comfyAPI?.app?.app; const names = (app?.extensions ?? []).map((e) => e.name);
                           return app?.graph && names.includes("ipadapter_kit.loader_info")
                                  && names.includes("ipadapter_kit.training_loss")
                                  && LiteGraph.registered_node_types["IPAKitTestEmitter"]; }""",
                timeout=120_000)
            ids = page.evaluate(BUILD_AND_QUEUE, ["kit_sd15_vitl.safetensors"])

            # Events arrive while the node runs: the history grows step by step.
            page.wait_for_function(f"() => (window.__ipakit?.training?.['{ids['emitter']}']?.points.length ?? 0) >= 2",
                                   timeout=240_000)
            partial = page.evaluate(f"() => window.__ipakit.training['{ids['emitter']}'].done")
            page.screenshot(path=str(shot.with_name(shot.stem + "_live.png")))
            page.wait_for_function(f"() => window.__ipakit?.training?.['{ids['emitter']}']?.done === true", timeout=60_000)
            page.wait_for_function(f"() => window.__ipakit?.loaderInfo?.['{ids['loader']}'] !== undefined", timeout=240_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shot))
            state = page.evaluate(f"""() => {{
                const app = window.comfyAPI.app.app;
                const emitter = app.graph.getNodeById({ids['emitter']}), loader = app.graph.getNodeById({ids['loader']});
                return {{ run: window.__ipakit.training['{ids['emitter']}'], info: window.__ipakit.loaderInfo['{ids['loader']}'],
                          lines: loader.ipakitInfoLines, attached: !!emitter.ipakitLossAttached,
                          emitterSize: [...emitter.size], loaderSize: [...loader.size] }};
            }}""")
            # Saved with the workflow: a reload shows the info again, until another file is picked.
            reloaded = page.evaluate(f"""async () => {{
                const app = window.comfyAPI.app.app;
                const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
                await app.loadGraphData(saved, true, true, "reloaded");
                const loader = app.graph.getNodeById({ids['loader']});
                const before = loader.ipakitVisibleInfoLines();
                loader.widgets.find((w) => w.name === "adapter_file").value = "another.safetensors";
                return {{ before, after: loader.ipakitVisibleInfoLines(), file: loader.properties.ipakit_info.file }};
            }}""")
        finally:
            browser.close()

    assert not errors, "\n".join(errors)
    assert partial is False  # seen before the last event, i.e. live
    run = state["run"]
    assert [p[0] for p in run["points"]] == [1, 2, 3, 4, 5]
    assert [p[1] for p in run["points"]] == pytest.approx(LOSSES)
    assert run["total"] == 5 and run["status"] == "done" and state["attached"]
    assert state["emitterSize"][1] >= 90  # room made for the plot
    info = state["info"]
    assert info["file"] == "kit_sd15_vitl.safetensors" and info["encoder"] == "ViT-L/14" and info["family"] == "sd15"
    assert state["lines"][0].startswith(f"{info['variant']} · sd15 · ViT-L/14 · {info['num_tokens']} tokens · fusion: ")
    assert shot.stat().st_size > 10_000
    assert reloaded["before"] == state["lines"] and reloaded["file"] == "kit_sd15_vitl.safetensors"
    assert reloaded["after"] is None


BUILD_TRAIN = """async ([ckpt, clipVision, dataset]) => {
  const app = window.comfyAPI.app.app;
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
  app.graph.clear();
  const loader = add("CheckpointLoaderSimple", [40, 80]);
  set(loader, "ckpt_name", ckpt);
  const cv = add("CLIPVisionLoader", [40, 300]);
  set(cv, "clip_name", clipVision);
  const ds = add("IPAKitDataset", [40, 420]);
  set(ds, "path", dataset);
  const train = add("IPAKitTrain", [420, 80]);
  for (const [k, v] of Object.entries({ steps: 4, resolution: 64, save_every: 0, output_name: "web-run" })) set(train, k, v);
  loader.connect(0, train, 0); loader.connect(1, train, 1); loader.connect(2, train, 2);
  cv.connect(0, train, 3); ds.connect(0, train, 4);
  await app.queuePrompt(0);
  return { train: train.id };
}"""


def test_real_training_node_draws_its_loss(web_server):
    """The real IPAKitTrain node pushes its loss to the page while it trains, and the curve is attached to it."""
    url, base, sync_playwright = web_server
    ds = write_dataset(base / "input" / "web_ds", 2)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && LiteGraph.registered_node_types['IPAKitTrain']",
                                   timeout=120_000)
            ids = page.evaluate(BUILD_TRAIN, ["random_sd15.safetensors", "random_vitl.safetensors", str(ds)])
            page.wait_for_function(f"() => window.__ipakit?.training?.['{ids['train']}']?.done === true", timeout=600_000)
            run = page.evaluate(f"() => window.__ipakit.training['{ids['train']}']")
            attached = page.evaluate(f"() => !!window.comfyAPI.app.app.graph.getNodeById({ids['train']}).ipakitLossAttached")
        finally:
            browser.close()
    assert [pt[0] for pt in run["points"]] == [1, 2, 3, 4]
    assert all(isinstance(pt[1], float) and pt[1] > 0 for pt in run["points"])
    assert run["total"] == 4 and run["status"] == "done" and attached
