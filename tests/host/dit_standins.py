"""Stand-ins for the Flux and SD3.5 workflows' official files, small enough for a CPU test run, and the test-only
custom node that lets ComfyUI's own loaders build them.

ComfyUI sizes these models, their text encoders and SigLIP from fixed configs (Flux: 24 heads of 128, T5-XXL 4096
wide, CLIP-L 768, CLIP-G 1280, SigLIP so400m 27 layers; `comfy/model_detection.py`, `comfy/text_encoders/`,
`comfy/clip_vision_siglip_384.json`), so a small random file would be built at full size with most weights
missing. The hook node (`HOOK`, installed only in the workflow tests' servers) reads a small config the stand-in
file carries and hands it to the loader, through the override ComfyUI itself has (`model_options["<name>_model_config"]`
for text encoders) or in place of detection (a diffusion model whose safetensors metadata has
`ipakit_standin_unet_config`; a CLIP vision file with the marker tensor, whose config is ComfyUI's SigLIP one with
smaller sizes). Files without the marker load as usual; everything else (the core loader nodes, conditioning,
sampling, ComfyUI's CLIP vision model, our nodes) runs unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

HOOK_NAME = "ipakit_test_standins"
MARKER = "ipakit_standin_config"  # a uint8 tensor: the JSON of model_options entries for a text encoder
UNET_MARKER = "ipakit_standin_unet_config"  # safetensors metadata of a diffusion model: its unet_config
HOOK = f'''"""Test-only: small stand-in models for ComfyUI's loaders (see tests/host/dit_standins.py)."""
import json
import logging
import os
import tempfile

import comfy.clip_vision
import comfy.model_detection
import comfy.sd
import comfy.text_encoders.long_clipl

_detect = comfy.model_detection.detect_unet_config
_load_te = comfy.sd.load_text_encoder_state_dicts
_long_clip = comfy.text_encoders.long_clipl.model_options_long_clip
_load_clip_vision = comfy.clip_vision.load_clipvision_from_sd


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
    if options.keys() == model_options.keys():
        return _load_te(state_dicts, embedding_directory, clip_type, model_options=options)
    warned = []  # ComfyUI only warns when weights of a text encoder are missing; a stand-in must load whole
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        clip = _load_te(state_dicts, embedding_directory, clip_type, model_options=options)
    finally:
        logging.getLogger().removeHandler(handler)
    missing = [m for m in warned if m.startswith("clip missing")]
    if missing:
        raise RuntimeError("stand-in text encoder did not load whole: " + "; ".join(missing))
    return clip


def model_options_long_clip(sd, tokenizer_data, model_options):
    # ComfyUI sets a CLIP's <name>_model_config to its position count alone: keep the stand-in's sizes beside it
    tokenizer_data, out = _long_clip(sd, tokenizer_data, model_options)
    for key, value in model_options.items():
        if key.endswith("_model_config") and out.get(key) is not value:
            out = {{**out, key: {{**value, **out[key]}}}}
    return tokenizer_data, out


def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
    if "{MARKER}" not in sd:
        return _load_clip_vision(sd, prefix=prefix, convert_keys=convert_keys)
    fd, path = tempfile.mkstemp(suffix=".json")  # ComfyUI's CLIP vision model reads its config from a file
    with os.fdopen(fd, "w") as f:
        f.write(bytes(sd.pop("{MARKER}").tolist()).decode())
    try:
        clip = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    missing, _ = clip.load_sd(sd)
    if missing:
        raise RuntimeError(f"stand-in CLIP vision file lacks {{missing}}")
    return clip


comfy.model_detection.detect_unet_config = detect_unet_config
comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts
comfy.text_encoders.long_clipl.model_options_long_clip = model_options_long_clip
comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd
NODE_CLASS_MAPPINGS = {{}}
'''

# widths that fit together: T5 d_model = Flux context_in_dim, CLIP-L hidden = Flux vec_in_dim, head 32 = sum(axes);
# CLIP-L has 3 layers: SD3 reads its penultimate layer, which ComfyUI allows only below the last two
T5 = dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2)
CLIP_L = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3, projection_dim=32)
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=CLIP_L["hidden_size"],
            context_in_dim=T5["d_model"], hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
            axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])
# SD3.5: ComfyUI pads CLIP-L + CLIP-G (32 + 32 here) to 4096 and joins the T5 tokens to them, so the SD3 T5 is
# 4096 wide (stored in fp8, as t5xxl_fp8_e4m3fn is: its 32128 x 4096 embedding is most of the file); ComfyUI tells
# CLIP-G from CLIP-L by a 31st layer; the MMDiT is 64 x depth wide (as ComfyUI's detection reads it) with the
# pooled width of the two CLIPs; SigLIP keeps its 1152 width (what the InstantX projection reads), with 2 layers.
CLIP_G = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=32, projection_dim=32)
T5_SD3 = dict(d_model=4096, d_ff=32, d_kv=8, num_heads=2, num_layers=1)
SD3 = dict(hidden=128, heads=2, depth=2, context=T5_SD3["d_model"],
           pooled=CLIP_L["hidden_size"] + CLIP_G["projection_dim"], pos_max=64)
SIGLIP = dict(hidden_size=1152, intermediate_size=256, num_attention_heads=16, num_hidden_layers=2, image_size=224)
FILES = {  # folder, stand-in file
    "flux": ("diffusion_models", "ipakit_tiny_flux.safetensors"),
    "t5": ("text_encoders", "ipakit_tiny_t5xxl.safetensors"),
    "clip_l": ("text_encoders", "ipakit_tiny_clip_l3.safetensors"),
    "vae": ("vae", "ipakit_random_ae16.safetensors"),
    "xlabs": ("ipadapter", "ipakit_tiny_xlabs_v2.safetensors"),
    "sd35": ("checkpoints", "ipakit_tiny_sd35.safetensors"),  # MMDiT + the 16-channel VAE, as sd3.5_large
    "clip_g": ("text_encoders", "ipakit_tiny_clip_g.safetensors"),
    "t5_sd3": ("text_encoders", "ipakit_tiny_t5xxl_4096_fp8.safetensors"),
    "siglip": ("clip_vision", "ipakit_tiny_siglip.safetensors"),
    "instantx_sd3": ("ipadapter", "ipakit_tiny_instantx_sd35.bin"),
}


def _marker(options: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(options).encode()), dtype=torch.uint8)


def _prefixed(sd: dict, prefix: str) -> dict:
    """transformers 5 leaves the `text_model.` / `vision_model.` prefix off a bare CLIP / SigLIP model's keys;
    ComfyUI's loaders (and the official files) have it."""
    return {(k if k.startswith(prefix) else prefix + k): v for k, v in sd.items()}


def _partial(path: Path) -> Path:
    """Where a stand-in is written before it is renamed into place: a parallel test run never reads half a file."""
    return path.with_name(f"{path.stem}.partial{os.getpid()}{path.suffix}")


def _save(sd: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(_partial(path)), metadata=metadata)
    os.replace(_partial(path), path)


def _flux(comfy, path: Path) -> None:
    import comfy.model_base
    import comfy.supported_models

    from .dit_models import randomize

    config = comfy.supported_models.Flux(dict(FLUX))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(config, device=torch.device("cpu"))
    randomize(model.diffusion_model, 0)
    _save(model.diffusion_model.state_dict(), path, {UNET_MARKER: json.dumps(FLUX)})


def _t5(path: Path, config: dict, dtype: torch.dtype = torch.float32) -> None:
    from transformers import T5Config, T5EncoderModel

    # the 32128-token table drawn here: transformers' own init of a 4096-wide one takes 20 s
    t5 = T5EncoderModel(T5Config(vocab_size=8, feed_forward_proj="gated-gelu", **config))
    sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    sd["shared.weight"] = torch.randn(32128, config["d_model"])
    _save({**{k: v.to(dtype) for k, v in sd.items()}, MARKER: _marker({"t5xxl_model_config": config})}, path)


def _clip_text(path: Path, name: str, config: dict) -> None:
    """CLIP-L (`name` clip_l) or CLIP-G (clip_g) with its text projection, in the transformers layout."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    act = "quick_gelu" if name == "clip_l" else "gelu"
    clip = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act=act,
                                                      bos_token_id=49406, eos_token_id=49407, pad_token_id=1, **config))
    sd = {k: v for k, v in clip.state_dict().items() if k.startswith("text_projection")}
    sd.update(_prefixed({k: v for k, v in clip.state_dict().items() if k not in sd}, "text_model."))
    _save({**sd, MARKER: _marker({f"{name}_model_config": config})}, path)


def _vae(path: Path) -> None:
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    _save({k: v.half() for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items()}, path)


def _sd35_checkpoint(comfy, path: Path, vae: Path) -> None:
    """The MMDiT as ComfyUI's own loader builds it from diffusers weights (so detection reads it back the same),
    with the Flux stand-in's 16-channel VAE, under a checkpoint's prefixes and no text encoders (as sd3.5_large)."""
    from safetensors.torch import load_file

    from .dit_models import tiny_sd3

    _, patcher = tiny_sd3(comfy, seed=1, sizes=SD3)
    sd = {f"model.diffusion_model.{k}": v for k, v in patcher.model.diffusion_model.state_dict().items()}
    _save({**sd, **{f"first_stage_model.{k}": v for k, v in load_file(str(vae)).items()}}, path)


def _siglip(comfy, path: Path) -> None:
    """SigLIP so400m's layout and width, 2 layers; the marker is ComfyUI's own SigLIP config with these sizes."""
    import comfy.clip_vision
    from transformers import SiglipVisionConfig, SiglipVisionModel

    base = Path(comfy.clip_vision.__file__).parent / "clip_vision_siglip_384.json"
    config = {**json.loads(base.read_text()), **SIGLIP}
    model = SiglipVisionModel(SiglipVisionConfig(patch_size=config["patch_size"], hidden_act=config["hidden_act"],
                                                 vision_use_head=False, **SIGLIP))
    _save({**_prefixed(model.state_dict(), "vision_model."), MARKER: _marker(config)}, path)


def _adapter(state: dict, path: Path) -> None:
    from .. import dit_factories as fac

    os.replace(fac.write(state, _partial(path)), path)


def write_dit_standins(comfy, cache: Path) -> dict[str, Path]:
    """key of FILES -> the stand-in file, written once into `cache` (the host-model cache)."""
    from .. import dit_factories as fac

    cache.mkdir(parents=True, exist_ok=True)
    paths = {key: cache / name for key, (_, name) in FILES.items()}
    writers = {  # in this order: the SD3.5 checkpoint takes the VAE
        "flux": lambda p: _flux(comfy, p), "t5": lambda p: _t5(p, T5), "clip_l": lambda p: _clip_text(p, "clip_l", CLIP_L),
        "vae": _vae,
        "xlabs": lambda p: _adapter(fac.xlabs_flux(hidden=FLUX["hidden_size"], ctx=T5["d_model"], tokens=16,
                                                   blocks=FLUX["depth"]), p),
        "sd35": lambda p: _sd35_checkpoint(comfy, p, paths["vae"]), "clip_g": lambda p: _clip_text(p, "clip_g", CLIP_G),
        "t5_sd3": lambda p: _t5(p, T5_SD3, torch.float8_e4m3fn), "siglip": lambda p: _siglip(comfy, p),
        "instantx_sd3": lambda p: _adapter(fac.instantx_sd3(hidden=SD3["hidden"], head_dim=SD3["hidden"] // SD3["heads"],
                                                            tokens=64, blocks=SD3["depth"], dim=128, depth=4,
                                                            temb_in=32), p),
    }
    for key, write in writers.items():
        if not paths[key].exists():
            torch.manual_seed(list(FILES).index(key))
            write(paths[key])
    return paths


def link_standins(base: Path, paths: dict[str, Path]) -> None:
    """models/<folder>/<file> symlinks of the stand-ins in a prepared ComfyUI base."""
    for key, path in paths.items():
        folder = base / "models" / FILES[key][0]
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
