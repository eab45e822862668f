"""One Flux / SD3.5 training step against plain-PyTorch flow-matching references on tiny random models (fp32 CPU).

Ours: `train`'s own pieces (`Conditioning`, `build_adapter`, `AdapterModel`, `_loss` with the run's schedule) over
`DitBackbone`. Reference, written here: the same noise and sigma draws (logit-normal, SD3 shift 3, Flux's
resolution shift), x_t = (1 - sigma) x0 + sigma noise, target noise - x0, and the diffusers transformer with
diffusers' own IP-Adapter classes loaded by diffusers' own loader from the file our export wrote (XLabs:
`FluxIPAdapterAttnProcessor` + `ImageProjection`; SD3.5: `SD3IPAdapterJointAttnProcessor2_0` +
`IPAdapterTimeImageProjection`), or, for InstantX Flux (no diffusers class), the published processor math on top
of diffusers' `FluxAttnProcessor`. Loss within 1e-5, adapter gradients within 1e-4 relative.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ipa_train.adapter.formats import load_adapter, save_adapter
from ipa_train.hosts.backbone_dit import DitBackbone
from ipa_train.hosts.diffusers_flux import image_ids, pack, unpack
from ipa_train.training.adapters import build_adapter
from ipa_train.training.conditioning import Conditioning
from ipa_train.training.data import load_dataset
from ipa_train.training.dit import resolve_format
from ipa_train.training.engine import Engine
from ipa_train.training.schedules import schedule_for
from ipa_train.training.train import AdapterModel, TrainConfig, _loss

from . import dit_factories
from .dit_train_factories import components
from .test_dit_parity import _reference_instantx_flux

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "ipa_train" / "demo_data"
RES = 32
TOKENS = {"xlabs-flux": 4, "instantx-flux": 8, "instantx-sd3": 16}


def _step(tmp_path: Path, fmt: str, seed: int = 7):
    """Our loss and gradients of one step, the batch, the exported adapter file, and an untouched transformer copy."""
    backbone = DitBackbone(components=components(tmp_path, fmt), device="cpu", max_sequence_length=8,
                           keep_encoders=True)
    reference = copy.deepcopy(backbone.transformer)
    config = resolve_format(TrainConfig(output_dir=str(tmp_path / "out"), format=fmt, resolution=RES,
                                        num_tokens=TOKENS[fmt]), backbone.sizes.family)
    cond = Conditioning(backbone, load_dataset(DEMO, resolution=RES), config)
    torch.manual_seed(0)
    adapter = build_adapter(config, backbone)
    with torch.no_grad():  # away from the zero start, so every K/V path carries signal
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    backbone.attach(adapter)
    batch = cond.batch([0, 3], random.Random(1))
    torch.manual_seed(seed)
    loss = _loss(AdapterModel(adapter, backbone, None), backbone, batch, Engine(config, torch.device("cpu")),
                 schedule_for(backbone, config))
    loss.backward()
    path = save_adapter(adapter, tmp_path / "adapter.safetensors")
    return loss.detach(), adapter, batch, path, reference


def _draws(latents: torch.Tensor, seed: int, shift: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference schedule: noise, then u = sigmoid(N(0, 1)), sigma = s u / (1 + (s - 1) u)."""
    torch.manual_seed(seed)
    noise = torch.randn(latents.shape)
    u = torch.sigmoid(torch.randn(latents.shape[0]))
    if shift is None:  # Flux: mu linear in the image token count, 0.5 at 256 tokens, 1.15 at 4096
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        shift = math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))
    return noise, shift * u / (1 + (shift - 1) * u)


def _flux_reference(transformer, batch, noise, sigma, joint):
    x0 = batch.latents
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    h, w = x0.shape[-2:]
    out = transformer(hidden_states=pack(xt), encoder_hidden_states=batch.text.hidden,
                      pooled_projections=batch.text.extra["pooled"], timestep=sigma, img_ids=image_ids(h, w, "cpu"),
                      txt_ids=torch.zeros(batch.text.hidden.shape[1], 3), guidance=batch.text.extra["guidance"],
                      joint_attention_kwargs=joint, return_dict=False)[0]
    return F.mse_loss(unpack(out, h, w), noise - x0)


def _close_grads(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert theirs.abs().max() > 0
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max() + 1e-7


def test_xlabs_step_matches_diffusers(tmp_path):
    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin

    loss, adapter, batch, path, ref = _step(tmp_path, "xlabs-flux")
    FluxIPAdapterMixin.load_ip_adapter(SimpleNamespace(transformer=ref), str(path.parent), weight_name=path.name)
    noise, sigma = _draws(batch.latents, 7, None)
    ref_loss = _flux_reference(ref, batch, noise, sigma, {"ip_adapter_image_embeds": [batch.clip[:, None]]})
    ref_loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    proj = ref.encoder_hid_proj.image_projection_layers[0]
    _close_grads(adapter.image_proj.proj.weight.grad, proj.image_embeds.weight.grad)
    for j in range(2):
        proc = ref.transformer_blocks[j].attn.processor
        _close_grads(adapter.blocks[j].to_k_ip.weight.grad, proc.to_k_ip[0].weight.grad)
        _close_grads(adapter.blocks[j].to_v_ip.bias.grad, proc.to_v_ip[0].bias.grad)


class _InstantXReference:
    """The published InstantX processor's image branch on top of diffusers' own `FluxAttnProcessor`: double
    blocks add it to the image rows before `to_out` (to_out is linear: to_out(a + ip) = to_out(a) + W ip),
    single blocks to every row of the attention output; q = the QK-normed query before RoPE."""

    def __init__(self, state: dict, j: int):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.base, self.state, self.j = FluxAttnProcessor(), state, j

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ref_embeds=None):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))).transpose(1, 2)
        _, ip = _reference_instantx_flux(ref_embeds, self.state, self.j, q, attn.heads)
        if encoder_hidden_states is None:
            return out + ip
        return out[0] + ip @ attn.to_out[0].weight.T, out[1]


def test_instantx_flux_step_matches_the_published_math(tmp_path):
    from safetensors.torch import load_file

    loss, adapter, batch, path, ref = _step(tmp_path, "instantx-flux")
    flat = {k: v.requires_grad_(True) for k, v in load_file(str(path)).items()}
    state = {"image_proj": {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")},
             "ip_adapter": {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}}
    blocks = list(ref.transformer_blocks) + list(ref.single_transformer_blocks)
    for j, block in enumerate(blocks):
        block.attn.processor = _InstantXReference(state, j)
    noise, sigma = _draws(batch.latents, 7, None)
    ref_loss = _flux_reference(ref, batch, noise, sigma, {"ref_embeds": batch.clip})
    ref_loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    _close_grads(adapter.image_proj.proj[2].weight.grad, flat["image_proj.proj.2.weight"].grad)
    for j in (0, 1, 2, 3):  # double blocks 0, 1; single blocks 0, 1
        _close_grads(adapter.blocks[j].to_k_ip.weight.grad, flat[f"ip_adapter.{j}.to_k_ip.weight"].grad)
        _close_grads(adapter.blocks[j].to_v_ip.weight.grad, flat[f"ip_adapter.{j}.to_v_ip.weight"].grad)


def test_sd3_step_matches_diffusers(tmp_path):
    from diffusers.loaders.ip_adapter import SD3IPAdapterMixin

    loss, adapter, batch, path, ref = _step(tmp_path, "instantx-sd3")
    SD3IPAdapterMixin.load_ip_adapter(SimpleNamespace(transformer=ref), str(path.parent), weight_name=path.name,
                                      image_encoder_folder=None)
    for proc in ref.attn_processors.values():
        proc.scale = 1.0
    noise, sigma = _draws(batch.latents, 7, 3.0)
    x0 = batch.latents
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    out = ref(hidden_states=xt, encoder_hidden_states=batch.text.hidden, pooled_projections=batch.text.extra["pooled"],
              timestep=sigma * 1000, joint_attention_kwargs={"ip_adapter_image_embeds": batch.clip},
              return_dict=False)[0]
    ref_loss = F.mse_loss(out, noise - x0)
    ref_loss.backward()
    assert abs(float(loss) - float(ref_loss)) < 1e-5
    _close_grads(adapter.image_proj.proj_in.weight.grad, ref.image_proj.proj_in.weight.grad)
    for j in range(2):
        proc = ref.transformer_blocks[j].attn.processor
        _close_grads(adapter.blocks[j].to_k_ip.weight.grad, proc.to_k_ip.weight.grad)
        _close_grads(adapter.blocks[j].norm_ip.linear.weight.grad, proc.norm_ip.linear.weight.grad)
        _close_grads(adapter.blocks[j].norm_q.weight.grad, proc.norm_q.weight.grad)


@pytest.mark.parametrize("fmt", ["xlabs-flux", "instantx-flux", "instantx-sd3"])
def test_exported_file_loads_as_the_official_format(tmp_path, fmt):
    _, adapter, _, path, _ = _step(tmp_path, fmt)
    loaded = load_adapter(path)
    assert loaded.config.format == fmt and loaded.config.blocks == adapter.config.blocks
    for (name, ours), theirs in zip(adapter.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(ours, theirs), name


# --------------------------------------------------------------------------------------------------------
# The loop's guarantees on a DiT run: resume bit-equal, NaN stop, fine-tuning, gradient checkpointing


def _run(tmp_path: Path, out: str, fmt: str = "xlabs-flux", **opts):
    from ipa_train.training.train import train

    backbone = DitBackbone(components=components(tmp_path / "models", fmt), device="cpu", max_sequence_length=8)
    config = TrainConfig(**{"output_dir": str(tmp_path / out), "format": fmt, "resolution": RES, "batch_size": 2,
                            "lr": 1e-3, "save_every": 0, "log_every": 0, "num_tokens": TOKENS[fmt], **opts})
    return train(config, backbone, load_dataset(DEMO, resolution=RES))


def test_resume_is_bit_equal(tmp_path):
    opts = {"steps": 4, "warmup_steps": 2, "drop_text": 0.3, "drop_image": 0.3, "drop_both": 0.2, "seed": 3,
            "gradient_accumulation": 2}
    straight = _run(tmp_path, "a", **opts)
    from ipa_train.training.train import train

    backbone = DitBackbone(components=components(tmp_path / "models", "xlabs-flux"), device="cpu", max_sequence_length=8)
    config = TrainConfig(output_dir=str(tmp_path / "b"), format="xlabs-flux", resolution=RES, batch_size=2, lr=1e-3,
                         save_every=0, log_every=0, num_tokens=4, **opts)
    calls = []
    stopped = train(config, backbone, load_dataset(DEMO, resolution=RES), should_stop=lambda: len(calls) >= 2,
                    progress=lambda s, n, loss: calls.append(s))
    assert stopped.stopped and stopped.steps == 2
    resumed = _run(tmp_path, "b", resume="latest", **opts)
    assert resumed.steps == 4 and resumed.losses == straight.losses
    for k, v in straight.adapter.state_dict().items():
        assert torch.equal(resumed.adapter.state_dict()[k], v), k


def test_a_checkpoint_converts_to_the_official_file(tmp_path):
    from ipa_train.adapter.formats import convert_checkpoint

    result = _run(tmp_path, "a", steps=1)
    cfg = convert_checkpoint(result.checkpoints[-1], tmp_path / "converted.safetensors")
    assert cfg.format == "xlabs-flux"
    converted = load_adapter(tmp_path / "converted.safetensors").state_dict()
    assert all(torch.equal(converted[k], v) for k, v in result.adapter.state_dict().items())


def test_nan_stops_with_one_line_and_no_export(tmp_path):
    from ipa_train.training.train import TrainingDiverged

    with pytest.raises(TrainingDiverged) as e:
        _run(tmp_path, "nan", steps=3, lr=1e30)
    assert "training diverged at step" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "nan" / "ip-adapter.safetensors").exists()


def test_fine_tuning_starts_from_the_official_file(tmp_path):
    first = _run(tmp_path, "a", steps=2)
    tuned = _run(tmp_path, "b", steps=1, lr=1e-5, init_adapter=str(first.adapter_path))
    diff = max((tuned.adapter.state_dict()[k] - v).abs().max().item() for k, v in first.adapter.state_dict().items())
    assert 0 < diff < 1e-3  # one small step from the file, not a fresh start


@pytest.mark.parametrize("fmt", ["xlabs-flux", "instantx-sd3"])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, fmt):
    plain = _run(tmp_path, "a", fmt, steps=2)
    checkpointed = _run(tmp_path, "b", fmt, steps=2, gradient_checkpointing=True)
    assert abs(plain.losses[-1] - checkpointed.losses[-1]) < 1e-6
    for k, v in plain.adapter.state_dict().items():
        torch.testing.assert_close(checkpointed.adapter.state_dict()[k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt, state", [
    ("instantx-flux", lambda: dit_factories.instantx_flux(hidden=32, ctx=32, tokens=8, blocks=4, proj_hidden=16)),
    ("instantx-sd3", lambda: dit_factories.instantx_sd3(hidden=128, head_dim=64, tokens=16, blocks=2, dim=128, depth=4,
                                                        temb_in=32)),
])
def test_fine_tuning_from_an_official_pickled_bin(tmp_path, fmt, state):
    """The InstantX files are nested `ip-adapter.bin` pickles (read weights-only); the run keeps the file's own
    projection sizes (MLP width, resampler) and starts from its tensors."""
    official = dit_factories.write(state(), tmp_path / "ip-adapter.bin")
    tuned = _run(tmp_path, "b", fmt, steps=1, lr=1e-5, init_adapter=str(official))
    start = load_adapter(official).state_dict()
    diff = max((tuned.adapter.state_dict()[k] - v).abs().max().item() for k, v in start.items())
    assert 0 < diff < 1e-3
    assert load_adapter(tuned.adapter_path).config.format == fmt


@pytest.mark.parametrize("fmt", ["xlabs-flux", "instantx-flux", "instantx-sd3"])
def test_bf16_run_as_on_a_gpu(tmp_path, monkeypatch, fmt):
    """The GPU plan on CPU: frozen transformer and encoders in bf16, bf16 autocast, adapter and optimizer in fp32.
    The run's losses follow the fp32 run's within bf16's precision, the adapter stays fp32 and finite, and the
    exported file is fp32 and loads."""
    import ipa_train.training.engine as engine
    from ipa_train.training.train import train

    def run(out, dtype, precision):
        backbone = DitBackbone(components=components(tmp_path / "models", fmt), device="cpu", max_sequence_length=8,
                               transformer_dtype=dtype, encoder_dtype=dtype)
        config = TrainConfig(output_dir=str(tmp_path / out), format=fmt, resolution=RES, batch_size=2, lr=1e-3,
                             save_every=0, log_every=0, num_tokens=TOKENS[fmt], steps=3, seed=2,
                             mixed_precision=precision)
        return train(config, backbone, load_dataset(DEMO, resolution=RES))

    full = run("fp32", torch.float32, "no")
    monkeypatch.setattr(engine, "MIXED_PRECISION_DEVICES", ("cuda", "cpu"))
    half = run("bf16", torch.bfloat16, "bf16")
    assert all(math.isfinite(x) for x in half.losses) and half.losses != full.losses  # bf16 did run
    for a, b in zip(half.losses, full.losses):
        assert abs(a - b) <= 0.05 * abs(b) + 1e-3, (half.losses, full.losses)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in half.adapter.parameters())
    moved = max((half.adapter.state_dict()[k] - v).abs().max().item() for k, v in full.adapter.state_dict().items())
    assert moved < 0.05
    again = load_adapter(half.adapter_path)
    assert all(t.dtype == torch.float32 for t in again.state_dict().values())
