"""The training backbone over diffusers/transformers models: a Stable Diffusion folder (or hub id) and a CLIP
vision encoder, plus a short sampling loop to look at what an adapter does.

Components are loaded lazily, on first use, so that training can encode and cache a small dataset, release
the encoders, and only then load the UNet: peak memory is max(encoders, UNet), not their sum. Sizes
(`DiffusersBackbone.sizes`) come from config files or meta-device modules, so asking for them loads nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapter.config import ClipOutput
from ..adapter.modules import IPAdapter
from ..errors import IPAKitError
from ..training.train import BackboneSizes, TextCondition
from .diffusers_unet import (
    DiffusersAdapterPatch,
    init_from_unet,
    install_adapter,
    install_lora,
    unet_layer_hidden_sizes,
)

logger = logging.getLogger(__name__)

_PARTS = {"vae": ("vae",), "text": ("text_encoder", "text_encoder_2"), "image": ("image_encoder",)}


class DiffusersBackbone:
    """`ipa_train.training.train.Backbone` for a diffusers Stable Diffusion 1.x/2.x or SDXL model.

    SDXL (a UNet with `addition_embed_type="text_time"`): the text is both encoders' penultimate hidden states
    side by side plus the second encoder's pooled `text_embeds`, as diffusers' SDXL pipeline encodes a prompt;
    `size_conditioning` asks the training batches for each sample's `time_ids`.

    Args:
        base_model: folder or hub id of a diffusers pipeline (subfolders unet, vae, text_encoder, tokenizer,
            scheduler); loaded with `from_pretrained`.
        image_encoder: folder or hub id of a `CLIPVisionModelWithProjection`.
        device: where the models run (default: CUDA when available).
        encoder_dtype: dtype of the frozen VAE and encoders (fp16/bf16 under mixed precision); the UNet stays fp32.
        components: already built modules by name (unet, vae, text_encoder, tokenizer, scheduler,
            image_encoder; text_encoder_2 and tokenizer_2 for SDXL); those given are not loaded.
        factories: zero-argument functions building a component, called on first use instead of loading it
            (e.g. random full-size models for benchmarks); the unet and image_encoder factories are also called
            on the meta device (no memory) to read sizes.
        keep_encoders: ignore `release` (components given in memory cannot be loaded again after it; those
            loaded from `base_model`/`image_encoder` are simply loaded again when needed).
    """

    def __init__(self, base_model: str | os.PathLike | None = None, image_encoder: str | os.PathLike | None = None,
                 device: torch.device | str | None = None, encoder_dtype: torch.dtype = torch.float32,
                 components: dict[str, Any] | None = None, keep_encoders: bool = False,
                 factories: dict[str, Callable[[], Any]] | None = None):
        self.base_model = os.fspath(base_model) if base_model is not None else None
        self.image_encoder_path = os.fspath(image_encoder) if image_encoder is not None else None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder_dtype = encoder_dtype
        self.keep_encoders = keep_encoders
        self._sizes: BackboneSizes | None = None  # read once, kept after the encoders are released
        self._factories: dict[str, Callable[[], Any]] = dict(factories or {})
        self._models: dict[str, Any] = dict(components or {})
        for name, module in self._models.items():
            self._prepare(name, module)
        self._loaders: dict[str, Callable[[], Any]] = {
            "unet": lambda: self._from_base("diffusers", "UNet2DConditionModel", "unet"),
            "vae": lambda: self._from_base("diffusers", "AutoencoderKL", "vae"),
            "text_encoder": lambda: self._from_base("transformers", "CLIPTextModel", "text_encoder"),
            "tokenizer": lambda: self._from_base("transformers", "CLIPTokenizer", "tokenizer"),
            "text_encoder_2": lambda: self._from_base("transformers", "CLIPTextModelWithProjection", "text_encoder_2"),
            "tokenizer_2": lambda: self._from_base("transformers", "CLIPTokenizer", "tokenizer_2"),
            "scheduler": lambda: self._from_base("diffusers", "DDPMScheduler", "scheduler"),
            "image_encoder": self._load_image_encoder,
            **self._extra_loaders(),
            **self._factories,
        }
        self.patch: DiffusersAdapterPatch | None = None
        self._lora_hooks: list[Any] = []
        self._size_conditioning: bool | None = None
        self._read_schedule()

    def _extra_loaders(self) -> dict[str, Callable[[], Any]]:
        """Loaders a subclass adds or replaces (factories still win)."""
        return {}

    def _read_schedule(self) -> None:
        sched = self.get("scheduler")
        self.prediction_type = str(sched.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise IPAKitError(f"scheduler prediction_type {self.prediction_type!r} is not supported for training; "
                              "use a base model trained with epsilon or v_prediction")
        self.num_train_timesteps = int(sched.config.num_train_timesteps)

    # ---- loading ---------------------------------------------------------------------------------------

    def _from_base(self, package: str, cls_name: str, subfolder: str) -> Any:
        if self.base_model is None:
            raise IPAKitError(f"no base model given and no {subfolder} component passed")
        module = __import__(package, fromlist=[cls_name])
        cls = getattr(module, cls_name)
        try:
            return cls.from_pretrained(self.base_model, subfolder=subfolder)
        except (OSError, ValueError) as e:
            raise self._base_error(subfolder, e) from None

    def _base_error(self, subfolder: str, e: Exception) -> IPAKitError:
        return IPAKitError(
            f"cannot load the {subfolder} of base model {self.base_model!r} ({str(e).splitlines()[0]}); give a "
            "diffusers folder (with unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'")

    def _load_image_encoder(self, config_only: bool = False) -> Any:
        """The CLIPVisionModelWithProjection, or with `config_only` just its `CLIPVisionConfig`."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if self.image_encoder_path is None:
            raise IPAKitError("no image encoder given: pass the folder or hub id of a CLIP vision model "
                              "(e.g. h94/IP-Adapter with subfolder models/image_encoder for SD1.5)")
        try:
            if config_only:
                return CLIPVisionConfig.from_pretrained(self.image_encoder_path)
            return CLIPVisionModelWithProjection.from_pretrained(self.image_encoder_path)
        except (OSError, ValueError) as e:
            raise IPAKitError(f"cannot load the image encoder {self.image_encoder_path!r} ({str(e).splitlines()[0]}); "
                              "give a folder or hub id of a CLIPVisionModelWithProjection") from None

    def _meta(self, name: str) -> Any:
        """The component built by its factory on the meta device: its config and shapes, no weights in memory
        (the CPU random state is kept: factories may seed it)."""
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return self._factories[name]()

    def _unet_shape(self) -> Any:
        from diffusers import UNet2DConditionModel

        return self._model_shape("unet", UNet2DConditionModel)

    def _model_shape(self, name: str, cls: Any) -> Any:
        """The denoiser `name` in memory, or one on the meta device from its factory or its config file."""
        if self._models.get(name) is not None:
            return self._models[name]
        if name in self._factories:
            return self._meta(name)
        if self.base_model is None:
            raise IPAKitError(f"no base model given and no {name} component passed")
        try:
            config = cls.load_config(self.base_model, subfolder=name)
        except (OSError, ValueError) as e:
            raise self._base_error(name, e) from None
        with torch.device("meta"):
            return cls.from_config(config)

    def _vision_config(self) -> Any:
        """The image encoder's config: of the module in memory, of its factory's meta build, or from its folder;
        None when no image encoder was given (FaceID reads face embeddings only)."""
        if self._models.get("image_encoder") is not None:
            return self._models["image_encoder"].config
        if "image_encoder" in self._factories:
            return self._meta("image_encoder").config
        if self.image_encoder_path is None:
            return None
        return self._load_image_encoder(config_only=True)

    def _prepare(self, name: str, module: Any) -> Any:
        if isinstance(module, nn.Module):
            module.requires_grad_(False)
            module.eval()
            module.to(self.device)
            if name == "unet":
                module.to(memory_format=torch.channels_last)  # faster convolutions (about 6% per step on CPU)
            if name != "unet" and self.encoder_dtype != torch.float32:
                module.to(dtype=self.encoder_dtype)
        return module

    def get(self, name: str) -> Any:
        """A component, loaded on first use."""
        if self._models.get(name) is None:
            logger.info("loading %s", name)
            self._models[name] = self._prepare(name, self._loaders[name]())
        return self._models[name]

    @property
    def unet(self) -> Any:
        return self.get("unet")

    @property
    def denoiser(self) -> Any:
        """The loaded denoiser (training reads its conv sizes to pick the CPU convolution kernel)."""
        return self.unet

    parts = _PARTS  # component names of each releasable part

    def release(self, parts: tuple[str, ...]) -> None:
        if self.keep_encoders:
            return
        for part in parts:
            for name in self.parts[part]:
                self._models[name] = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def frozen_modules(self) -> dict[str, nn.Module]:
        """The loaded frozen models by name (for checks that training leaves them unchanged)."""
        return {k: v for k, v in self._models.items() if isinstance(v, nn.Module)}

    # ---- Backbone interface ------------------------------------------------------------------------------

    @property
    def sizes(self) -> BackboneSizes:
        """Widths from configs: a component in memory as it is, otherwise its factory's meta-device build or its
        config file (`UNet2DConditionModel.load_config`, `CLIPVisionConfig.from_pretrained`). Loads no weights."""
        if self._sizes is None:
            unet, vision = self._unet_shape(), self._vision_config()
            self._sizes = BackboneSizes(
                cross_attention_dim=int(unet.config.cross_attention_dim),
                layer_hidden_sizes=tuple(unet_layer_hidden_sizes(unet)),
                clip_dims={} if vision is None else {"image_embeds": int(vision.projection_dim),
                                                     "penultimate": int(vision.hidden_size)})
        return self._sizes

    @property
    def size_conditioning(self) -> bool:
        """SDXL: the UNet takes pooled text and size/crop `time_ids` (read from its config: loads no weights)."""
        if self._size_conditioning is None:
            embed = getattr(self._unet_shape().config, "addition_embed_type", None)
            self._size_conditioning = embed == "text_time"
        return self._size_conditioning

    @property
    def cross_attention_dim(self) -> int:
        return self.sizes.cross_attention_dim

    def clip_embedding_dim(self, output: ClipOutput) -> int:
        return self.sizes.clip_embedding_dim(output)

    def layer_hidden_sizes(self) -> list[int]:
        return list(self.sizes.layer_hidden_sizes)

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.get("vae")
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        scale = float(vae.config.scaling_factor)
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        return (dist.mean - shift) * scale, dist.std * scale  # [B, c, h, w] each

    def _token_ids(self, tokenizer: str, captions: list[str]) -> torch.Tensor:
        tok = self.get(tokenizer)
        return tok(captions, max_length=tok.model_max_length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids.to(self.device)  # [B, S]

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextCondition:
        enc = self.get("text_encoder")
        ids = self._token_ids("tokenizer", captions)
        if not self.size_conditioning:
            return TextCondition(enc(ids)[0].float())  # [B, S, C]
        enc2 = self.get("text_encoder_2")
        out2 = enc2(self._token_ids("tokenizer_2", captions), output_hidden_states=True)
        hidden = torch.cat([enc(ids, output_hidden_states=True).hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return TextCondition(hidden.float(), {"text_embeds": out2.text_embeds.float()})  # [B, S, C1+C2], [B, P]

    @torch.no_grad()
    def encode_image(self, clip_pixels: torch.Tensor, output: ClipOutput) -> torch.Tensor:
        enc = self.get("image_encoder")
        x = clip_pixels.to(self.device, enc.dtype)
        if output == "image_embeds":
            return enc(x).image_embeds.float()  # [B, D]
        return enc(x, output_hidden_states=True).hidden_states[-2].float()  # [B, L, D]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.get("scheduler").add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.get("scheduler").get_velocity(latents, noise, timesteps)
        return noise

    def init_adapter(self, adapter: IPAdapter) -> None:
        init_from_unet(adapter, self.unet)

    def attach(self, adapter: IPAdapter) -> None:
        if self.patch is not None:
            self.patch.remove()
        self.patch = install_adapter(self.unet, adapter, weight=1.0, mode="scaled")

    def attach_lora(self, lora: nn.Module) -> None:
        """Install a FaceID LoRA (`ipa_train.training.faceid.FaceLoRA`) on every attention layer for `predict`."""
        self.detach_lora()
        self._lora_hooks = install_lora(self.unet, lora)

    def detach_lora(self) -> None:
        for handle in self._lora_hooks:
            handle.remove()
        self._lora_hooks = []

    def detach(self) -> None:
        if self.patch is not None:
            self.patch.remove()
            self.patch = None

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCondition,
                ip_tokens: torch.Tensor) -> torch.Tensor:
        if self.patch is None:
            raise IPAKitError("no adapter attached: call attach(adapter) before predict")
        ehs = self.patch.encoder_hidden_states(text.hidden, ip_tokens=ip_tokens)  # [B, S+T, C]
        return self.unet(noisy, timesteps, ehs, added_cond_kwargs=text.extra or None).sample

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        self.unet.train()  # diffusers checkpoints only in training mode; the frozen UNet has no dropout

    # ---- generation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, c, h, w] -> images [B, 3, H, W] in [0, 1]."""
        vae = self.get("vae")
        x = vae.decode(latents.to(vae.dtype) / float(vae.config.scaling_factor)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def generate(backbone: DiffusersBackbone, adapter: IPAdapter, clip_pixels: torch.Tensor, prompts: list[str],
             *, mode: str = "scaled", weight: float = 1.0, fusion_lambda: float = 0.8, steps: int = 20,
             guidance: float = 5.0, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Sample images with the adapter installed (DDIM, classifier-free guidance).

    The unconditional branch uses the empty prompt and the dropped-image input (zero embedding for plain,
    zero normalized pixels for plus); in fused mode only the conditional image tokens are fused, as in the
    original fused work.

    Args:
        clip_pixels: CLIP input of the reference image(s) [B, 3, 224, 224] (or [1, ...] for all prompts).
        prompts: one prompt per output image.
        mode: "scaled" or "fused".

    Returns:
        Images [B, 3, size, size] in [0, 1].
    """
    from diffusers import DDIMScheduler

    output: ClipOutput = adapter.config.clip_output
    b = len(prompts)
    backbone.detach()  # a training patch must not stay under the sampling one
    cond_clip = backbone.encode_image(clip_pixels, output)  # [1 or B, D] or [1 or B, L, D]
    if cond_clip.shape[0] != b:
        cond_clip = cond_clip.expand(b, *cond_clip.shape[1:])
    if output == "image_embeds":
        uncond_clip = torch.zeros_like(cond_clip)
    else:
        uncond_clip = backbone.encode_image(torch.zeros_like(clip_pixels[:1]), output).expand_as(cond_clip)
    text = backbone.encode_text(prompts).hidden
    empty = backbone.encode_text([""] * b).hidden
    adapter = adapter.to(backbone.device).eval()
    cond_tokens = adapter.project(cond_clip)
    if mode == "fused":
        cond_tokens = adapter.fuse(cond_tokens, text, fusion_lambda)
    tokens = torch.cat([adapter.project(uncond_clip), cond_tokens])  # [2B, T, C]
    patch = install_adapter(backbone.unet, adapter, weight=weight)
    try:
        ehs = patch.encoder_hidden_states(torch.cat([empty, text]), ip_tokens=tokens)  # [2B, S+T, C]
        sched = DDIMScheduler.from_config(backbone.get("scheduler").config)
        sched.set_timesteps(steps)
        vae_scale = 2 ** (len(backbone.get("vae").config.block_out_channels) - 1)
        channels = backbone.unet.config.in_channels
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(b, channels, size // vae_scale, size // vae_scale, generator=g).to(backbone.device)
        latents = latents * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents, latents]), t)
            uncond, cond = backbone.unet(x, t, ehs).sample.chunk(2)
            latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    finally:
        patch.remove()
    return backbone.decode(latents)
