"""Stand-ins for the Flux workflow's official files, small enough for a CPU test run, and the test-only custom node
that lets ComfyUI's own loaders build them.

ComfyUI sizes a Flux model and its text encoders from fixed configs (Flux: 24 heads of 128, T5-XXL 4096 wide,
CLIP-L 768; `comfy/model_detection.py`, `comfy/text_encoders/t5_config_xxl.json`), so a small random file would
be built at full size with most weights missing. The hook node (`HOOK`, installed only in the workflow tests'
servers) reads a small config the stand-in file carries and hands it to the loader, through the override ComfyUI
itself has (`model_options["<name>_model_config"]` for text encoders) or in place of detection (a diffusion model
whose safetensors metadata has `ipakit_standin_unet_config`). Files without the marker load as usual; everything
else (the core loader nodes, conditioning, Flux sampling, our nodes) runs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HOOK_NAME = "ipakit_test_standins"
MARKER = "ipakit_standin_config"  # a uint8 tensor: the JSON of model_options entries for a text encoder
UNET_MARKER = "ipakit_standin_unet_config"  # safetensors metadata of a diffusion model: its unet_config
HOOK = f'''"""Test-only: small stand-in models for ComfyUI's loaders (see tests/host/dit_standins.py)."""
import json

import comfy.model_detection
import comfy.sd

_detect = comfy.model_detection.detect_unet_config
_load_te = comfy.sd.load_text_encoder_state_dicts


def detect_unet_config(state_dict, key_prefix, metadata=None):
    if metadata and "{UNET_MARKER}" in metadata:
        return json.loads(metadata["{UNET_MARKER}"])
    return _detect(state_dict, key_prefix, metadata=metadata)


def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                  model_options={{}}):
    options = dict(model_options)
    for sd in state_dicts:
        if "{MARKER}" in sd:
            options.update(json.loads(bytes(sd.pop("{MARKER}").tolist()).decode()))
    return _load_te(state_dicts, embedding_directory, clip_type, model_options=options)


comfy.model_detection.detect_unet_config = detect_unet_config
comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts
NODE_CLASS_MAPPINGS = {{}}
'''

# widths that fit together: T5 d_model = Flux context_in_dim, CLIP-L hidden = Flux vec_in_dim, head 32 = sum(axes)
T5 = dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2)
CLIP_L = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=CLIP_L["hidden_size"],
            context_in_dim=T5["d_model"], hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
            axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
FILES = {  # folder, stand-in file
    "flux": ("diffusion_models", "ipakit_tiny_flux.safetensors"),
    "t5": ("text_encoders", "ipakit_tiny_t5xxl.safetensors"),
    "clip_l": ("text_encoders", "ipakit_tiny_clip_l.safetensors"),
    "vae": ("vae", "ipakit_random_ae16.safetensors"),
    "xlabs": ("ipadapter", "ipakit_tiny_xlabs_v2.safetensors"),
}


def _marker(options: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(options).encode()), dtype=torch.uint8)


def _save(sd: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)


def _flux(comfy, path: Path) -> None:
    import comfy.model_base
    import comfy.supported_models

    from .dit_models import randomize

    config = comfy.supported_models.Flux(dict(FLUX))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(config, device=torch.device("cpu"))
    randomize(model.diffusion_model, 0)
    _save(model.diffusion_model.state_dict(), path, {UNET_MARKER: json.dumps(FLUX)})


def _text_encoders(t5_path: Path, clip_path: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **T5))
    sd = dict(t5.state_dict())
    sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    _save({**sd, MARKER: _marker({"t5xxl_model_config": T5})}, t5_path)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **CLIP_L))
    _save({**clip.state_dict(), MARKER: _marker({"clip_l_model_config": CLIP_L})}, clip_path)


def _vae(path: Path) -> None:
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    _save({k: v.half() for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items()}, path)


def write_flux_standins(comfy, cache: Path) -> dict[str, Path]:
    """key of FILES -> the stand-in file, written once into `cache` (the host-model cache)."""
    from .. import dit_factories as fac

    cache.mkdir(parents=True, exist_ok=True)
    paths = {key: cache / name for key, (_, name) in FILES.items()}
    torch.manual_seed(0)
    if not paths["flux"].exists():
        _flux(comfy, paths["flux"])
    if not (paths["t5"].exists() and paths["clip_l"].exists()):
        _text_encoders(paths["t5"], paths["clip_l"])
    if not paths["vae"].exists():
        _vae(paths["vae"])
    if not paths["xlabs"].exists():
        fac.write(fac.xlabs_flux(hidden=FLUX["hidden_size"], ctx=T5["d_model"], tokens=16, blocks=FLUX["depth"]),
                  paths["xlabs"])
    return paths


def link_standins(base: Path, paths: dict[str, Path]) -> None:
    """models/<folder>/<file> symlinks of the stand-ins in a prepared ComfyUI base."""
    for key, path in paths.items():
        folder = base / "models" / FILES[key][0]
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
