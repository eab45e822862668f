"""The toy base model of the shapes world: components, one-file save/load, and the `DiffusersBackbone` over it.

Components (by the names `DiffusersBackbone(components=...)` takes):
    * unet: a diffusers `UNet2DConditionModel` on 16x16x12 "latents": convolutions only at 16x16, cross-attention
      at 8x8 and 4x4 (pretrained on the world by `ipa_train.toy.pretrain`);
    * vae: `PixelUnshuffleVAE`, a parameter-free exact stand-in: 32x32 RGB <-> 16x16x12 by pixel-(un)shuffle by 2
      (`patch` 4, 8x8x48, is also supported: it trained slower and drew blurrier shapes, see the README);
    * text_encoder: a random `CLIPTextModel`; tokenizer: a word-level tokenizer over the world's vocabulary;
    * scheduler: `DDPMScheduler` (cosine betas, v-prediction: robust sampling from a small model);
    * image_encoder: a tiny `CLIPVisionModelWithProjection` at the real 224 px input, trained briefly to tell the
      world's colours, shapes and backgrounds apart (`ipa_train.toy.encoder`), as a real CLIP's embeddings do.

The shipped file `shapes_base.safetensors` holds every weight under `<component>.` prefixes; its metadata
holds the component configs as JSON, so it loads with no other file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..errors import IPAKitError
from .world import IMAGE_SIZE, vocabulary

SHIPPED = Path(__file__).resolve().parent / "shapes_base.safetensors"
FORMAT = "ipakit-toy-shapes-v1"
TEXT_WIDTH = 64
PATCH = 2  # pixel-unshuffle factor of the shipped VAE stand-in: 32x32x3 images <-> 16x16x12 latents
MAX_TOKENS = 12
_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def _unet_config(patch: int) -> dict[str, Any]:
    """patch 4: 8x8x48 latents, two levels, both with cross-attention; patch 2: 16x16x12 latents, a first
    level without attention (convolutions only: attention at 16x16 costs the most), then 8x8 and 4x4."""
    common = {"sample_size": IMAGE_SIZE // patch, "in_channels": 3 * patch * patch, "out_channels": 3 * patch * patch,
              "layers_per_block": 1, "cross_attention_dim": TEXT_WIDTH, "attention_head_dim": 16,
              "norm_num_groups": 16}
    if patch == 4:
        return {**common, "block_out_channels": [64, 96],
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
    if patch == 2:
        return {**common, "block_out_channels": [32, 64, 96],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    raise IPAKitError(f"toy model patch {patch} is not supported; expected 2 or 4")


def default_configs(patch: int = PATCH) -> dict[str, dict[str, Any]]:
    """The component configs of the toy model (JSON-able; stored in the weight file's metadata)."""
    return {
        "unet": _unet_config(patch),
        "vae": {"patch": patch},
        "text_encoder": {
            "vocab_size": len(_SPECIALS) + len(vocabulary()), "hidden_size": TEXT_WIDTH, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS,
            "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
        },
        "image_encoder": {
            "image_size": 224, "patch_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32,
        },
        "scheduler": {
            "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
            "clip_sample": False,
        },
    }


class _LatentDist:
    def __init__(self, mean: torch.Tensor):
        self.mean = mean
        self.std = torch.zeros_like(mean)


class PixelUnshuffleVAE(nn.Module):
    """Exact, parameter-free VAE stand-in: images [B, 3, H, W] in [-1, 1] <-> latents [B, 3*p*p, H/p, W/p].

    `config` mimics `AutoencoderKL.config` where the training and sampling code reads it (scaling factor 1;
    `block_out_channels` of length k means a downscale of 2**(k-1) = p, as `generate` computes it).
    """

    def __init__(self, patch: int = PATCH) -> None:
        super().__init__()
        self.patch = patch
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, latent_channels=3 * patch * patch,
                                      block_out_channels=(3 * patch * patch,) * (patch.bit_length()))
        self.register_buffer("_dtype_probe", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_probe.dtype

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=_LatentDist(nn.functional.pixel_unshuffle(pixels, self.patch)))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=nn.functional.pixel_shuffle(latents, self.patch))


def build_tokenizer() -> Any:
    """A word-level tokenizer over the world's vocabulary: `<bos> words <eos> <pad>...`, unknown words -> <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[
        ("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=MAX_TOKENS, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def build_components(configs: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Every component, randomly initialised from `configs` (default: `default_configs()`) and `seed`."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = configs or default_configs()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"])
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    torch.manual_seed(seed + 2)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["image_encoder"]))
    vae = PixelUnshuffleVAE(cfg.get("vae", {}).get("patch", 4))  # files written before "vae" was stored: 4
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": build_tokenizer(),
            "scheduler": DDPMScheduler(**cfg["scheduler"]), "image_encoder": image_encoder}


_WEIGHTED = ("unet", "text_encoder", "image_encoder")


def save_components(path: str | os.PathLike, components: dict[str, Any], configs: dict[str, dict[str, Any]],
                    info: dict[str, Any] | None = None, weighted: tuple[str, ...] = _WEIGHTED,
                    fmt: str = FORMAT) -> Path:
    """Write the `weighted` components to one safetensors file; configs (and `info`) go into its metadata."""
    from safetensors.torch import save_file

    from ..adapter.formats import atomic_write

    tensors = {f"{name}.{k}": v.detach().contiguous().cpu().clone()
               for name in weighted for k, v in components[name].state_dict().items()}
    meta = {"format": fmt, "configs": json.dumps(configs), "info": json.dumps(info or {})}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def read_model_file(path: str | os.PathLike, fmt: str = FORMAT,
                    rebuild: str = "python scripts/build_toy_model.py") -> tuple[dict[str, Any], dict[str, Any]]:
    """(configs, tensors) of a file written by `save_components` with format `fmt`; one clear error otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise IPAKitError(f"toy model {path} not found; rebuild it with `{rebuild}`")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt:
            raise IPAKitError(f"{path} is not a toy shapes model of this kind (metadata format "
                              f"{meta.get('format')!r}, expected {fmt!r}); rebuild it with `{rebuild}`")
        return json.loads(meta["configs"]), {k: f.get_tensor(k) for k in f.keys()}


def load_weights(components: dict[str, Any], tensors: dict[str, torch.Tensor], weighted: tuple[str, ...]) -> None:
    """Load `<component>.`-prefixed tensors into the `weighted` components (strict) and set them to eval."""
    for name in weighted:
        prefix = f"{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        components[name].load_state_dict(state, strict=True)
        components[name].eval()


def load_components(path: str | os.PathLike = SHIPPED) -> dict[str, Any]:
    """Components from a file written by `save_components` (default: the shipped pretrained model)."""
    configs, tensors = read_model_file(path)
    components = build_components(configs)
    load_weights(components, tensors, _WEIGHTED)
    return components


def model_info(path: str | os.PathLike = SHIPPED) -> dict[str, Any]:
    """The `info` dict stored with the model (training steps, seed, measured accuracy)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("info", "{}"))


def toy_backbone(path: str | os.PathLike = SHIPPED, device: str | torch.device = "cpu") -> Any:
    """The pretrained toy model as a training/sampling `DiffusersBackbone` (the same code path as real models)."""
    from ..hosts.backbone_diffusers import DiffusersBackbone

    return DiffusersBackbone(components=load_components(path), device=device, keep_encoders=True)
