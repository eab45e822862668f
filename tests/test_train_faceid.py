"""FaceID training: face embeddings cached once, faceless images skipped, projection + image K/V + LoRA trained,
the official FaceID layout exported, and an adapter that learned to read the face embedding."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ipa_train import load_adapter  # noqa: E402
from ipa_train.face import FaceAnalyzer, FaceModels  # noqa: E402
from ipa_train.hosts.backbone_diffusers import DiffusersBackbone  # noqa: E402
from ipa_train.toy import world  # noqa: E402
from ipa_train.toy.model import toy_backbone  # noqa: E402
from ipa_train.training.data import load_dataset  # noqa: E402
from ipa_train.training.face_cache import CACHE_NAME  # noqa: E402
from ipa_train.training.faceid import face_dataset  # noqa: E402
from ipa_train.training.train import Conditioning, TrainConfig, train  # noqa: E402
from tests.face_standins import write_pack  # noqa: E402

SIDE = 128  # image files: the stand-in detector needs more than the 32 px the toy model trains at


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return write_pack(tmp_path_factory.mktemp("faces") / "buffalo_l")


def _write_world(folder, n: int, seed: int, blank: bool = False):
    """Shapes-world scenes on black at 128 px with colourless captions: only the face embedding (of the stand-in
    recognizer, linear in the crop's pixels) says the colour."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = world.random_scenes(n, torch.Generator().manual_seed(seed), background="black")
    for i, (scene, image) in enumerate(zip(scenes, world.render(scenes, size=SIDE))):
        world.to_pil(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(world.caption(scene, colour=False))
    if blank:
        Image.fromarray(np.zeros((SIDE, SIDE, 3), np.uint8)).save(folder / "blank.png")
        (folder / "blank.txt").write_text("a square on a black background")
    return folder


def _analyzer(pack) -> FaceAnalyzer:
    # The world's shapes are darker than the stand-in's "faces": a low threshold makes each of them one.
    return FaceAnalyzer(FaceModels(pack, "cpu", det_threshold=0.05))


def _config(tmp_path, **kw) -> TrainConfig:
    base = {"output_dir": str(tmp_path / "run"), "projection": "faceid", "steps": 3, "batch_size": 4, "lr": 1e-3,
            "resolution": 32, "save_every": 0, "log_every": 0, "lora_rank": 4}
    base.update(kw)
    return TrainConfig(**base)


def _held_out_loss(backbone, adapter, batch, faces: torch.Tensor, repeats: int = 6) -> float:
    """Mean v-prediction loss over fixed noise and timesteps, the tokens from `faces` [N, 512]."""
    g = torch.Generator().manual_seed(7)
    total = 0.0
    with torch.no_grad():
        tokens = adapter.project_face(faces)
        for _ in range(repeats):
            noise = torch.randn(batch.latents.shape, generator=g)
            t = torch.randint(100, 900, (batch.latents.shape[0],), generator=g)
            pred = backbone.predict(backbone.add_noise(batch.latents, noise, t), t, batch.text, tokens)
            total += float(torch.nn.functional.mse_loss(pred, backbone.target(batch.latents, noise, t)))
    return total / repeats


def test_faceid_adapter_learns_to_read_the_face(tmp_path, pack):
    """On held-out images the trained adapter denoises better with each image's own face embedding than with
    another image's (a derangement of the same embeddings), and better than it started."""
    torch.set_num_threads(1)
    analyzer = _analyzer(pack)
    train_set = face_dataset(load_dataset(_write_world(tmp_path / "train", 48, 0), resolution=32), analyzer,
                             tmp_path / "run")
    held = face_dataset(load_dataset(_write_world(tmp_path / "held", 16, 1), resolution=32), analyzer,
                        tmp_path / "held_cache")
    assert len(train_set) == 48 and len(held) == 16
    backbone = toy_backbone()
    cfg = _config(tmp_path, steps=240, batch_size=8, lr=2e-3, drop_text=0, drop_image=0, drop_both=0)
    result = train(cfg, backbone, train_set)
    batch = Conditioning(backbone, held, cfg).batch(list(range(len(held))), random.Random(0))
    shuffled = batch.face[torch.roll(torch.arange(len(held)), 5)]
    own = _held_out_loss(backbone, result.adapter, batch, batch.face)
    other = _held_out_loss(backbone, result.adapter, batch, shuffled)
    assert own < 0.9 * other, (own, other)


def _tiny_faces(folder, n: int = 4):
    """Stand-in faces (bright squares on dark noise) with captions, and one image without a face."""
    from tests.face_standins import face_image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(face_image(seed=i)).save(folder / f"face{i}.png")
        (folder / f"face{i}.txt").write_text("a photo of a person")
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(folder / "blank.png")
    (folder / "blank.txt").write_text("nothing")
    return folder


def test_exported_file_has_the_official_layout_and_predicts_the_same_in_diffusers(tmp_path, pack, tiny_model_dirs):
    """The export has exactly the keys of an h94 FaceID SD1.5 file; loaded by diffusers' load_ip_adapter (its FaceID
    projection and processors) with the file's LoRA merged by its diffusers names, it predicts what training saw."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open

    from tests.faceid_factories import FACE_OFFICIAL, face_groups

    dataset = face_dataset(load_dataset(_tiny_faces(tmp_path / "data"), resolution=32), FaceAnalyzer(
        FaceModels(pack, "cpu")), tmp_path / "run")
    backbone = DiffusersBackbone(tiny_model_dirs[0], None, device="cpu")
    result = train(_config(tmp_path, steps=2), backbone, dataset)
    with safe_open(str(result.adapter_path), framework="pt") as f:
        keys = set(f.keys())
    official = next(o for o in FACE_OFFICIAL if o.name == "ip-adapter-faceid_sd15")
    assert keys == {f"{g}.{k}" for g, group in face_groups(official).items() for k in group}
    adapter = load_adapter(result.adapter_path)
    assert (adapter.config.projection, adapter.config.lora_rank, len(adapter.lora)) == ("faceid", 4, 16 * 2 * 4 * 2)
    untrained = {k for k, t in adapter.lora.items() if ".up." in k and not bool(t.abs().max() > 0)}
    # Every LoRA trained but q/k of the mid block's self-attention: at 8x8 latents it sees one token (softmax over one
    # key is 1 whatever q and k are, so they get no gradient).
    assert untrained <= {"30.to_q_lora.up.weight", "30.to_k_lora.up.weight"}, untrained

    theirs = UNet2DConditionModel.from_pretrained(tiny_model_dirs[0], subfolder="unet").eval()
    assert all(torch.equal(v, backbone.unet.state_dict()[k]) for k, v in theirs.state_dict().items())  # UNet frozen
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=theirs, scheduler=None,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.load_ip_adapter(str(result.adapter_path.parent), subfolder="", weight_name=result.adapter_path.name,
                         image_encoder_folder=None)
    # diffusers applies the file's LoRA itself through PEFT (a test dependency), at 1.0 as our training forward
    assert "faceid_0" in getattr(theirs, "peft_config", {}), "diffusers did not load the FaceID LoRA (is peft installed?)"
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, theirs.config.cross_attention_dim, generator=g)
    face = dataset.faces[:2]
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = theirs(noisy, t, text, added_cond_kwargs={"image_embeds": [face[:, None]]}).sample
        from ipa_train.training.backbone import TextCondition

        ours = backbone.predict(noisy, t, TextCondition(text), result.adapter.project_face(face))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_face_cache_is_reused_and_faceless_images_are_named(tmp_path, pack, caplog):
    import logging

    data = load_dataset(_tiny_faces(tmp_path / "data"), resolution=32)
    analyzer = FaceAnalyzer(FaceModels(pack, "cpu"))
    with caplog.at_level(logging.INFO):
        first = face_dataset(data, analyzer, tmp_path / "run")
    assert "blank.png (no face found)" in caplog.text and len(first) == 4
    assert first.describe()["images"] == 4 and any("blank.png" in s for s in first.describe()["skipped_files"])
    stamp = (tmp_path / "run" / CACHE_NAME).stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = face_dataset(data, analyzer, tmp_path / "run")
    assert "read from" in caplog.text and "blank.png (no face found)" in caplog.text
    assert (tmp_path / "run" / CACHE_NAME).stat().st_mtime_ns == stamp and torch.equal(again.faces, first.faces)
    torch.testing.assert_close(first.faces.norm(dim=-1), torch.ones(4))
    plus = face_dataset(data, FaceAnalyzer(analyzer.models, pick="largest"), tmp_path / "run", crop_size=224)
    assert plus.crops.shape == (4, 224, 224, 3) and plus.clip_input(0).shape == (3, 224, 224)
    meta_settings = json.loads(__import__("safetensors").safe_open(str(tmp_path / "run" / CACHE_NAME), "pt").metadata()["settings"])
    assert meta_settings["pick"] == "largest" and meta_settings["crop_size"] == 224  # made again for other settings


def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ipa_train", *args], capture_output=True, text=True, timeout=900)


def test_cli_trains_faceid_and_inspect_reports_it(tmp_path, pack, tiny_model_dirs):
    data = _tiny_faces(tmp_path / "data")
    out = tmp_path / "out"
    run = _cli("train", "--variant", "faceid", "--base-model", str(tiny_model_dirs[0]), "--data", str(data),
               "--face-models", str(pack), "--face-provider", "cpu", "--output", str(out), "--steps", "2",
               "--lora-rank", "4", "--resolution", "32", "--batch-size", "2", "--save-every", "0")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "blank.png (no face found)" in run.stderr
    info = json.loads(_cli("inspect", "--json", str(out / "ip-adapter.safetensors")).stdout)
    assert (info["projection"], info["lora_rank"], info["face_embedding_dim"], info["encoder"], info["num_tokens"]) == \
        ("faceid", 4, 512, "none", 4)
    assert (out / CACHE_NAME).read_bytes()[:1] != b"\x80"  # safetensors, not a pickle


@pytest.mark.parametrize("case", ["no-face", "folder-missing", "no-onnxruntime", "no-face-models"])
def test_cli_faceid_bad_inputs_are_one_line_before_work(tmp_path, pack, tiny_model_dirs, case, capsys, monkeypatch):
    import sys

    from ipa_train import cli

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(data / "blank.png")
    face_models = {"folder-missing": str(tmp_path / "nowhere")}.get(case, str(pack))
    args = ["train", "--projection", "faceid", "--base-model", str(tmp_path / "no-base-model"), "--data", str(data),
            "--output", str(tmp_path / "out"), "--face-provider", "cpu"]
    if case != "no-face-models":
        args += ["--face-models", face_models]
    if case == "no-onnxruntime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    expected = {"no-face": "no face found in any of the 1 images", "folder-missing": "nowhere does not exist",
                "no-onnxruntime": "pip install onnxruntime", "no-face-models": "give --face-models"}[case]
    assert expected in err, err
    assert not (tmp_path / "out" / "ip-adapter.safetensors").exists()


def test_resume_restores_the_lora_and_plusv2_trains_on_the_face_crop(tmp_path, pack, tiny_model_dirs):
    """A FaceID run resumed from its checkpoint ends where the uninterrupted one does (LoRA included); plus v2
    reads the aligned crop through the image encoder and exports as faceid-plusv2."""
    dataset = face_dataset(load_dataset(_tiny_faces(tmp_path / "data"), resolution=32), FaceAnalyzer(
        FaceModels(pack, "cpu")), tmp_path / "cache")
    whole = train(_config(tmp_path / "a", steps=2), DiffusersBackbone(tiny_model_dirs[0], None, device="cpu"), dataset)
    train(_config(tmp_path / "b", steps=1), DiffusersBackbone(tiny_model_dirs[0], None, device="cpu"), dataset)
    resumed = train(_config(tmp_path / "b", steps=2, resume="latest"),
                    DiffusersBackbone(tiny_model_dirs[0], None, device="cpu"), dataset)
    assert whole.adapter.lora.keys() == resumed.adapter.lora.keys()
    for k, t in whole.adapter.lora.items():
        torch.testing.assert_close(resumed.adapter.lora[k], t, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.adapter.state_dict(), whole.adapter.state_dict(), rtol=0, atol=1e-6)

    plus = face_dataset(load_dataset(tmp_path / "data", resolution=32), FaceAnalyzer(FaceModels(pack, "cpu")),
                        tmp_path / "cache", crop_size=224)
    result = train(_config(tmp_path / "c", projection="faceid-plusv2", steps=1),
                   DiffusersBackbone(*tiny_model_dirs, device="cpu"), plus)
    loaded = load_adapter(result.adapter_path)
    assert (loaded.config.projection, loaded.config.encoder, loaded.config.lora_rank) == ("faceid-plusv2", "unknown", 4)
