"""SDXL training inside ComfyUI (in-process, CPU): the node's training step equals the command line's.

One tiny SDXL-layout UNet (70 cross-attention layers, SDXL's block ids, pooled text + size/crop `time_ids`
conditioning, 256-wide time embeddings as ComfyUI's SDXL hard-codes) is built with diffusers, and the same
weights are loaded into ComfyUI's SDXL model class through ComfyUI's own diffusers -> ComfyUI key map. On one
batch, noise and timesteps, the training step of `ComfyBackbone` (the node's: ComfyUI's UNet, our attn2 patch,
`y` from the model's own `encode_adm`) and of `DiffusersBackbone` (the command line's: diffusers' UNet with
`added_cond_kwargs`, our diffusers processors) give the same loss and the same adapter gradients.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import torch

from tests.factories import adapter_for_unet

from .test_host_train_memory import StandInVae, _clip_vision, _patcher

ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = ROOT / "ipa_train" / "demo_data"
CONTEXT = 64  # text width: both encoders' hidden states side by side
POOLED = 32  # pooled text width
TIME_DIM = 256  # ComfyUI's SDXL embeds each of the six sizes in 256 channels


def _diffusers_sdxl(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=CONTEXT, attention_head_dim=(2, 4, 8),
        norm_num_groups=32, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
    ).eval()


def _comfy_sdxl(comfy, unet):
    """ComfyUI's SDXL model (EPS) with the diffusers UNet's weights, converted by comfy.utils.unet_to_diffusers."""
    import comfy.model_base
    import comfy.supported_models
    import comfy.utils

    cfg = dict(use_checkpoint=False, image_size=32, out_channels=4, in_channels=4, model_channels=32,
               use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
               num_classes="sequential", adm_in_channels=POOLED + 6 * TIME_DIM, num_res_blocks=[2, 2, 2],
               transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
               use_linear_in_transformer=True, context_dim=CONTEXT, num_head_channels=16,
               transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])
    config = comfy.supported_models.SDXL(cfg)
    config.unet_config["num_head_channels"] = 16  # the class's extra config sets 64: keep several heads per layer
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.SDXL(config, device=torch.device("cpu"))
    key_map = comfy.utils.unet_to_diffusers(config.unet_config)
    source = unet.state_dict()
    assert set(source) <= set(key_map), sorted(set(source) - set(key_map))[:8]  # the map also lists optional keys
    model.diffusion_model.load_state_dict({key_map[k]: v for k, v in source.items()}, strict=True)
    return _patcher(comfy, model)


class StandInSdxlClip:
    """CLIP as SDXL training calls it: encode_from_tokens(return_pooled=True) -> [1, 77, CONTEXT], [1, POOLED]."""

    def __init__(self, comfy):
        self.mm = comfy.model_management
        self.module = torch.nn.Embedding(256, CONTEXT + POOLED)
        self.patcher = _patcher(comfy, self.module)

    def tokenize(self, text):
        return torch.tensor([min(ord(c), 255) for c in text[:77].ljust(77)])

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.mm.load_model_gpu(self.patcher)
        out = self.module(tokens)[None]  # [1, 77, CONTEXT + POOLED]
        cond = out[..., :CONTEXT]
        return (cond, out[:, -1, CONTEXT:]) if return_pooled else cond


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    unet = _diffusers_sdxl()
    return unet, _comfy_sdxl(comfy, unet), _clip_vision(comfy, tmp_path_factory.mktemp("clip_vision"))


def _batch(clip_dim: int):
    from ipa_train.training.train import Batch, TextCondition

    g = torch.Generator().manual_seed(3)
    time_ids = torch.tensor([[96.0, 64.0, 0.0, 16.0, 64.0, 64.0], [64.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
    text = TextCondition(torch.randn(2, 77, CONTEXT, generator=g),
                         {"text_embeds": torch.randn(2, POOLED, generator=g), "time_ids": time_ids})
    return Batch(torch.randn(2, 4, 8, 8, generator=g), text, torch.randn(2, clip_dim, generator=g))


def _step(backbone, adapter, batch, seed: int = 7):
    """The training step (`ipa_train.training.train._loss` + backward) -> (loss, {parameter: gradient})."""
    from ipa_train.training.config import TrainConfig
    from ipa_train.training.engine import Engine
    from ipa_train.training.train import AdapterModel, _loss

    adapter = copy.deepcopy(adapter).train()
    backbone.attach(adapter)
    model = AdapterModel(adapter, backbone, None)
    torch.manual_seed(seed)  # the step's noise and timesteps
    with torch.enable_grad():
        loss = _loss(model, backbone, batch, Engine(TrainConfig(output_dir="unused"), torch.device("cpu"), None))
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("projection", ["plain", "plus"])
def test_node_step_equals_the_command_line_step_on_sdxl(comfy, kit, models, projection):
    from ipa_train.hosts.backbone_diffusers import DiffusersBackbone
    from ipa_train.hosts.diffusers_unet import unet_layer_hidden_sizes
    from ipa_train.toy.tiny import tiny_scheduler

    unet, model, clip_vision = models
    nodes = importlib.import_module(kit.__name__ + ".nodes.train_backbone")
    node = nodes.ComfyBackbone(model, StandInSdxlClip(comfy), StandInVae(comfy), clip_vision)
    cli = DiffusersBackbone(device="cpu", components={"unet": unet, "scheduler": tiny_scheduler()})
    assert node.size_conditioning and cli.size_conditioning
    assert list(node.sizes.layer_hidden_sizes) == unet_layer_hidden_sizes(unet) and len(node.sites) == 70
    adapter = adapter_for_unet(unet, projection, clip_dim=24)
    batch = _batch(24)
    if projection == "plus":
        batch.clip = torch.randn(2, 50, 24, generator=torch.Generator().manual_seed(4))  # penultimate [B, L, D]
    loss_node, grads_node = _step(node, adapter, batch)
    loss_cli, grads_cli = _step(cli, adapter, batch)
    assert abs(loss_node - loss_cli) <= 1e-5 * max(1.0, abs(loss_cli)), (loss_node, loss_cli)
    assert grads_node.keys() == grads_cli.keys() and len(grads_cli) > 0
    for name, g in grads_cli.items():
        torch.testing.assert_close(grads_node[name], g, atol=1e-5, rtol=1e-5, msg=name)
    scale = max(float(g.abs().max()) for g in grads_cli.values())  # gradients are ~1e-2 here: also relative to them
    assert max(float((grads_node[n] - g).abs().max()) for n, g in grads_cli.items()) <= 1e-4 * scale
    # The size conditioning reaches both: other time_ids change the loss of each backbone the same way.
    batch.text.extra["time_ids"] = batch.text.extra["time_ids"].flip(0)
    moved_node, moved_cli = _step(node, adapter, batch)[0], _step(cli, adapter, batch)[0]
    assert moved_node != loss_node and abs(moved_node - moved_cli) <= 1e-5 * max(1.0, abs(moved_cli))


def test_node_trains_an_sdxl_model(comfy, kit, models, tmp_path, monkeypatch):
    """IPAKitTrain end to end on the SDXL model: pooled text from the CLIP, size ids from the dataset."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    _, model, clip_vision = models
    train_mod = importlib.import_module(kit.__name__ + ".nodes.train")
    nodes = importlib.import_module(kit.__name__ + ".nodes.train_backbone")
    seen = []
    real = nodes.ComfyBackbone._adm

    def record(self, text):
        seen.append(text.extra["time_ids"].clone())
        return real(self, text)

    monkeypatch.setattr(nodes.ComfyBackbone, "_adm", record)
    dataset, _ = train_mod.scan_dataset(str(DEMO_DATA))
    out = train_mod.train_in_comfy(model, StandInSdxlClip(comfy), StandInVae(comfy), clip_vision, dataset, "plain",
                                   False, 2, 2, 1e-4, 64, 0.05, 0.05, 0.05, 0, 0, "sdxl-run")
    adapter, path = out.args[0], out.args[1]
    assert Path(path).is_file() and adapter.config.cross_attention_layers == 70
    assert len(seen) == 2 and all(ids.shape == (2, 6) for ids in seen)
    assert all(bool((ids[:, 4:] == 64).all()) for ids in seen)  # target size = the training resolution
