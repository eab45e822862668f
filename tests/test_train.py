"""The training loop on a tiny random SD backbone: learning, frozen weights, resume, export, drops, CLI, demo."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ipa_train import load_adapter
from ipa_train.errors import TrainConfigError
from ipa_train.hosts.backbone_diffusers import DiffusersBackbone
from ipa_train.training.data import load_dataset
from ipa_train.training.train import (
    STATE_JSON_FILE,
    Conditioning,
    Engine,
    TrainConfig,
    build_adapter,
    drop_decisions,
    sample_indices,
    set_seed,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "ipa_train" / "demo_data"
RES = 32  # 8x8 latents with the tiny 4x VAE


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DEMO_DATA, resolution=RES)


def _config(tmp_path, **kw) -> TrainConfig:
    base = {"output_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 2, "lr": 1e-3, "resolution": RES,
            "save_every": 0, "log_every": 0}
    base.update(kw)
    return TrainConfig(**base)


def _backbone(dirs, **kw) -> DiffusersBackbone:
    return DiffusersBackbone(dirs[0], dirs[1], device="cpu", **kw)


def test_loss_falls_on_a_tiny_learnable_case(tmp_path, tiny_model_dirs, dataset):
    """Fixed noise and timesteps: the trained adapter predicts the target better than the initial one."""
    cfg = _config(tmp_path, steps=40, lr=3e-3, drop_text=0, drop_image=0, drop_both=0)
    backbone = _backbone(tiny_model_dirs, keep_encoders=True)
    result = train(cfg, backbone, dataset)
    set_seed(cfg.seed)
    initial = build_adapter(cfg, backbone)
    cond = Conditioning(backbone, dataset, cfg)
    g = torch.Generator().manual_seed(123)
    batch = cond.batch(list(range(len(dataset))), random.Random(0))
    noise = torch.randn(batch.latents.shape, generator=g)
    t = torch.randint(100, 900, (len(dataset),), generator=g)

    def eval_loss(adapter) -> float:
        backbone.attach(adapter)
        with torch.no_grad():
            pred = backbone.predict(backbone.add_noise(batch.latents, noise, t), t, batch.text, adapter.project(batch.clip))
        return float(torch.nn.functional.mse_loss(pred, noise))

    before, after = eval_loss(initial), eval_loss(result.adapter)
    assert after < 0.97 * before, (before, after)
    assert len(result.losses) == 40 and all(torch.isfinite(torch.tensor(result.losses)))


def test_only_adapter_and_fusion_weights_change(tmp_path, tiny_model_dirs, dataset):
    backbone = _backbone(tiny_model_dirs, keep_encoders=True)
    for name in ("unet", "vae", "text_encoder", "image_encoder"):
        backbone.get(name)
    frozen_before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in backbone.frozen_modules().items()}
    cfg = _config(tmp_path, steps=3, fusion=True, projection="plus")
    set_seed(cfg.seed)
    initial = {k: v.clone() for k, v in build_adapter(cfg, backbone).state_dict().items()}
    result = train(cfg, backbone, dataset)
    assert set(frozen_before) == {"unet", "vae", "text_encoder", "image_encoder"}
    for name, module in backbone.frozen_modules().items():
        assert all(not p.requires_grad for p in module.parameters()), name
        after = module.state_dict()
        for k, v in frozen_before[name].items():
            assert torch.equal(after[k], v), f"{name}.{k} changed"
    final = result.adapter.state_dict()
    unchanged = [k for k, v in initial.items() if torch.equal(final[k], v)]
    assert unchanged == []  # projection, every layer's image K/V and the fusion weights all trained
    assert any(k.startswith("fusion.") for k in final)


def test_resume_continues_to_the_same_result(tmp_path, tiny_model_dirs, dataset):
    """8 steps straight == 4 steps, stop (cancellation writes a checkpoint), resume for 4 more."""
    opts = {"steps": 8, "projection": "plus", "fusion": True, "gradient_accumulation": 2, "warmup_steps": 3,
            "drop_text": 0.2, "drop_image": 0.2, "drop_both": 0.2, "seed": 7}
    straight = train(_config(tmp_path / "a", **opts), _backbone(tiny_model_dirs), dataset)

    calls = []
    stopped = train(_config(tmp_path / "b", **opts), _backbone(tiny_model_dirs), dataset,
                    should_stop=lambda: len(calls) >= 4, progress=lambda s, n, loss: calls.append((s, n, loss)))
    assert stopped.stopped and stopped.steps == 4 and [c[:2] for c in calls] == [(i, 8) for i in range(1, 5)]
    ckpt = stopped.checkpoints[-1]
    assert ckpt.name == "checkpoint-000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter.safetensors", "training_state.json",
                                                      "training_state.safetensors"]  # no pickle anywhere
    assert not (tmp_path / "b" / "run" / "ip-adapter.safetensors").exists()

    resumed = train(_config(tmp_path / "b", resume="latest", **opts), _backbone(tiny_model_dirs), dataset)
    assert resumed.steps == 8 and not resumed.stopped
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses), rtol=0, atol=1e-6)
    for k, v in straight.adapter.state_dict().items():
        torch.testing.assert_close(resumed.adapter.state_dict()[k], v, rtol=0, atol=1e-6)
    meta = json.loads((resumed.checkpoints[-1] / STATE_JSON_FILE).read_text())
    assert meta["step"] == 8 and meta["config"]["projection"] == "plus"


class _HostInterrupt(Exception):
    """Stands for ComfyUI's InterruptProcessingException, raised from inside a forward pass."""


def test_interrupt_inside_a_step_rolls_back_and_resumes_to_the_same_result(tmp_path, tiny_model_dirs, dataset):
    opts = {"steps": 6, "projection": "plain", "fusion": True, "drop_text": 0.2, "drop_image": 0.2, "drop_both": 0.2,
            "seed": 3}
    straight = train(_config(tmp_path / "a", **opts), _backbone(tiny_model_dirs), dataset)

    backbone = _backbone(tiny_model_dirs)
    predict = backbone.predict
    calls = {"n": 0}

    def flaky_predict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th forward: in the middle of step 4
            raise _HostInterrupt()
        return predict(*args, **kwargs)

    backbone.predict = flaky_predict
    stopped = train(_config(tmp_path / "b", **opts), backbone, dataset, interrupts=(_HostInterrupt,))
    assert stopped.stopped and stopped.steps == 3
    assert stopped.checkpoints[-1].name == "checkpoint-000003"
    resumed = train(_config(tmp_path / "b", resume="latest", **opts), _backbone(tiny_model_dirs), dataset)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses), rtol=0, atol=1e-6)
    for k, v in straight.adapter.state_dict().items():
        torch.testing.assert_close(resumed.adapter.state_dict()[k], v, rtol=0, atol=1e-6)


def test_exported_file_loads_in_diffusers_and_predicts_like_our_loader(tmp_path, tiny_model_dirs, dataset):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ipa_train.hosts.diffusers_unet import install_adapter

    result = train(_config(tmp_path, steps=2, fusion=True), _backbone(tiny_model_dirs), dataset)
    path = result.adapter_path
    assert path == tmp_path / "run" / "ip-adapter.safetensors"
    theirs = UNet2DConditionModel.from_pretrained(tiny_model_dirs[0], subfolder="unet").eval()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=theirs, scheduler=None,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    ours_unet = UNet2DConditionModel.from_pretrained(tiny_model_dirs[0], subfolder="unet").eval()
    adapter = load_adapter(path)
    patch = install_adapter(ours_unet, adapter)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, theirs.config.cross_attention_dim, generator=g)
    embeds = torch.randn(2, adapter.config.clip_embedding_dim, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = theirs(noisy, t, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        ours = ours_unet(noisy, t, patch.encoder_hidden_states(text, clip_embeds=embeds)).sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = ours_unet(noisy, t, patch.encoder_hidden_states(text, clip_embeds=torch.zeros_like(embeds))).sample
    assert not torch.allclose(plain, ours)  # the image branch matters: the comparison is not vacuous


def test_drop_rates_follow_the_reference_draw():
    cfg = TrainConfig(drop_image=0.1, drop_text=0.2, drop_both=0.3)
    draws = [random.Random(5).random() for _ in range(1)]
    rng = random.Random(5)
    out = drop_decisions(2000, cfg, rng)
    replay = random.Random(5)
    for decision in out:
        r = replay.random()
        expected = (True, False) if r < 0.1 else (False, True) if r < 0.3 else (True, True) if r < 0.6 else (False, False)
        assert decision == expected
    assert draws[0] == random.Random(5).random()
    counts = {d: out.count(d) / len(out) for d in set(out)}
    assert abs(counts[(True, False)] - 0.1) < 0.03 and abs(counts[(True, True)] - 0.3) < 0.04


@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_dropped_inputs_are_empty_prompt_and_zero_clip_input(tmp_path, tiny_model_dirs, dataset, projection):
    backbone = _backbone(tiny_model_dirs, keep_encoders=True)
    keep = Conditioning(backbone, dataset, _config(tmp_path, projection=projection, drop_text=0, drop_image=0, drop_both=0))
    both = Conditioning(backbone, dataset, _config(tmp_path, projection=projection, drop_text=0, drop_image=0, drop_both=1))
    b_keep, b_drop = keep.batch([0, 1], random.Random(0)), both.batch([0, 1], random.Random(0))
    empty = backbone.encode_text(["", ""]).hidden
    torch.testing.assert_close(b_drop.text.hidden, empty)
    assert not torch.allclose(b_keep.text.hidden, empty)
    if projection == "plain":
        assert torch.count_nonzero(b_drop.clip) == 0  # zero CLIP embedding
    else:  # the encoding of a zero *normalized* pixel tensor, as the reference drops plus
        zero_pixels = backbone.encode_image(torch.zeros(2, 3, 224, 224), "penultimate")
        torch.testing.assert_close(b_drop.clip, zero_pixels)
        assert torch.count_nonzero(b_drop.clip) > 0
    assert not torch.allclose(b_keep.clip, b_drop.clip)


def test_sample_order_is_a_pure_function_covering_each_epoch():
    first_epoch = [i for m in range(5) for i in sample_indices(10, 2, m, seed=3)]
    assert sorted(first_epoch) == list(range(10))
    assert sample_indices(10, 2, 7, seed=3) == sample_indices(10, 2, 7, seed=3)
    ranks = [sample_indices(10, 1, 0, seed=3, rank=r, world=2)[0] for r in range(2)]
    assert ranks[0] != ranks[1]


def test_v_prediction_target_and_cpu_precision(tmp_path, tiny_model_dirs, caplog):
    from ipa_train.toy.tiny import tiny_scheduler

    backbone = DiffusersBackbone(components={"scheduler": tiny_scheduler("v_prediction")}, device="cpu")
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    torch.testing.assert_close(backbone.target(latents, noise, t), backbone.get("scheduler").get_velocity(latents, noise, t))
    assert not torch.allclose(backbone.target(latents, noise, t), noise)
    engine = Engine(_config(tmp_path, mixed_precision="bf16"), torch.device("cpu"))
    assert engine.precision == "no" and "fp32" in caplog.text


@pytest.mark.parametrize("bad, message", [
    ({"drop_text": 0.5, "drop_image": 0.4, "drop_both": 0.2}, "drop_text \\+ drop_image \\+ drop_both must be <= 1"),
    ({"projection": "full"}, "projection must be one of plain, plus, faceid"),
    ({"resolution": 100}, "multiple of 8"),
    ({"steps": 0}, "steps must be a whole number from 1 to"),
])
def test_config_validation(bad, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**bad)


def test_resume_with_other_options_is_refused(tmp_path, tiny_model_dirs, dataset):
    train(_config(tmp_path, steps=1), _backbone(tiny_model_dirs), dataset)
    with pytest.raises(TrainConfigError, match="resume with the options of the original run"):
        train(_config(tmp_path, steps=2, projection="plus", resume="latest"), _backbone(tiny_model_dirs), dataset)


def test_fine_tune_from_init_adapter(tmp_path, tiny_model_dirs, dataset):
    first = train(_config(tmp_path / "a", steps=2), _backbone(tiny_model_dirs), dataset)
    tuned = train(_config(tmp_path / "b", steps=1, fusion=True, init_adapter=str(first.adapter_path)),
                  _backbone(tiny_model_dirs), dataset)
    assert tuned.adapter.config.fusion and load_adapter(tuned.adapter_path).fusion is not None
    diff = max((tuned.adapter.state_dict()[k] - v).abs().max().item() for k, v in first.adapter.state_dict().items())
    assert 0 < diff < 0.05  # one small step away from the initial file, not a fresh start


def _run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipa_train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_train_cli_end_to_end_with_accelerate(tmp_path, tiny_model_dirs):
    base, encoder = tiny_model_dirs
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(DEMO_DATA.glob("*.jpg"))[:2]:
        Image.open(p).save(data / p.name)
    spec = [{"image_file": p.name, "text": f"photo {i}"} for i, p in enumerate(sorted(data.iterdir()))]
    (tmp_path / "captions.json").write_text(json.dumps(spec))
    r = _run("train", "--base-model", str(base), "--image-encoder", str(encoder), "--data", str(data),
             "--captions-json", str(tmp_path / "captions.json"), "--output", str(tmp_path / "out"), "--name", "mine",
             "--projection", "plus", "--fusion", "--steps", "2", "--batch-size", "1", "--resolution", str(RES),
             "--drop-text", "0.1", "--save-every", "1", "--mixed-precision", "fp16")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "mine.safetensors"
    assert f"wrote {out}" in r.stdout
    adapter = load_adapter(out)
    assert adapter.config.projection == "plus" and adapter.config.fusion
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["checkpoint-000001", "checkpoint-000002"]


def test_train_cli_two_processes_resume_equals_uninterrupted(tmp_path, tiny_model_dirs):
    """Two processes (torchrun, as `accelerate launch` starts them; gloo DDP on CPU): each reads its share of the
    global batch, and a run resumed from a checkpoint ends with the same weights as an uninterrupted one."""
    base, encoder = tiny_model_dirs
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(DEMO_DATA.glob("*.jpg"))[:3]:
        Image.open(p).save(data / p.name)
        (data / p.name).with_suffix(".txt").write_text(p.stem)

    def run(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ipa_train",
               "train", "--base-model", str(base), "--image-encoder", str(encoder), "--data", str(data),
               "--output-dir", str(out), "--steps", str(steps), "--batch-size", "1", "--resolution", str(RES),
               "--save-every", "2", "--seed", "3", "--log-every", "1", *extra]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    whole = run(tmp_path / "whole", 4)
    assert "4 steps of 1 x 2 sample(s)" in whole.stderr  # the global batch spans both processes
    assert whole.stderr.count("step 4/4") == 1  # only the main process logs progress
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, "--resume", str(tmp_path / "split" / "checkpoints" / "checkpoint-000002"))
    a = load_adapter(tmp_path / "whole" / "ip-adapter.safetensors").state_dict()
    b = load_adapter(tmp_path / "split" / "ip-adapter.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli_missing_data_is_one_line_error(tmp_path, tiny_model_dirs):
    r = _run("train", "--base-model", str(tiny_model_dirs[0]), "--image-encoder", str(tiny_model_dirs[1]),
             "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nowhere" in r.stderr and "does not exist" in r.stderr


def test_convert_cli_on_reference_accelerate_checkpoint(tmp_path):
    """`accelerate.save_state` of the reference script: the whole prepared module in pytorch_model.bin."""
    from .factories import adapter_for_unet, tiny_unet

    unet = tiny_unet("sd15")
    adapter = adapter_for_unet(unet, "plain")
    ckpt = tmp_path / "checkpoint-2000"
    ckpt.mkdir()
    raw = {f"unet.{k}": v for k, v in list(unet.state_dict().items())[:4]}
    for k, v in adapter.state_dict().items():
        group, rest = k.split(".", 1)
        raw[f"{'image_proj_model' if group == 'image_proj' else 'adapter_modules'}.{rest}"] = v.clone()
    torch.save(raw, ckpt / "pytorch_model.bin")
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.bin")
    (ckpt / "random_states_0.pkl").write_bytes(b"not read")
    r = _run("convert", str(ckpt), str(tmp_path / "ip_adapter.safetensors"))
    assert r.returncode == 0, r.stderr
    back = load_adapter(tmp_path / "ip_adapter.safetensors").state_dict()
    assert set(back) == set(adapter.state_dict())
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


def test_demo_command_end_to_end(tmp_path):
    r = _run("demo", "--random-backbone", "--output", str(tmp_path / "demo"), "--steps", "12", "--sample-steps", "3")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "demo"
    adapter = load_adapter(out / "demo-ip-adapter.safetensors")
    assert adapter.fusion is not None
    assert Image.open(out / "loss.png").size == (640, 360)
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["astronaut_fused.png", "astronaut_scaled.png", "chelsea_fused.png", "chelsea_scaled.png"]
    scaled = torch.tensor(list(Image.open(out / "samples" / "chelsea_scaled.png").tobytes()), dtype=torch.float32)
    fused = torch.tensor(list(Image.open(out / "samples" / "chelsea_fused.png").tobytes()), dtype=torch.float32)
    assert not torch.equal(scaled, fused)  # the two modes really differ
    assert "RANDOMLY INITIALISED" in r.stderr and "not image quality" in r.stdout
    assert "python -m ipa_train train --base-model" in r.stdout
