"""A real ComfyUI server with this pack installed: /object_info, then a full prompt through the HTTP API."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipa_train import save_adapter
from ipa_train.adapter.config import AdapterConfig
from ipa_train.adapter.layout import known_sites

from ..factories import random_adapter
from ..node_specs import load_specs
from .server import combo_options, prepare_base, running_comfyui, write_dataset
from .server import get as _get

NODE_IDS = tuple(load_specs())  # every node of the pack (tests/data/kit_nodes.json, checked against the host)
CACHE = Path(os.environ.get("IPAKIT_HOST_CACHE", Path.home() / ".cache" / "ipakit-host-models"))


def _write_models(comfy) -> dict[str, Path]:
    """Random-weight files in the real layouts, made once and cached: an SD1.5 checkpoint, a CLIP ViT-L/14
    vision model, and a plain SD1.5 adapter for ViT-L/14."""
    import comfy.diffusers_convert
    import comfy.model_detection
    import comfy.utils
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    CACHE.mkdir(parents=True, exist_ok=True)
    ckpt, cv, ad = CACHE / "random_sd15.safetensors", CACHE / "random_vitl.safetensors", CACHE / "kit_sd15_vitl.safetensors"
    torch.manual_seed(0)
    if not ckpt.exists():
        sd = {}
        usd = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).state_dict()
        keymap = comfy.utils.unet_to_diffusers(comfy.model_detection.unet_config_from_diffusers_unet(usd))
        sd.update({"model.diffusion_model." + keymap[k]: v.half() for k, v in usd.items()})
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        sd.update({"first_stage_model." + k: v.half() for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items()})
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                          projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1))
        sd.update({"cond_stage_model.transformer." + k: v.half() for k, v in te.state_dict().items()})
        save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    if not cv.exists():
        hf = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
            image_size=224, projection_dim=768, hidden_act="quick_gelu"))
        save_file({k: v.half().contiguous() for k, v in hf.state_dict().items()}, str(cv))
    if not ad.exists():
        cfg = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=768, cross_attention_dim=768,
                            layer_hidden_sizes=tuple(s.hidden for s in known_sites("sd15")))
        save_adapter(random_adapter(cfg), ad)
    return {"checkpoints": ckpt, "clip_vision": cv, "ipadapter": ad}


def _post(url: str, body: dict):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if body.strip() else {}


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    base = prepare_base(tmp_path_factory.mktemp("comfy_base"), _write_models(comfy))
    with running_comfyui(base) as url:
        yield url, base


@pytest.fixture(autouse=True)
def _idle_queue(request):
    """A test that stops while its prompt still runs must not leave that prompt to the next test: clear, interrupt."""
    yield
    if "server" not in request.fixturenames:
        return
    url = request.getfixturevalue("server")[0]
    deadline = time.time() + 120
    while time.time() < deadline:
        queue = _get(url + "/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        _post(url + "/queue", {"clear": True})
        _post(url + "/interrupt", {})
        time.sleep(1)


def test_every_node_registered_with_tooltips(server):
    url, base = server
    info = _get(url + "/object_info")
    for node in NODE_IDS:
        assert node in info, (base / "server.log").read_text()[-3000:]
        spec = info[node]
        for section in ("required", "optional"):
            for name, (_, opts, *_) in ((k, (v + [{}])[:2]) for k, v in spec["input"].get(section, {}).items()):
                assert opts.get("tooltip"), f"{node}.{name} has no tooltip"
        assert len(spec["output_tooltips"]) == len(spec["output"])
        assert spec["category"].startswith("ipadapter_kit")
    assert "kit_sd15_vitl.safetensors" in combo_options(info["IPAKitLoadAdapter"]["input"]["required"]["adapter_file"])


def _reference_prompt(crop: str) -> dict:
    """Nodes 1-5 and 7-9 of a generation prompt: checkpoint, CLIP vision, adapter, reference, encode, prompt "a photo
    of a cat" (7) and an empty negative (8), one 64x64 latent (9)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "random_sd15.safetensors"}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "random_vitl.safetensors"}},
        "3": {"class_type": "IPAKitLoadAdapter", "inputs": {"adapter_file": "kit_sd15_vitl.safetensors"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "5": {"class_type": "IPAKitEncodeImage", "inputs": {"adapter": ["3", 0], "clip_vision": ["2", 0], "image": ["4", 0],
                                                           "combine": "concat", "crop": crop}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def test_full_prompt_writes_an_image(server):
    url, base = server
    prompt = {
        **_reference_prompt(crop="pad"),
        "6": {"class_type": "IPAKitApply", "inputs": {"model": ["1", 0], "adapter": ["3", 0], "embeds": ["5", 0], "mode": "fused",
                                                     "weight": 0.8, "fusion_lambda": 0.8, "start_at": 0.0, "end_at": 1.0,
                                                     "layers": "all", "layer_weights": ""}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["6", 0], "seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "positive": ["7", 0], "negative": ["8", 0],
                                                    "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "ipakit_host"}},
    }
    pid = _post(url + "/prompt", {"prompt": prompt, "client_id": "ipakit-test"})["prompt_id"]
    for _ in range(600):
        hist = _get(f"{url}/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    entry = hist[pid]
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    images = entry["outputs"]["12"]["images"]
    out = base / "output" / images[0]["subfolder"] / images[0]["filename"]
    assert out.is_file() and Image.open(out).size == (64, 64)
    info = entry["outputs"]["3"]["ipakit_info"][0]
    assert info["encoder"] == "ViT-L/14" and info["family"] == "sd15"


def test_wrong_encoder_message(server):
    """A plus adapter needs penultimate hidden states of ViT-H; ViT-L gives a clear error naming both."""
    url, base = server
    cfg = AdapterConfig(projection="plain", num_tokens=4, clip_embedding_dim=1024, cross_attention_dim=768,
                        layer_hidden_sizes=tuple(s.hidden for s in known_sites("sd15")))
    save_adapter(random_adapter(cfg), base / "models" / "ipadapter" / "vith_adapter.safetensors")
    prompt = {
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "random_vitl.safetensors"}},
        "3": {"class_type": "IPAKitLoadAdapter", "inputs": {"adapter_file": "vith_adapter.safetensors"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "5": {"class_type": "IPAKitEncodeImage", "inputs": {"adapter": ["3", 0], "clip_vision": ["2", 0], "image": ["4", 0],
                                                           "combine": "concat", "crop": "center"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }
    r = _post(url + "/prompt", {"prompt": prompt, "client_id": "ipakit-test"})
    pid = r["prompt_id"]
    for _ in range(240):
        hist = _get(f"{url}/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    msgs = json.dumps(hist[pid]["status"]["messages"])
    assert "needs ViT-H/14" in msgs and "ViT-L/14" in msgs and "CLIP-ViT-H-14" in msgs


def _run(url: str, prompt: dict, timeout_s: float = 600) -> dict:
    pid = _post(url + "/prompt", {"prompt": prompt, "client_id": "ipakit-test"})["prompt_id"]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        hist = _get(f"{url}/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            return hist[pid]
        time.sleep(0.5)
    pytest.fail(f"prompt {pid} did not finish in {timeout_s} s")


def _error(entry: dict) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data['node_type']}: {data['exception_type']}: {data['exception_message']}\n" + "".join(data["traceback"][-3:])
    return json.dumps(entry["status"])[-2000:]


def _train_prompt(steps: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "random_sd15.safetensors"}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "random_vitl.safetensors"}},
        "3": {"class_type": "IPAKitDataset", "inputs": {"path": "__DATASET__", "captions_json": ""}},
        "4": {"class_type": "IPAKitTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "clip_vision": ["2", 0], "dataset": ["3", 0],
            "projection": "plain", "fusion": True, "steps": steps, "batch_size": 1, "learning_rate": 1e-4, "resolution": 64,
            "drop_text": 0.05, "drop_image": 0.05, "drop_both": 0.05, "seed": 0, "save_every": 2, "output_name": "host-run"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
        "6": {"class_type": "IPAKitEncodeImage", "inputs": {"adapter": ["4", 0], "clip_vision": ["2", 0], "image": ["5", 0],
                                                           "combine": "concat", "crop": "center"}},
        "7": {"class_type": "IPAKitApply", "inputs": {"model": ["1", 0], "adapter": ["4", 0], "embeds": ["6", 0], "mode": "fused",
                                                     "weight": 0.8, "fusion_lambda": 0.8, "start_at": 0.0, "end_at": 1.0,
                                                     "layers": "all", "layer_weights": ""}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["1", 1]}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "positive": ["8", 0], "negative": ["8", 0],
                                                    "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "ipakit_trained"}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["4", 2], "filename_prefix": "ipakit_loss"}},
    }


def test_train_node_then_apply_in_one_prompt_and_resume(server):
    """IPAKitTrain trains a few steps on the SD1.5-architecture checkpoint; its adapter drives the apply node in the
    same prompt; queueing again with the same name and more steps resumes from the last checkpoint."""
    url, base = server
    ds = write_dataset(base / "input" / "train_ds", 3, size=(72, 80), seed=1)
    (ds / "broken.png").write_bytes(b"not an image")
    prompt = json.loads(json.dumps(_train_prompt(3)).replace("__DATASET__", str(ds)))
    prompt["4"]["inputs"].update(validate_every=3, validation_prompt="a cat", validation_image=["5", 0])
    prompt["14"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 3], "filename_prefix": "ipakit_val"}}
    entry = _run(url, prompt)
    assert entry["status"]["status_str"] == "success", _error(entry)
    assert "3 images, 3 captions" in entry["outputs"]["3"]["text"][0] and "broken.png" in entry["outputs"]["3"]["text"][0]
    assert (base / "output" / "ipadapter_kit" / "host-run.safetensors").is_file()
    run_dir = base / "output" / "ipadapter_kit_runs" / "host-run" / "checkpoints"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-000002", "checkpoint-000003"]
    assert entry["outputs"]["12"]["images"] and entry["outputs"]["13"]["images"]
    val = entry["outputs"]["14"]["images"]
    # at the training resolution
    assert len(val) == 1 and Image.open(base / "output" / val[0]["subfolder"] / val[0]["filename"]).size == (64, 64)
    # the trained file shows up in the loader's list and loads with fusion weights
    info = combo_options(_get(url + "/object_info/IPAKitLoadAdapter")["IPAKitLoadAdapter"]["input"]["required"]["adapter_file"])
    assert "host-run.safetensors" in info

    prompt5 = json.loads(json.dumps(_train_prompt(5)).replace("__DATASET__", str(ds)))
    entry = _run(url, prompt5)
    assert entry["status"]["status_str"] == "success", _error(entry)
    assert "host-run: 5 steps" in json.dumps(entry["outputs"]["4"])
    # resumed from step 3; the node keeps the newest 3 checkpoints (training's default --keep-checkpoints)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-000003", "checkpoint-000004", "checkpoint-000005"]


def test_cancel_saves_a_checkpoint_and_the_next_run_resumes(server):
    url, base = server
    ds = write_dataset(base / "input" / "cancel_ds", 2, seed=2)
    prompt = json.loads(json.dumps(_train_prompt(400)).replace("__DATASET__", str(ds)).replace("host-run", "cancel-run"))
    prompt["4"]["inputs"]["save_every"] = 0
    for key in ("5", "6", "7", "8", "9", "10", "11", "12"):
        del prompt[key]
    pid = _post(url + "/prompt", {"prompt": prompt, "client_id": "ipakit-test"})["prompt_id"]
    run_dir = base / "output" / "ipadapter_kit_runs" / "cancel-run"
    # interrupt only once this prompt is training (not while another one runs or the models load)
    log, start = base / "server.log", (base / "server.log").stat().st_size
    deadline = time.time() + 600
    while time.time() < deadline:
        running = [item[1] for item in _get(url + "/queue")["queue_running"]]
        if running == [pid] and "training a plain adapter" in log.read_text(errors="replace")[start:]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"prompt {pid} did not start training within 600 s")
    time.sleep(2)
    _post(url + "/interrupt", {})
    for _ in range(600):
        hist = _get(f"{url}/history/{pid}")
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    kinds = [m[0] for m in hist[pid]["status"]["messages"]]
    assert "execution_interrupted" in kinds, _error(hist[pid])
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].split("-")[1])
    assert 0 <= stopped_at < 400
    prompt["4"]["inputs"]["steps"] = stopped_at + 2
    entry = _run(url, prompt)
    assert entry["status"]["status_str"] == "success", _error(entry)
    assert f"cancel-run: {stopped_at + 2} steps" in json.dumps(entry["outputs"]["4"])


def test_weight_sweep_node_samples_scores_and_plots(server):
    """IPAKitWeightSweep with a local CLIP folder: every (mode, weight, seed) is sampled, scored and plotted; at
    weight 0 both modes are the unpatched model, so their images and scores are identical."""
    from ipa_train.toy.tiny import write_tiny_clip

    url, base = server
    clip_dir = write_tiny_clip(base / "tiny_clip")
    prompt = {
        **_reference_prompt(crop="center"),
        "10": {"class_type": "IPAKitWeightSweep", "inputs": {
            "model": ["1", 0], "adapter": ["3", 0], "embeds": ["5", 0], "reference": ["4", 0], "positive": ["7", 0],
            "negative": ["8", 0], "latent_image": ["9", 0], "vae": ["1", 2], "prompt": "a photo of a cat",
            "clip_model": str(clip_dir), "weights": "0, 1.5", "modes": "scaled and fused", "fusion_lambda": 0.5,
            "seed": 3, "seeds_per_point": 2, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "save_as": "host-sweep"}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "ipakit_sweep_plot"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["10", 1], "filename_prefix": "ipakit_sweep"}},
    }
    entry = _run(url, prompt)
    assert entry["status"]["status_str"] == "success", _error(entry)
    plot = entry["outputs"]["11"]["images"]
    assert len(plot) == 1 and Image.open(base / "output" / plot[0]["subfolder"] / plot[0]["filename"]).size == (900, 380)
    files = [base / "output" / i["subfolder"] / i["filename"] for i in entry["outputs"]["12"]["images"]]
    assert len(files) == 8  # modes x weights x seeds, in that order
    pixels = [np.asarray(Image.open(f)) for f in files]
    assert np.array_equal(pixels[0], pixels[4]) and np.array_equal(pixels[1], pixels[5])  # weight 0: scaled == fused
    assert not np.array_equal(pixels[0], pixels[1])  # two seeds
    assert not np.array_equal(pixels[0], pixels[2])  # weight 1.5 changes the image

    report = json.loads((base / "output" / "ipadapter_kit" / "evaluations" / "host-sweep.json").read_text())
    sweep = report["sweep"]
    assert sweep["weights"] == [0.0, 1.5] and sweep["modes"] == ["scaled", "fused"] and sweep["seeds"] == [3, 4]
    points = {(p["mode"], p["weight"]): p for p in sweep["points"]}
    assert set(points) == {("scaled", 0.0), ("scaled", 1.5), ("fused", 0.0), ("fused", 1.5)}
    zero_s, zero_f = points[("scaled", 0.0)], points[("fused", 0.0)]
    assert zero_s == {**zero_f, "mode": "scaled"}
    for p in points.values():
        assert 0 <= p["preservation"] <= 100 and 0 <= p["prompt_following"] <= 100 and p["diversity"] is not None
    assert report["inputs"]["clip_vision"] is False and report["inputs"]["steps"] == 2
