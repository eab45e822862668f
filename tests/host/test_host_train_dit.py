"""Flux and SD3.5 training inside ComfyUI (in-process, CPU): the node's training step equals the command line's.

Tiny random Flux and SD3 models in ComfyUI's own classes carry the same weights as diffusers' transformers
(`dit_models`). On one batch, noise and sigmas, the training step of `ComfyDitBackbone` (the node's: ComfyUI's
Flux / MMDiT forward with our `dit` block patches in training mode) and of the command line's diffusers backbone
give the same loss and the same adapter gradients, for every format. Then IPAKitTrain trains a tiny Flux end to
end (text, image and latents from stand-in encoders, a validation sample through our own apply) and the file it
writes loads in our loader.
"""

from __future__ import annotations

import copy
import importlib
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ipa_train.adapter.dit_formats import detect_dit_config
from ipa_train.adapter.dit_modules import build_dit_adapter

from .. import dit_factories as fac
from .dit_models import FLUX, SD3, tiny_flux, tiny_sd3
from .test_host_train_memory import ENCODERS, StandInVae, _patcher, check_order, record
from .test_host_train_memory import _clip_vision as clip_vision_model

ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = ROOT / "ipa_train" / "demo_data"
CASES = {  # format -> (family, encoder output shape of one image)
    "xlabs-flux": ("flux", (768,)),
    "instantx-flux": ("flux", (1152,)),
    "instantx-sd3": ("sd3", (12, 1152)),
}


@pytest.fixture(scope="module")
def models(comfy):
    return {"flux": tiny_flux(comfy, seed=2), "sd3": tiny_sd3(comfy, seed=2)}


def _clip_vision(comfy, tmp_path, siglip: bool):
    """A tiny ComfyUI ClipVisionModel: ViT-L-like (projection 768) or SigLIP-like (width 1152, no projection,
    384 px, mean/std 0.5)."""
    if not siglip:
        return clip_vision_model(comfy, tmp_path, {
            "model_type": "clip_vision_model", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
            "intermediate_size": 64, "hidden_act": "gelu", "num_channels": 3, "patch_size": 32, "image_size": 224,
            "projection_dim": 768})
    return clip_vision_model(comfy, tmp_path, {
        "model_type": "siglip_vision_model", "num_hidden_layers": 2, "hidden_size": 1152, "num_attention_heads": 16,
        "intermediate_size": 64, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3, "patch_size": 96,
        "image_size": 384, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})


class StandInDitClip:
    """The loaded CLIP as DiT training calls it: tokenize, encode_from_tokens(return_pooled=True) ->
    ([1, S, context], [1, pooled]); S fixed, as ComfyUI's T5 padding makes it."""

    def __init__(self, comfy, context: int, pooled: int, length: int = 7):
        self.mm = comfy.model_management
        self.context, self.length = context, length
        self.module = torch.nn.Embedding(256, context + pooled)
        self.patcher = _patcher(comfy, self.module)

    def tokenize(self, text):
        return torch.tensor([min(ord(c), 255) for c in text[:self.length].ljust(self.length)])

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.mm.load_model_gpu(self.patcher)
        out = self.module(tokens)[None]
        return out[..., :self.context], out[:, -1, self.context:]


class StandInDitVae(StandInVae):
    """A 16-channel VAE as training and validation call it: encode(IMAGE) -> [B, 16, H/8, W/8], decode back."""

    def __init__(self, comfy):
        super().__init__(comfy, channels=16)

    def decode(self, latent):
        return torch.nn.functional.interpolate(latent[:, :3], scale_factor=8).movedim(1, -1).sigmoid()


def _adapter(fmt: str):
    if fmt == "xlabs-flux":
        state = fac.xlabs_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=4, blocks=FLUX["depth"], seed=4)
    elif fmt == "instantx-flux":
        state = fac.instantx_flux(hidden=FLUX["hidden"], ctx=FLUX["context"], tokens=8,
                                  blocks=FLUX["depth"] + FLUX["single"], seed=4)
    else:
        state = fac.instantx_sd3(hidden=SD3["hidden"], head_dim=SD3["hidden"] // SD3["heads"], tokens=16,
                                 blocks=SD3["depth"], dim=128, depth=4, temb_in=32, seed=4)
    flat = fac.flat(state)
    return build_dit_adapter(detect_dit_config(flat, "t"), flat, "t").float()


def _batch(family: str, clip_shape: tuple[int, ...]):
    from ipa_train.training.train import Batch, TextCondition

    sizes = FLUX if family == "flux" else SD3
    g = torch.Generator().manual_seed(3)
    extra = {"pooled": torch.randn(2, sizes["pooled"], generator=g)}
    if family == "flux":
        extra["guidance"] = torch.full((2,), 1.0)
    text = TextCondition(torch.randn(2, 6, sizes["context"], generator=g), extra)
    return Batch(torch.randn(2, 16, 8, 8, generator=g), text, torch.randn(2, *clip_shape, generator=g))


def _step(backbone, adapter, batch, schedule, seed: int = 7):
    """The training step (`ipa_train.training.train._loss` + backward) -> (loss, {parameter: gradient})."""
    from ipa_train.training.config import TrainConfig
    from ipa_train.training.engine import Engine
    from ipa_train.training.train import AdapterModel, _loss

    adapter = copy.deepcopy(adapter).train()
    backbone.attach(adapter)
    model = AdapterModel(adapter, backbone, None)
    torch.manual_seed(seed)  # the step's noise and sigmas
    with torch.enable_grad():
        loss = _loss(model, backbone, batch, Engine(TrainConfig(output_dir="unused"), torch.device("cpu"), None),
                     schedule)
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fmt", list(CASES))
def test_node_step_equals_the_command_line_step(comfy, kit, models, tmp_path, fmt):
    from ipa_train.hosts.backbone_dit import DitBackbone

    family, clip_shape = CASES[fmt]
    ref, patcher = models[family]
    nodes = importlib.import_module(kit.__name__ + ".nodes.train_dit")
    sizes = FLUX if family == "flux" else SD3
    node = nodes.ComfyDitBackbone(patcher, StandInDitClip(comfy, sizes["context"], sizes["pooled"]),
                                  StandInDitVae(comfy), _clip_vision(comfy, tmp_path, siglip=fmt != "xlabs-flux"))
    cli = DitBackbone(device="cpu", components={"transformer": ref})
    assert node.schedule == cli.schedule  # the family's sigma sampling and shift, read from each side's model
    assert (node.sizes.family, node.sizes.double_blocks, node.sizes.single_blocks, node.sizes.head_dim) == \
        (cli.sizes.family, cli.sizes.double_blocks, cli.sizes.single_blocks, cli.sizes.head_dim)
    assert node.sizes.cross_attention_dim == cli.sizes.cross_attention_dim
    assert node.guidance_input == cli.guidance_input == (family == "flux")
    adapter = _adapter(fmt)
    batch = _batch(family, clip_shape)
    loss_node, grads_node = _step(node, adapter, batch, cli.schedule)
    loss_cli, grads_cli = _step(cli, adapter, batch, cli.schedule)
    assert abs(loss_node - loss_cli) <= 1e-5 * max(1.0, abs(loss_cli)), (loss_node, loss_cli)
    assert grads_node.keys() == grads_cli.keys() == {n for n, _ in adapter.named_parameters()}
    for name, g in grads_cli.items():
        torch.testing.assert_close(grads_node[name], g, atol=1e-5, rtol=1e-5, msg=name)
    assert max(float(g.abs().max()) for g in grads_cli.values()) > 1e-4  # the gradients are not all zero
    if family == "flux":  # Flux dev's guidance input reaches both the same way
        batch.text.extra["guidance"] = torch.full((2,), 3.5)
        moved_node, moved_cli = _step(node, adapter, batch, cli.schedule)[0], _step(cli, adapter, batch, cli.schedule)[0]
        assert moved_node != loss_node and abs(moved_node - moved_cli) <= 1e-5 * max(1.0, abs(moved_cli))


@pytest.mark.parametrize("fmt", list(CASES))
def test_gradient_checkpointing_gives_the_same_step(comfy, kit, models, tmp_path, monkeypatch, fmt):
    """The same loss and gradients bit for bit; every block runs a second time in the backward pass."""
    from ipa_train.hosts.comfy import dit_train

    calls = []
    for name in ("run_double", "run_single", "run_joint"):
        real = getattr(dit_train, name)
        monkeypatch.setattr(dit_train, name, lambda *a, real=real: calls.append(1) or real(*a))
    family, clip_shape = CASES[fmt]
    _, patcher = models[family]
    sizes = FLUX if family == "flux" else SD3
    nodes = importlib.import_module(kit.__name__ + ".nodes.train_dit")
    node = nodes.ComfyDitBackbone(patcher, StandInDitClip(comfy, sizes["context"], sizes["pooled"]),
                                  StandInDitVae(comfy), _clip_vision(comfy, tmp_path, siglip=fmt != "xlabs-flux"))
    adapter, batch = _adapter(fmt), _batch(family, clip_shape)
    plain = _step(node, adapter, batch, node.schedule)
    blocks = len(calls)
    assert blocks == len(node.patches)
    node.enable_gradient_checkpointing()  # every block of the next attach recomputed in the backward pass
    checkpointed = _step(node, adapter, batch, node.schedule)
    assert all(p.use_checkpoint for p in node.patches.values()) and len(calls) == blocks + 2 * blocks
    assert plain[0] == checkpointed[0]
    for name, g in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], g, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("fmt", ["xlabs-flux", "instantx-sd3"])
def test_node_unloads_the_encoders_before_the_transformer(comfy, kit, models, tmp_path, monkeypatch, fmt):
    """With every embedding cached, the transformer loads once, after the CLIP, VAE and CLIP vision ran and were
    unloaded, and alone in memory at every step; nothing but the user's models loads and the transformer's
    weights are the user's, uncopied."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    family = CASES[fmt][0]
    patcher = models[family][1]
    sizes = FLUX if family == "flux" else SD3
    user = {"model": patcher, "clip": StandInDitClip(comfy, sizes["context"], sizes["pooled"]),
            "vae": StandInDitVae(comfy), "clip_vision": _clip_vision(comfy, tmp_path, siglip=fmt != "xlabs-flux")}
    nodes = importlib.import_module(kit.__name__ + ".nodes.train_dit")
    recorder = record(comfy, monkeypatch, user, nodes.ComfyDitBackbone, "transformer")
    dm = patcher.model.diffusion_model
    weights = {id(p): p.data_ptr() for p in dm.parameters()}
    train_mod = importlib.import_module(kit.__name__ + ".nodes.train")
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    try:
        with torch.inference_mode():  # as ComfyUI runs a node
            out = train_mod.train_in_comfy(patcher, user["clip"], user["vae"], user["clip_vision"], dataset, "plain",
                                           False, 2, 1, 1e-4, 64, 0.05, 0.05, 0.05, 0, 0, f"order-{fmt}")
    finally:
        comfy.model_management.unload_all_models()
    assert out.args[0].config.format == fmt and Path(out.args[1]).is_file()
    check_order(recorder.events, "transformer")
    requested = {n for kind, names, _ in recorder.events if kind == "load" for n in names}
    assert requested <= {"transformer", *ENCODERS}, requested
    assert {id(p): p.data_ptr() for p in dm.parameters()} == weights


def _siglip_head_file(folder: Path) -> None:
    """A SigLIP file holding only the attention-pooling head (`vision_model.head.*`, width 1152, MLP 64)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = {"probe": (1, 1, 1152), "attention.in_proj_weight": (3456, 1152), "attention.in_proj_bias": (3456,),
              "attention.out_proj.weight": (1152, 1152), "attention.out_proj.bias": (1152,),
              "layernorm.weight": (1152,), "layernorm.bias": (1152,), "mlp.fc1.weight": (64, 1152),
              "mlp.fc1.bias": (64,), "mlp.fc2.weight": (1152, 64), "mlp.fc2.bias": (1152,)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"vision_model.head.{k}": torch.randn(s, generator=g) * 0.03 for k, s in shapes.items()},
              str(folder / "siglip-so400m.safetensors"))


@pytest.mark.parametrize("fmt", list(CASES))
def test_node_trains_end_to_end(comfy, kit, models, tmp_path, monkeypatch, fmt):
    """IPAKitTrain end to end on the tiny models, format auto: xlabs-flux for Flux with a ViT-L encoder,
    instantx-flux with SigLIP (pooled by the head file in models/clip_vision), instantx-sd3 for SD3; a validation
    sample runs through our own encode + apply; the written file is the official layout and loads in our loader."""
    import folder_paths
    from safetensors import safe_open

    from ipa_train.adapter.formats import load_adapter

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    heads = tmp_path / "clip_vision"
    _siglip_head_file(heads)
    monkeypatch.setattr(folder_paths, "get_full_path", lambda kind, name: str(heads / name))
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda kind: sorted(p.name for p in heads.iterdir()))
    family = CASES[fmt][0]
    _, patcher = models[family]
    sizes = FLUX if family == "flux" else SD3
    train_mod = importlib.import_module(kit.__name__ + ".nodes.train")
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    out = train_mod.train_in_comfy(patcher, StandInDitClip(comfy, sizes["context"], sizes["pooled"]),
                                   StandInDitVae(comfy), _clip_vision(comfy, tmp_path, siglip=fmt != "xlabs-flux"), dataset,
                                   "plain", False, 2, 2, 1e-3, 64, 0.05, 0.05, 0.05, 0, 0, f"{fmt}-run",
                                   validate_every=2, validation_prompt="a photo",
                                   validation_image=torch.rand(1, 64, 64, 3))
    adapter, path, curve, validation = out.args
    assert adapter.config.format == fmt and Path(path).is_file()
    assert Path(path).parent.name == "ipadapter_kit" and validation.shape == (1, 64, 64, 3)
    assert bool(torch.isfinite(validation).all()) and bool((validation != 0).any())
    loaded = load_adapter(path)
    assert loaded.config.format == fmt
    assert loaded.config.blocks == sizes["depth"] + (FLUX["single"] if fmt == "instantx-flux" else 0)
    for (name, a), (_, b) in zip(sorted(adapter.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), name
    with safe_open(path, "pt") as f:  # the official keys, as diffusers and the peer packs read them
        keys = set(f.keys())
    expect = {"xlabs-flux": ["ip_adapter_proj_model.proj.weight",
                             "double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"],
              "instantx-flux": ["image_proj.proj.2.weight", f"ip_adapter.{sizes['depth'] + 1}.to_k_ip.weight"],
              "instantx-sd3": ["image_proj.latents", "ip_adapter.0.norm_ip.linear.weight"]}[fmt]
    assert set(expect) <= keys


def test_node_fine_tunes_an_official_sd3_adapter(comfy, kit, models, tmp_path, monkeypatch):
    """An adapter connected to IPAKitTrain is the start (format auto takes it): one step at a tiny learning rate
    leaves its weights (16 tokens, not the layout's default 64) almost as they were."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    train_mod = importlib.import_module(kit.__name__ + ".nodes.train")
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    start = _adapter("instantx-sd3")
    out = train_mod.train_in_comfy(models["sd3"][1], StandInDitClip(comfy, SD3["context"], SD3["pooled"]),
                                   StandInDitVae(comfy), _clip_vision(comfy, tmp_path, siglip=True), dataset, "plain",
                                   False, 1, 1, 1e-7, 64, 0, 0, 0, 0, 0, "fine-tune", adapter=start)
    tuned = out.args[0]
    assert tuned.config.format == "instantx-sd3" and tuned.config.num_tokens == 16
    before, after = start.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-5
    assert any(not torch.equal(after[k], before[k]) for k in before)  # it did train


def test_cancel_then_queue_again_resumes_a_flux_run(comfy, kit, models, tmp_path, monkeypatch, caplog):
    """Cancel (ComfyUI's interrupt flag) after the first step writes a checkpoint and stops; queueing the same name
    again resumes from it and finishes the remaining step, the losses of both runs in one history."""
    import comfy.model_management as mm
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    train_mod = importlib.import_module(kit.__name__ + ".nodes.train")
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    args = (models["flux"][1], StandInDitClip(comfy, FLUX["context"], FLUX["pooled"]), StandInDitVae(comfy),
            _clip_vision(comfy, tmp_path, siglip=False), dataset, "plain", False, 2, 1, 1e-3, 64, 0, 0, 0, 0, 0, "resume")
    polls = []
    monkeypatch.setattr(mm, "processing_interrupted", lambda: polls.append(1) or len(polls) > 1)
    with pytest.raises(mm.InterruptProcessingException):
        train_mod.train_in_comfy(*args)
    checkpoints = tmp_path / "output" / train_mod.RUNS_SUBDIR / "resume" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-000001"]
    monkeypatch.setattr(mm, "processing_interrupted", lambda: False)
    with caplog.at_level(logging.INFO):
        out = train_mod.train_in_comfy(*args)
    assert "resuming resume from its last checkpoint" in caplog.text
    assert any("resumed" in r.getMessage() and "step 1" in r.getMessage() for r in caplog.records), caplog.text
    assert out.args[0].config.format == "xlabs-flux" and "2 steps" in out.ui["text"][0]


def test_bad_combinations_are_one_line_before_work(comfy, kit, models, tmp_path, monkeypatch):
    import folder_paths

    from ipa_train.errors import IPAKitError

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    train_mod = importlib.import_module(kit.__name__ + ".nodes.train")
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    vit = _clip_vision(comfy, tmp_path, siglip=False)
    clip = StandInDitClip(comfy, FLUX["context"], FLUX["pooled"])
    cases = [
        (models["flux"][1], vit, dict(format="instantx-sd3"), "format instantx-sd3 is a SD3.5 layout, but the MODEL is Flux"),
        (models["sd3"][1], vit, dict(format="auto"), "format instantx-sd3 reads SigLIP"),
        (models["flux"][1], vit, dict(format="instantx-flux"), "format instantx-flux reads SigLIP"),
        (models["flux"][1], vit, dict(format="xlabs-flux", projection="plus"), "projection plus"),
        (models["flux"][1], vit, dict(adapter=_adapter("instantx-sd3")), "instantx-sd3 is a SD3.5 layout, but the MODEL is Flux"),
        (models["flux"][1], vit, dict(adapter=SimpleNamespace(config=SimpleNamespace(variant="plain"))),
         "the adapter to fine-tune is a UNet \\(plain\\) adapter, but the MODEL is Flux"),
    ]
    chroma = SimpleNamespace(params=SimpleNamespace(global_modulation=True), double_blocks=[SimpleNamespace()],
                             single_blocks=[])
    medium = SimpleNamespace(joint_blocks=[SimpleNamespace(x_block=SimpleNamespace(x_block_self_attn=True))])
    for dm, message in ((chroma, "Flux.2 / Chroma"), (medium, "SD3.5 Medium")):
        cases.append((SimpleNamespace(get_model_object=lambda name, dm=dm: dm), vit, {}, message))
    for model, cv, options, message in cases:
        projection = options.pop("projection", "plain")
        with pytest.raises(IPAKitError, match=message) as e:
            train_mod.train_in_comfy(model, clip, StandInDitVae(comfy), cv, dataset, projection, False, 1, 1, 1e-4, 64,
                                     0, 0, 0, 0, 0, "bad-run", **options)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "output").exists()  # refused before anything was written


class TokenizingClip:
    """ComfyUI's own Flux / SD3 tokenizer, and an encoder whose output is as long as ComfyUI's text encoder would
    make it (SD3: 77 per CLIP chunk, then T5; Flux: T5), so captions of any length are measured for real."""

    def __init__(self, tokenizer, family: str):
        self.tokenizer, self.family = tokenizer, family

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)

    def encode_from_tokens(self, tokens, return_pooled=False):
        t5 = sum(len(chunk) for chunk in tokens["t5xxl"])
        clip = 77 * len(tokens["l"]) if self.family == "sd3" else 0
        return torch.zeros(1, clip + t5, 8), torch.zeros(1, 4)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_captions_of_any_length_batch_together(comfy, kit, models, tmp_path, family):
    """Every caption (the empty one too) encodes to ComfyUI's own padded length, long ones cut there, so cached
    text conditions of different captions stack in one batch."""
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    nodes = importlib.import_module(kit.__name__ + ".nodes.train_dit")
    tokenizer = (comfy.text_encoders.flux.FluxTokenizer() if family == "flux"
                 else comfy.text_encoders.sd3_clip.SD3Tokenizer())
    node = nodes.ComfyDitBackbone(models[family][1], TokenizingClip(tokenizer, family), StandInDitVae(comfy),
                                  _clip_vision(comfy, tmp_path, siglip=True))
    long = " ".join(["a very long caption about a red bicycle leaning on a wall"] * 40)
    text = node.encode_text(["a cat", long, ""])
    assert text.hidden.shape[:2] == (3, 256 if family == "flux" else 77 + 77)
    assert text.extra["pooled"].shape == (3, 4)


@pytest.mark.parametrize("fmt", ["xlabs-flux", "instantx-flux"])
def test_node_trains_on_a_bf16_flux(comfy, kit, tmp_path, monkeypatch, fmt):
    """A Flux loaded in bf16 (as GPUs run it; CPU here, so without autocast): the frozen transformer computes in
    bf16, the adapter trains in fp32, finite, in the direction the same run on the fp32 model takes (cosine of the
    updates 0.99 measured), and the file is the fp32 official layout."""
    import folder_paths

    from ipa_train.adapter.formats import load_adapter

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    heads = tmp_path / "clip_vision"
    _siglip_head_file(heads)
    monkeypatch.setattr(folder_paths, "get_full_path", lambda kind, name: str(heads / name))
    monkeypatch.setattr(folder_paths, "get_filename_list", lambda kind: sorted(p.name for p in heads.iterdir()))
    train_mod = importlib.import_module(kit.__name__ + ".nodes.train")
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    runs = {}
    torch.manual_seed(0)  # one set of stand-in encoders (random weights) for both runs
    encoders = (StandInDitClip(comfy, FLUX["context"], FLUX["pooled"]), StandInDitVae(comfy),
                _clip_vision(comfy, tmp_path, siglip=fmt != "xlabs-flux"))
    for dtype in (torch.float32, torch.bfloat16):
        _, patcher = tiny_flux(comfy, seed=2, dtype=dtype)
        assert patcher.model.diffusion_model.img_in.weight.dtype == dtype
        out = train_mod.train_in_comfy(patcher, *encoders, dataset, "plain", False, 3, 2, 1e-3, 64, 0.0, 0.0, 0.0, 0,
                                       3, f"{fmt}-{str(dtype)[6:]}")
        runs[dtype] = out.args
    (full, _, _, _), (half, path, _, _) = runs[torch.float32], runs[torch.bfloat16]
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in half.parameters())
    # The image values start at zero, so after training they are the run's whole update: bf16's is non-zero and
    # points where the fp32 run's does (Adam's near-sign steps make elementwise gaps the wrong measure).
    values = [k for k in full.state_dict() if "v_proj" in k or "to_v_ip" in k]
    h, f = (torch.cat([a.state_dict()[k].flatten() for k in values]) for a in (half, full))
    cosine = torch.nn.functional.cosine_similarity(h, f, dim=0).item()
    assert h.abs().max() > 1e-4 and cosine > 0.9, (h.abs().max().item(), cosine)
    loaded = load_adapter(path)
    assert loaded.config.format == fmt and all(t.dtype == torch.float32 for t in loaded.state_dict().values())
