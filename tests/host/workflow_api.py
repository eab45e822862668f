"""UI workflows (workflows/*.json) to API prompts without a browser, and the stand-ins the host runs use.

The frontend does this conversion in the host tests (`test_host_workflows.py`, which also checks that this one
gives the same prompts); scripts that run the workflows where no browser is installed
(`benchmarks/gpu_workflows.py`) use this one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ..face_standins import face_image, write_pack
from ..faceid_factories import random_lora  # at import: it imports tests.factories, which the host import hides later
from ..factories import random_adapter
from .conftest import ROOT

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
# official file name -> the random-weight stand-in written by test_host_server._write_models
STAND_INS = {
    "v1-5-pruned-emaonly.safetensors": "random_sd15.safetensors",
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "random_vitl.safetensors",
    "ip-adapter_sd15.safetensors": "kit_sd15_vitl.safetensors",
    "ip-adapter-faceid_sd15.bin": "kit_faceid_lora4_sd15.safetensors",  # written by write_face_stand_ins
    "ip-adapter-faceid-portrait-v11_sd15.bin": "kit_faceid_portrait_sd15.safetensors",
    # Flux: small models the hook node of dit_standins.py lets the core loaders build
    "flux1-dev.safetensors": "ipakit_tiny_flux.safetensors",
    "clip_l.safetensors": "ipakit_tiny_clip_l3.safetensors",
    "t5xxl_fp16.safetensors": "ipakit_tiny_t5xxl.safetensors",
    "ae.safetensors": "ipakit_random_ae16.safetensors",
    "clip-vit-large-patch14.safetensors": "random_vitl.safetensors",
    "flux-ip-adapter-v2.safetensors": "ipakit_tiny_xlabs_v2.safetensors",
    # SD3.5 Large: the same CLIP-L; the checkpoint holds the MMDiT and the VAE, as sd3.5_large does
    "sd3.5_large.safetensors": "ipakit_tiny_sd35.safetensors",
    "clip_g.safetensors": "ipakit_tiny_clip_g.safetensors",
    "sigclip_vision_patch14_384.safetensors": "ipakit_tiny_siglip.safetensors",
    "SD3.5-Large-IP-Adapter.bin": "ipakit_tiny_instantx_sd35.bin",
}
# where one official name needs another stand-in in one loader: SD3's T5 is 4096 wide (ComfyUI joins its tokens to
# the CLIP-L + CLIP-G ones padded to 4096), Flux's tiny one is not
LOADER_STAND_INS = {"TripleCLIPLoader": {"t5xxl_fp16.safetensors": "ipakit_tiny_t5xxl_4096_fp8.safetensors"}}
# the face workflows' reference images -> the ones a requeued run (`changed`) loads instead; all face-like
FACE_IMAGES = {"face.png": "face_b.png", "face_2.png": "face_2_b.png"}
NOT_EXECUTED = ("Note", "MarkdownNote")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def _declared(object_info: dict, node_type: str) -> dict | None:
    """name -> options of the node's inputs as the server declares them; None when the server does not know it."""
    if node_type not in object_info:
        return None
    spec = object_info[node_type].get("input", {})
    return {name: (decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {})
            for section in ("required", "optional") for name, decl in spec.get(section, {}).items()}


def _widget_names(object_info: dict, node_type: str) -> list[str]:
    """The node's widget inputs in the order the server declares them (the order of saved widget values)."""
    spec = object_info.get(node_type, {}).get("input", {})
    names = []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            kind, opts = decl[0], (decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {})
            if (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) \
                    and not opts.get("forceInput"):
                names.append(name)
    return names


def to_api_prompt(workflow: dict, object_info: dict) -> dict:
    """A UI workflow (nodes with `inputs` and `widgets_values`, links) -> the API prompt the frontend queues.

    Widget values follow the node's widget inputs in order; a seed's "control after generate" value and an image
    loader's upload button take one more slot each, which the prompt does not carry."""
    links = {link[0]: link for link in workflow["links"]}  # id -> [id, from node, from slot, to node, to slot, type]
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOT_EXECUTED or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        declared = _declared(object_info, node["type"])
        values = list(node.get("widgets_values") or [])
        slots = node.get("inputs", [])
        has_upload_slot = any(s["name"] == "upload" for s in slots)
        inputs: dict = {}
        for slot in slots:
            name, link = slot["name"], slot.get("link")
            if "widget" in slot:
                value = values.pop(0) if values else None
                if declared is not None and name not in declared:
                    continue  # a widget only the frontend has (the image loader's upload button)
                opts = (declared or {}).get(name, {})
                if values and opts.get("control_after_generate"):
                    values.pop(0)
                elif values and opts.get("image_upload") and not has_upload_slot and values[0] == "image":
                    values.pop(0)
                elif values and isinstance(value, int) and values[0] in CONTROL_VALUES:
                    values.pop(0)
                inputs[name] = value
            if link is not None:
                origin = links[link]
                inputs[name] = [str(origin[1]), origin[2]]
        # widgets appended to the node after the workflow was saved have a value but no slot: the frontend maps
        # the remaining values onto them in declaration order
        slot_names = {slot["name"] for slot in slots}
        for name, value in zip([n for n in _widget_names(object_info, node["type"]) if n not in slot_names], values):
            inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def shrink(prompt: dict, base: Path, size: int = 64, steps: int = 2, light: bool = False) -> dict:
    """The API prompt with the random models under the official names' places, a tiny offline CLIP for
    evaluation, a 3-image dataset, `size` px latents and `steps` sampling steps, 2 training steps at 64 px, to keep
    it short on CPU. light: also at most 2 latents per batch and one seed per sweep point (the same nodes run)."""
    from ipa_train.toy.tiny import write_tiny_clip

    from .server import write_dataset

    clip_dir = base / "tiny_clip"
    if not clip_dir.exists():
        write_tiny_clip(clip_dir)
    dataset = base / "input" / "wf_dataset"
    if not dataset.exists():
        write_dataset(dataset, 3, size=(72, 64))
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        stand_ins = {**STAND_INS, **LOADER_STAND_INS.get(kind, {})}
        for key, value in list(inputs.items()):
            if isinstance(value, str) and value in stand_ins:
                inputs[key] = stand_ins[value]
        if kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=size, height=size)
            if light:
                inputs["batch_size"] = min(2, int(inputs.get("batch_size", 1)))
        elif kind == "KSampler":
            inputs.update(steps=steps)
        elif kind in ("IPAKitEvaluate", "IPAKitWeightSweep") and inputs.get("clip_model"):
            inputs["clip_model"] = str(clip_dir)
        if kind == "IPAKitWeightSweep":
            inputs.update(steps=steps, weights="0, 1")
            if light:
                inputs["seeds_per_point"] = 1
        elif kind == "IPAKitDataset":
            inputs["path"] = str(dataset)
        elif kind == "IPAKitTrain":
            inputs.update(steps=2, resolution=64, validate_every=0, save_every=0)
    return prompt


def write_face_stand_ins(base: Path) -> None:
    """What the FaceID workflows need beside `_write_models`' files: FaceID and portrait adapters in the random SD1.5
    checkpoint's layout (random weights; the FaceID one with a rank-4 LoRA), the tiny stand-in face models in
    models/insightface/models/buffalo_l/, and face-like reference images the stand-in detector finds."""
    from PIL import Image

    from ipa_train import save_adapter
    from ipa_train.adapter.config import AdapterConfig
    from ipa_train.adapter.layout import known_sites

    from .test_host_server import CACHE

    hidden = tuple(s.hidden for s in known_sites("sd15"))
    for projection, tokens, name in (("faceid", 4, "kit_faceid_lora4_sd15.safetensors"),
                                     ("faceid-portrait", 16, "kit_faceid_portrait_sd15.safetensors")):
        path = CACHE / name
        if not path.exists():
            cfg = AdapterConfig(projection=projection, num_tokens=tokens, clip_embedding_dim=512, cross_attention_dim=768,
                                layer_hidden_sizes=hidden, clip_output="none", face_embedding_dim=512,
                                lora_rank=4 if projection == "faceid" else 0)
            adapter = random_adapter(cfg, seed=3)
            if projection == "faceid":
                adapter.lora = random_lora(hidden, 768, rank=4, seed=3, scale=0.02)
            CACHE.mkdir(parents=True, exist_ok=True)
            save_adapter(adapter, path)
        (base / "models" / "ipadapter").mkdir(parents=True, exist_ok=True)
        (base / "models" / "ipadapter" / name).symlink_to(path)
    write_pack(base / "models" / "insightface" / "models" / "buffalo_l")
    faces = {"face.png": (64, 96, 96), "face_2.png": (40, 150, 120), "face_b.png": (100, 60, 110),
             "face_2_b.png": (30, 30, 150)}
    for seed, (name, face) in enumerate(faces.items()):
        Image.fromarray(face_image(240, 320, faces=(face,), seed=seed)).save(base / "input" / name)


def prepare_workflow_base(base: Path, comfy, browser: bool = False) -> Path:
    """A server base directory for the shipped workflows: the random SD1.5 models, reference.png, the face stand-ins,
    and the Flux and SD3.5 stand-ins with the hook node that lets the core loaders build them small (dit_standins.py)."""
    from .dit_standins import HOOK, HOOK_NAME, link_standins, write_dit_standins
    from .server import prepare_base
    from .test_host_server import CACHE, _write_models

    prepare_base(base, _write_models(comfy), reference_name="reference.png", browser=browser,
                 extra_nodes={HOOK_NAME: HOOK})
    link_standins(base, write_dit_standins(comfy, CACHE))
    write_face_stand_ins(base)
    return base


def changed(prompt: dict, reference: str) -> dict:
    """The same prompt queued again by a user who changed the inputs: another reference image and other seeds
    (so every node downstream runs again, with the cached adapter)."""
    import copy

    out = copy.deepcopy(prompt)
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            inputs["image"] = FACE_IMAGES.get(inputs["image"], reference)
        for key in ("seed", "noise_seed"):
            if isinstance(inputs.get(key), int):
                inputs[key] += 1
    return out


def output_nodes(prompt: dict) -> list[str]:
    return [k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage", "PreviewAny")]


FIRST = ("ipadapter_generate_scaled", "ipadapter_generate_fused", "ipadapter_train_then_generate")


def run_order() -> list[str]:
    """The generation workflows first (a user's usual start), then the others."""
    names = [p.stem for p in WORKFLOWS]
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def run_all_twice(url: str, base: Path, reference_b: str, size: int = 64, steps: int = 2,
                  report: Callable[[str, int, str, float], None] | None = None, rounds: int = 2,
                  light: bool = False, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[str]:
    """Each workflow in `run_order()` on the server at `url`, then (rounds=2) each again in reverse order with
    another reference and seeds (`changed`); returns the failures, one line each. report(name, round, error, s)."""
    from .server import get
    from .test_host_server import _error, _run

    info = get(url + "/object_info")
    prompts = {p.stem: shrink(to_api_prompt(json.loads(p.read_text()), info), base, size, steps, light)
               for p in WORKFLOWS}
    order = [n for n in run_order() if (only is None or n in set(only)) and n not in set(exclude)]
    failures = []
    for round_no, names in enumerate((order, order[::-1])[:rounds], start=1):
        for name in names:
            prompt = prompts[name] if round_no == 1 else changed(prompts[name], reference_b)
            start = time.perf_counter()
            try:
                entry = _run(url, prompt)
                error = ""
                if entry["status"]["status_str"] != "success":
                    error = _error(entry)
                elif not all(entry["outputs"].get(k) for k in output_nodes(prompt)):
                    error = f"outputs missing: {sorted(entry['outputs'])}"
            except Exception as e:  # a timeout or a dropped server: reported like a failed run
                error = f"{type(e).__name__}: {e}"
            if report is not None:
                report(name, round_no, error, time.perf_counter() - start)
            if error:
                failures.append(f"{name} (round {round_no}): {error}")
    return failures
