"""The training backbone over diffusers Flux and SD3.5 folders: `FluxTransformer2DModel` / `SD3Transformer2DModel`
with their text encoders (Flux: CLIP-L + T5; SD3: CLIP-L + CLIP-G + T5), the 16-channel VAE and the adapter's image
encoder (SigLIP so400m for InstantX, CLIP ViT-L/14 for XLabs).

As the UNet backbone, components load lazily: training reads sizes from configs, encodes and caches the
dataset, releases the encoders (T5-XXL alone is 4.7 B parameters), and only then loads the transformer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..adapter.dit_modules import DitAdapter, ImageTokens
from ..errors import IPAKitError
from ..training.backbone import CLIP_INPUT, BackboneSizes, ImageInput, TextCondition
from ..training.dit import transformer_family
from ..training.schedules import DynamicShift, FlowMatchSchedule
from .backbone_diffusers import DiffusersBackbone
from .diffusers_flux import install_flux, predict_flux, restore
from .diffusers_sd3 import install_sd3, predict_sd3, restore_sd3

logger = logging.getLogger(__name__)

_CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}
_TEXT = {"flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}


class DitBackbone(DiffusersBackbone):
    """`ipa_train.training.train.Backbone` for a diffusers Flux.1 or SD3.5 model (see the `Backbone` docstring for
    the DiT attributes: `schedule`, `guidance_input`, `image_input`).

    Args (besides `DiffusersBackbone`'s): transformer_dtype: dtype of the frozen transformer (bf16 for a 12 B Flux
    on one GPU); max_sequence_length: T5 tokens per prompt (Flux dev 512, SD3 256 as their pipelines); family:
    "flux" | "sd3" when the caller knows it (a hub id whose transformer config is not in the hub cache yet).
    """

    def __init__(self, *args: Any, transformer_dtype: torch.dtype = torch.float32, max_sequence_length: int = 512,
                 family: str | None = None, **kwargs: Any):
        self.transformer_dtype = transformer_dtype
        self.max_sequence_length = max_sequence_length
        self._family: str | None = family  # given for a hub id whose transformer config is not downloaded yet
        self._saved: Any = None
        self.installed: tuple[Any, DitAdapter] | None = None
        super().__init__(*args, **kwargs)
        self.parts = {"vae": ("vae",), "text": _TEXT[self.family], "image": ("image_encoder",)}

    def _extra_loaders(self) -> dict[str, Any]:
        tf = "transformers"
        return {
            "transformer": lambda: self._from_base("diffusers", self._transformer_class(), "transformer"),
            "text_encoder": lambda: self._from_base(tf, "CLIPTextModel" if self.family == "flux"  # SD3: pooled text_embeds
                                                    else "CLIPTextModelWithProjection", "text_encoder"),
            "text_encoder_2": lambda: self._from_base(tf, "T5EncoderModel" if self.family == "flux"
                                                      else "CLIPTextModelWithProjection", "text_encoder_2"),
            "tokenizer_2": lambda: self._from_base(tf, "AutoTokenizer",
                                                   "tokenizer_2"),
            "text_encoder_3": lambda: self._from_base(tf, "T5EncoderModel", "text_encoder_3"),
            "tokenizer_3": lambda: self._from_base(tf, "AutoTokenizer", "tokenizer_3"),
        }

    def _transformer_class(self) -> str:
        return next(k for k, v in _CLASSES.items() if v == self.family)

    def _read_schedule(self) -> None:
        """Flow matching, the family's defaults: SD3 shift 3.0, Flux the resolution-dependent shift."""
        self.prediction_type = "flow"
        self.num_train_timesteps = 1000
        self.schedule = (FlowMatchSchedule(shift=0.0, dynamic=DynamicShift()) if self.family == "flux"
                         else FlowMatchSchedule(shift=3.0))

    def _prepare(self, name: str, module: Any) -> Any:
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval().to(self.device)
            dtype = self.transformer_dtype if name == "transformer" else self.encoder_dtype
            if dtype != torch.float32:
                module.to(dtype=dtype)
        return module

    # ---- sizes (configs only) -----------------------------------------------------------------------------

    def _transformer_shape(self) -> Any:
        import diffusers

        return self._model_shape("transformer", getattr(diffusers, self._transformer_class()))

    @property
    def family(self) -> str:
        if self._family is None:
            module = self._models.get("transformer")
            if module is None and "transformer" in self._factories:
                module = self._meta("transformer")
            found = _CLASSES.get(type(module).__name__) if module is not None else None
            found = found or (transformer_family(self.base_model) if self.base_model else None)
            if found is None:
                raise IPAKitError(f"{self.base_model}: no Flux or SD3 transformer (transformer/config.json naming "
                                  "FluxTransformer2DModel or SD3Transformer2DModel); give a diffusers Flux.1 or "
                                  "SD3.5 folder")
            self._family = found
        return self._family

    @property
    def sizes(self) -> BackboneSizes:
        if self._sizes is None:
            c = self._transformer_shape().config
            width = int(c.num_attention_heads * c.attention_head_dim)
            double, single = int(c.num_layers), int(getattr(c, "num_single_layers", 0) or 0)
            vision = self._vision_config()
            dims = {}
            if vision is not None:
                siglip = "siglip" in type(vision).__name__.lower()
                dims = ({"siglip_pooled": int(vision.hidden_size), "penultimate": int(vision.hidden_size)} if siglip
                        else {"image_embeds": int(vision.projection_dim), "penultimate": int(vision.hidden_size)})
            context = int(c.joint_attention_dim) if self.family == "flux" else width
            self._sizes = BackboneSizes(context, (width,) * (double + single), dims, self.family, double, single,
                                        int(c.attention_head_dim))
        return self._sizes

    @property
    def guidance_input(self) -> bool:
        return self.family == "flux" and bool(getattr(self._transformer_shape().config, "guidance_embeds", False))

    @property
    def image_input(self) -> ImageInput:
        vision = self._vision_config()
        if vision is None or "siglip" not in type(vision).__name__.lower():
            return CLIP_INPUT
        return ImageInput(int(vision.image_size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def _load_image_encoder(self, config_only: bool = False) -> Any:
        """CLIPVisionModelWithProjection (XLabs) or SiglipVisionModel (InstantX), by the folder's config."""
        from transformers import AutoConfig, CLIPVisionModelWithProjection, SiglipVisionModel

        if self.image_encoder_path is None:
            raise IPAKitError("no image encoder given: pass --image-encoder (google/siglip-so400m-patch14-384 for the "
                              "InstantX formats, openai/clip-vit-large-patch14 for xlabs-flux)")
        try:
            config = AutoConfig.from_pretrained(self.image_encoder_path)
            config = getattr(config, "vision_config", config)
            if config_only:
                return config
            cls = SiglipVisionModel if "siglip" in type(config).__name__.lower() else CLIPVisionModelWithProjection
            return cls.from_pretrained(self.image_encoder_path)
        except (OSError, ValueError) as e:
            raise IPAKitError(f"cannot load the image encoder {self.image_encoder_path!r} ({str(e).splitlines()[0]}); "
                              "give a SigLIP or CLIP vision folder or hub id") from None

    # ---- encoders ---------------------------------------------------------------------------------------------

    def _ids(self, tokenizer: str, captions: list[str], length: int) -> torch.Tensor:
        tok = self.get(tokenizer)
        return tok(captions, max_length=length, padding="max_length", truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    def _t5(self, name: str, tokenizer: str, captions: list[str]) -> torch.Tensor:
        return self.get(name)(self._ids(tokenizer, captions, self.max_sequence_length))[0].float()  # [B, S, 4096]

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> TextCondition:
        clip_len = self.get("tokenizer").model_max_length
        if self.family == "flux":
            pooled = self.get("text_encoder")(self._ids("tokenizer", captions, clip_len)).pooler_output.float()
            return TextCondition(self._t5("text_encoder_2", "tokenizer_2", captions), {"pooled": pooled})
        states, pools = [], []
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            out = self.get(enc)(self._ids(tok, captions, clip_len), output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pools.append(out.text_embeds.float())
        t5 = self._t5("text_encoder_3", "tokenizer_3", captions)
        clip = torch.cat(states, dim=-1)  # [B, 77, 768 + 1280]
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextCondition(torch.cat([clip, t5], dim=1), {"pooled": torch.cat(pools, dim=-1)})

    @torch.no_grad()
    def encode_image(self, clip_pixels: torch.Tensor, output: str) -> torch.Tensor:
        enc = self.get("image_encoder")
        x = clip_pixels.to(self.device, enc.dtype)
        if output == "image_embeds":
            return enc(x).image_embeds.float()  # [B, 768]
        if output == "siglip_pooled":
            return enc(x).pooler_output.float()  # [B, 1152]
        return enc(x, output_hidden_states=True).hidden_states[-2].float()  # [B, L, D]

    # ---- the transformer --------------------------------------------------------------------------------------

    @property
    def transformer(self) -> Any:
        return self.get("transformer")

    @property
    def denoiser(self) -> Any:
        return self.transformer

    def init_adapter(self, adapter: Any) -> None:
        """Nothing to read from the transformer: a DiT adapter starts from `init_for_training`."""

    def attach(self, adapter: DitAdapter) -> None:
        self.detach()
        install = install_flux if self.family == "flux" else install_sd3
        self._saved = install(self.transformer, adapter)
        self.installed = (self.transformer, adapter)

    def detach(self) -> None:
        if self._saved is not None:
            if self.family == "flux":
                restore(self._saved)
            else:
                restore_sd3(self.transformer, self._saved)
            self._saved = None
            self.installed = None

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextCondition,
                ip_tokens: ImageTokens) -> torch.Tensor:
        if self.installed is None:
            raise IPAKitError("no adapter attached: call attach(adapter) before predict")
        if self.family == "flux":
            return predict_flux(self.transformer, noisy, timesteps, text.hidden, text.extra["pooled"],
                                text.extra.get("guidance"), ip_tokens).float()
        return predict_sd3(self.transformer, noisy, timesteps, text.hidden, text.extra["pooled"], ip_tokens).float()

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    @property
    def size_conditioning(self) -> bool:
        return False
