"""The shapes world, its oracle, the shipped pretrained toy model, and an adapter that learns on it."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ipa_train.errors import IPAKitError
from ipa_train.toy import world
from ipa_train.toy.model import FORMAT, SHIPPED, build_tokenizer, load_components, toy_backbone
from ipa_train.toy.oracle import accuracy, read, read_batch

# The bars are the plan's (README, "The shapes world"): text-only colour >= 90 % and shape >= 70 %; an adapter
# trained with colourless captions shows the reference colour in >= 80 % of samples, and stays near chance
# (1/8) at weight 0. CPU runs are deterministic, so a pass here is a pass on the same torch build.


@pytest.fixture(autouse=True)
def _one_thread():
    """The toy model's operations are too small for a second thread, which only waits when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone():
    return toy_backbone()


def test_world_is_deterministic_and_captions_name_what_is_drawn():
    a = world.random_scenes(16, torch.Generator().manual_seed(3))
    b = world.random_scenes(16, torch.Generator().manual_seed(3))
    assert a == b
    assert torch.equal(world.render(a), world.render(b))
    scene = world.Scene("red", "circle", "grey", 16, 16, 20)
    assert world.caption(scene) == "a red circle on a grey background"
    assert world.caption(scene, colour=False) == "a circle on a grey background"
    assert world.caption(scene, shape=False) == "a red shape on a grey background"
    image = world.render([scene])[0]  # [3, 32, 32]
    assert image.shape == (3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    torch.testing.assert_close(image[:, 16, 16], torch.tensor(world.COLOURS["red"]))
    torch.testing.assert_close(image[:, 0, 0], torch.tensor(world.BACKGROUNDS["grey"]))
    assert len(world.COLOURS) >= 8 and len(world.SHAPES) >= 3
    palette = torch.tensor(list(world.COLOURS.values()))
    distances = torch.cdist(palette, palette) + torch.eye(len(palette)) * 9
    assert distances.min() > 0.3  # colours far apart


def test_oracle_reads_ground_truth_images_right():
    scenes = world.random_scenes(400, torch.Generator().manual_seed(11))
    readings = read_batch(world.render(scenes))
    assert accuracy(readings, [s.colour for s in scenes], "colour") == 1.0
    assert accuracy(readings, [s.shape for s in scenes], "shape") == 1.0
    # Robust to the pixel noise generated samples keep.
    noisy = (world.render(scenes) + 0.08 * torch.randn(400, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    readings = read_batch(noisy)
    assert accuracy(readings, [s.colour for s in scenes], "colour") >= 0.98
    assert accuracy(readings, [s.shape for s in scenes], "shape") >= 0.9


def test_oracle_finds_nothing_on_a_plain_background():
    reading = read(torch.full((3, 32, 32), 0.5))
    assert reading.colour is None and reading.shape is None


def test_dataset_folder_has_colourless_captions(tmp_path):
    from ipa_train.training.data import load_dataset

    scenes = world.write_dataset(tmp_path, 6, colour=False)
    dataset = load_dataset(tmp_path, resolution=32)
    assert len(dataset) == 6
    for i, scene in enumerate(scenes):
        caption = dataset.caption(i)
        assert caption == world.caption(scene, colour=False)
        assert not any(c in caption.split() for c in world.COLOURS)
        assert read(dataset.target(i) * 0.5 + 0.5).colour == scene.colour  # [-1, 1] target of the drawn scene


def test_tokenizer_has_one_token_per_world_word():
    tok = build_tokenizer()
    ids = tok(["a red circle on a grey background"]).input_ids[0]
    assert len(ids) == 7 + 2  # <bos> 7 words <eos>
    assert tok(["a teal circle"]).input_ids[0][2] == tok.unk_token_id


def test_shipped_model_file_is_small_and_self_describing():
    assert SHIPPED.is_file()
    assert SHIPPED.stat().st_size <= 15 * 1024 * 1024
    with safe_open(str(SHIPPED), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT
    assert set(json.loads(meta["configs"])) == {"unet", "vae", "text_encoder", "image_encoder", "scheduler"}
    assert json.loads(meta["info"])["steps"] > 0


def test_missing_or_foreign_model_file_is_one_clear_error(tmp_path):
    with pytest.raises(IPAKitError, match="build_toy_model.py"):
        load_components(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(IPAKitError, match="not a toy shapes model"):
        load_components(tmp_path / "other.safetensors")


def test_backbone_vae_stand_in_is_exact(backbone):
    images = world.render(world.random_scenes(4, torch.Generator().manual_seed(1)))
    p = backbone.get("vae").patch
    latents, std = backbone.encode_latents(images * 2 - 1)
    assert latents.shape == (4, 3 * p * p, 32 // p, 32 // p) and float(std.abs().max()) == 0.0
    torch.testing.assert_close(backbone.decode(latents), images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("patch", [2, 4])
def test_every_patch_size_builds_an_exact_stand_in_and_a_matching_unet(patch):
    from ipa_train.toy.model import build_components, default_configs

    parts = build_components(default_configs(patch))
    images = world.render(world.random_scenes(2, torch.Generator().manual_seed(2))) * 2 - 1
    latents = parts["vae"].encode(images).latent_dist.mean  # [2, 3*p*p, 32/p, 32/p]
    assert latents.shape == (2, 3 * patch * patch, 32 // patch, 32 // patch)
    torch.testing.assert_close(parts["vae"].decode(latents).sample, images, rtol=0, atol=0)
    ehs = torch.zeros(2, 12, parts["unet"].config.cross_attention_dim)
    assert parts["unet"](latents, torch.tensor([5, 500]), ehs).sample.shape == latents.shape
    # `generate` reads the downscale as 2 ** (len(block_out_channels) - 1)
    assert 2 ** (len(parts["vae"].config.block_out_channels) - 1) == patch


def test_unsupported_patch_is_one_clear_error():
    from ipa_train.toy.model import default_configs

    with pytest.raises(IPAKitError, match="patch 3 is not supported"):
        default_configs(3)


def test_shipped_model_draws_the_prompt():
    from ipa_train.toy.pretrain import text_only_accuracy

    acc = text_only_accuracy(load_components(), n=64, seed=99)  # the plan's bars, on 64 samples
    assert acc["colour"] >= 0.9, acc
    assert acc["shape"] >= 0.7, acc


def test_pretraining_is_reproducible(tmp_path):
    from ipa_train.toy.model import build_components
    from ipa_train.toy.pretrain import PretrainConfig, pretrain

    config = PretrainConfig(steps=2, batch_size=4, warmup=1, log_every=1, threads=1, encoder_steps=2,
                            encoder_batch_size=4)
    pretrain(tmp_path / "a.safetensors", config)
    pretrain(tmp_path / "b.safetensors", config)
    # The encoder stage alone, on the first run's UNet, gives the same file as both stages.
    pretrain(tmp_path / "c.safetensors", config, unet_from=tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    a, b, c = (load_file(str(tmp_path / f"{x}.safetensors")) for x in "abc")
    assert set(a) == set(b) == set(c)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], c[k]), k
    fresh = load_components(tmp_path / "a.safetensors")["image_encoder"].state_dict()
    untrained = build_components()["image_encoder"].state_dict()
    assert any(not torch.equal(fresh[k], untrained[k]) for k in fresh)  # the encoder stage did train


def test_unet_from_a_different_layout_is_one_clear_error(tmp_path):
    from ipa_train.toy.pretrain import PretrainConfig, pretrain

    pretrain(tmp_path / "p4.safetensors", PretrainConfig(steps=1, batch_size=2, warmup=1, patch=4, encoder_steps=0))
    with pytest.raises(IPAKitError, match="UNet config differs"):
        pretrain(tmp_path / "p2.safetensors", PretrainConfig(encoder_steps=0), unet_from=tmp_path / "p4.safetensors")


def test_shipped_image_encoder_tells_the_colours_apart():
    """Its `image_embeds` separate the 8 colours and 3 backgrounds (the plain projection reads nothing else)."""
    from ipa_train.toy.encoder import probe_accuracy

    acc = probe_accuracy(load_components()["image_encoder"], n=128)
    assert acc["colour"] >= 0.95 and acc["background"] >= 0.95, acc


@pytest.mark.slow
@pytest.mark.parametrize("projection,steps", [("plus", 800), ("plain", 400)])  # longest first: xdist balances the rest
def test_adapter_learns_the_reference_colour(backbone, tmp_path, projection, steps):
    """Colourless captions: only the reference carries the colour (chance 1/8); weight 0 stays near chance."""
    from ipa_train.toy.experiment import train_world_adapter, transfer_accuracy

    steps = int(os.environ.get("IPAKIT_TOY_STEPS", steps))
    result = train_world_adapter(backbone, tmp_path, projection=projection, steps=steps, save_every=0)
    learned = transfer_accuracy(backbone, result.adapter, n=64)
    baseline = transfer_accuracy(backbone, result.adapter, n=64, weight=0.0)
    assert learned >= 0.8, (learned, baseline)
    assert baseline <= 0.3, (learned, baseline)


def test_demo_writes_grid_samples_and_report(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    from ipa_train.adapter.formats import load_adapter

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "ipa_train", "demo", "--output", str(out), "--steps", "6", "--seeds", "1"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    load_adapter(out / "shapes-colour-ip-adapter.safetensors")
    assert Image.open(out / "grid.png").size[0] > 300 and (out / "loss.png").is_file()
    report = json.loads((out / "report.json").read_text())
    samples = report["samples"]
    assert len(samples) == 8 * 3  # 8 reference colours x (no adapter, scaled, fused) x 1 seed
    for s in samples:
        assert (out / s["file"]).is_file() and (out / s["reference"]).is_file()
        ref = torch.from_numpy(np.array(Image.open(out / s["reference"]).convert("RGB"))).permute(2, 0, 1) / 255
        assert read(ref).colour == s["reference_colour"]
        assert {"prompt", "mode", "weight", "lambda", "seed", "oracle", "reference_shape"} <= set(s)
        assert s["reference_colour"] not in s["prompt"]
    assert {s["weight"] for s in samples if s["column"] == "no adapter"} == {0.0}
    assert set(report["accuracy_reference_colour"]) == {"no adapter", "scaled", "fused"}
    for column, acc in report["accuracy_reference_colour"].items():
        assert f"{column:<11} {acc:6.1%}" in r.stdout


def test_fused_table_reports_every_setting(backbone, tmp_path):
    """The table of the fused-mode benchmark: one row per (weight, lambda), shares in [0, 1], diversity >= 0."""
    from ipa_train.toy.experiment import fused_table, train_world_adapter

    adapter = train_world_adapter(backbone, tmp_path, steps=2, batch_size=2, images=4).adapter
    rows = fused_table(backbone, adapter, lambdas=(1.0, 0.4), weights=(1.0,), pairs=2, seeds=2)
    assert [(r["weight"], r["lambda"]) for r in rows] == [(1.0, 1.0), (1.0, 0.4)]
    for r in rows:
        assert r["samples"] == 4
        assert 0 <= r["prompt_colour"] + r["reference_colour"] <= 1  # prompt and reference colours differ
        assert r["pixel_diversity"] > 0 and r["clip_diversity"] >= 0
