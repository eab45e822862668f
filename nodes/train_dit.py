"""The Flux / SD3.5 training backbone over the models a ComfyUI user already loaded (MODEL, CLIP, VAE, CLIP_VISION).

Implements `ipa_train.training.backbone.Backbone` for DiT families by translating to ComfyUI calls; nothing is
copied or loaded besides the user's models. The transformer runs through ComfyUI's own Flux / MMDiT forward with
this pack's `dit` block patches in training mode (`ipa_train.hosts.comfy.dit_train`): the same block code that
samples, with the adapter's tokens and K/V carrying gradients.

- Text: the loaded CLIP as ComfyUI's samplers use it (Flux: T5 hidden states + pooled CLIP-L; SD3: CLIP-L/G and
  T5 states joined + both pooled), one CLIP chunk and the T5 tokens capped at ComfyUI's own padding length so
  every caption (and the empty one) has the same length and batches stack.
- Images: the loaded CLIP_VISION at its own resolution and normalisation (SigLIP 384, 0.5/0.5): ViT-L
  `image_embeds` (XLabs), SigLIP penultimate states (SD3.5), SigLIP pooled through its attention-pooling head
  (InstantX Flux, the head read from a file in models/clip_vision as the encode node does).
- Latents: the VAE's, then the model's own `process_latent_in` (the family's scale and shift).
- Sigma -> the model's timestep through its own `model_sampling` (Flux sigma, SD3 sigma * 1000); Flux dev's
  guidance from the batch; the schedule's shift from the model's sampling (SD3: its `shift`).
"""

from __future__ import annotations

import torch

from .common import logger
from .train_backbone import LoadedEncoders, _make_autograd_safe, clip_vision_dims, compute_dtype

T5_TOKENS = {"flux": 256, "sd3": 77}  # ComfyUI's own T5 padding length per family


def dit_family(model) -> str:
    """"flux" | "sd3" for a Flux / MMDiT MODEL, "" otherwise (read from the model's modules, nothing loads)."""
    from ipa_train.hosts.comfy.dit_apply import model_family

    fam = model_family(model.get_model_object("diffusion_model"))
    return fam if fam in ("flux", "sd3") else ""


def _sizes(dm, family: str, clip_dims: dict):
    """BackboneSizes of a ComfyUI Flux / MMDiT from its layers' shapes."""
    from ipa_train.training.backbone import BackboneSizes

    if family == "flux":
        hidden, heads = int(dm.hidden_size), int(dm.num_heads)
        double, single = len(dm.double_blocks), len(dm.single_blocks)
        tokens_width = int(dm.txt_in.in_features)  # the T5 width the official Flux adapters' tokens have
    else:
        attn = dm.joint_blocks[0].x_block.attn
        hidden, heads = int(attn.qkv.in_features), int(attn.num_heads)
        double, single = len(dm.joint_blocks), 0
        tokens_width = hidden  # SD3.5's image tokens are as wide as the transformer
    return BackboneSizes(tokens_width, (hidden,) * (double + single), clip_dims, family=family,
                         double_blocks=double, single_blocks=single, head_dim=hidden // heads)


def _schedule(family: str, sampling):
    from ipa_train.training.schedules import DynamicShift, FlowMatchSchedule

    if family == "sd3":
        return FlowMatchSchedule(shift=float(getattr(sampling, "shift", 3.0)))
    return FlowMatchSchedule(shift=0.0, dynamic=DynamicShift())


class ComfyDitBackbone(LoadedEncoders):
    prediction_type = "flow"
    num_train_timesteps = 1000

    def __init__(self, model, clip, vae, clip_vision):
        import comfy.model_management as mm

        from ipa_train.training.backbone import ImageInput

        self.mm = mm
        self.base = model
        self.clip, self.vae, self.clip_vision = clip, vae, clip_vision
        self.family = dit_family(model)
        if not self.family:
            raise ValueError("ComfyDitBackbone takes a Flux or SD3 MODEL")
        dm = model.get_model_object("diffusion_model")
        self.sampling = model.get_model_object("model_sampling")
        dims = clip_vision_dims(clip_vision)
        dims["siglip_pooled"] = dims["penultimate"]  # the pooling head keeps the encoder's width
        self._sizes = _sizes(dm, self.family, dims)
        self.schedule = _schedule(self.family, self.sampling)
        self.guidance_input = self.family == "flux" and bool(getattr(dm.params, "guidance_embed", False))
        cv = clip_vision
        self.image_input = ImageInput(int(cv.image_size), tuple(float(x) for x in cv.image_mean),
                                      tuple(float(x) for x in cv.image_std))
        self.device = mm.get_torch_device()
        self.patched = None
        self._checkpointing = False
        self._told_truncated = False

    @property
    def sizes(self):
        return self._sizes

    def clip_embedding_dim(self, output: str) -> int:
        return self._sizes.clip_embedding_dim(output)

    # --- encoders (frozen, no grad)
    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # [B, H, W, 3] in 0..1, ComfyUI IMAGE
        with torch.no_grad():
            latent = self.base.model.process_latent_in(self.vae.encode(image)).float().cpu()  # (x - shift) * scale
        return latent, torch.zeros_like(latent)  # ComfyUI's VAE returns the distribution's mode

    def _tokens(self, caption: str):
        """The CLIP's tokens of one caption with its first CLIP chunk and at most T5_TOKENS T5 tokens."""
        tokens = self.clip.tokenize(caption)
        if not isinstance(tokens, dict):
            return tokens
        cap = T5_TOKENS[self.family]
        cut = {k: (v[:1] if k != "t5xxl" else [v[0][:cap]]) for k, v in tokens.items() if v}
        if any(len(v) > 1 for k, v in tokens.items() if k != "t5xxl") or len(tokens.get("t5xxl", [[]])[0]) > cap:
            if not self._told_truncated:
                logger.warning("IPAKitTrain: captions longer than 75 CLIP / %d T5 tokens are cut there for training "
                               "(e.g. %r)", cap, caption[:60])
                self._told_truncated = True
        return {**tokens, **cut}

    def encode_text(self, captions: list[str]):
        from ipa_train.training.backbone import TextCondition

        rows, pooled = [], []
        with torch.no_grad():
            for caption in captions:
                cond, pool = self.clip.encode_from_tokens(self._tokens(caption), return_pooled=True)
                rows.append(cond.float().cpu())  # Flux [1, 256, 4096]; SD3 [1, 77 + 77, 4096]
                pooled.append(pool.float().cpu())  # Flux [1, 768]; SD3 [1, 2048]
        return TextCondition(hidden=torch.cat(rows), extra={"pooled": torch.cat(pooled)})

    def encode_image(self, clip_pixels: torch.Tensor, output: str) -> torch.Tensor:
        cv = self.clip_vision
        self.mm.load_model_gpu(cv.patcher)
        with torch.no_grad():
            last, penultimate, embeds = cv.model(pixel_values=clip_pixels.to(cv.load_device), intermediate_output=-2)[:3]
            if output == "image_embeds":
                return embeds.float().cpu()
            if output == "penultimate":
                return penultimate.float().cpu()
            from .dit import _pooling_head

            return _pooling_head()(last.float().cpu())  # SigLIP pooled [B, 1152]

    # --- adapter
    def init_adapter(self, adapter) -> None:
        """A DiT adapter initialises itself (`init_for_training`); nothing is read from the model."""

    def attach(self, adapter) -> None:
        from ipa_train.hosts.comfy.dit_train import TrainingApplication, check_fit, training_patches

        dm = self.base.get_model_object("diffusion_model")
        self.adapter = adapter
        self.app = TrainingApplication(adapter, check_fit(adapter, dm, "IPAKitTrain"))
        m = self.base.clone()
        existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        if existing:
            logger.warning("IPAKitTrain: the MODEL carries %d block patches (another adapter applied?); training "
                           "replaces them with the adapter being trained: connect the plain model", len(existing))
        self.patches = training_patches(dm, self.app, self._checkpointing)
        for (kind, i), patch in self.patches.items():
            m.set_model_patch_replace(patch, "dit", kind, i)
        self.mm.load_models_gpu([m], force_full_load=True)
        _make_autograd_safe(m.model.diffusion_model)
        m.model.requires_grad_(False)
        self.patched = m

    def predict(self, noisy, timesteps, text, ip_tokens):
        from ipa_train.hosts.comfy.dit_train import predict

        m = self.patched
        dtype = compute_dtype(m)  # the adapter stays fp32 (master weights); the model computes in its dtype
        temb = ip_tokens.temb.to(self.device) if ip_tokens.temb is not None else None
        guidance = text.extra.get("guidance")
        out = predict(m.model.diffusion_model, self.sampling, self.app, noisy.to(self.device, dtype),
                      timesteps.to(self.device).float(), text.hidden.to(self.device, dtype),
                      text.extra["pooled"].to(self.device, dtype), ip_tokens.tokens.to(self.device), temb,
                      None if guidance is None else guidance.to(self.device).float(),
                      m.model_options.get("transformer_options", {}))
        return out.float()

    def enable_gradient_checkpointing(self) -> None:
        """Every transformer block recomputed in the backward pass (activation memory of one block at a time)."""
        self._checkpointing = True
        for patch in getattr(self, "patches", {}).values():
            patch.use_checkpoint = True


_ENCODER = {"xlabs-flux": "CLIP ViT-L/14 (clip-vit-large-patch14.safetensors)",
            "instantx-flux": "SigLIP so400m/14-384 with its pooling head (google/siglip-so400m-patch14-384)",
            "instantx-sd3": "SigLIP so400m/14-384 (sigclip_vision_patch14_384.safetensors)"}
_FAMILY = {"flux": "Flux", "sd3": "SD3.5", "": "UNet (SD1.5 / SDXL)"}


def _is_siglip(clip_vision) -> bool:
    dims = clip_vision_dims(clip_vision)
    return dims["penultimate"] == 1152 and dims["image_embeds"] == 1152


def training_format(model, clip_vision, fmt: str, projection: str, fusion: bool, adapter=None) -> str:
    """The DiT layout IPAKitTrain trains ("" for a UNet model), checked against the MODEL, the CLIP vision model,
    the projection options and the adapter to fine-tune, before any work; one line naming the fix otherwise.
    auto: SD3 -> instantx-sd3; Flux -> the fine-tuned adapter's format, else instantx-flux with a SigLIP
    encoder and xlabs-flux with CLIP ViT-L."""
    from ipa_train.errors import TrainConfigError
    from ipa_train.training.config import DIT_TRAIN_FORMATS

    from .dit import is_dit

    family = dit_family(model)
    if not family:
        if fmt != "auto":
            raise TrainConfigError(f"IPAKitTrain: format {fmt} trains a {_FAMILY[DIT_TRAIN_FORMATS[fmt][0]]} adapter, "
                                   "but the MODEL is a UNet (SD1.5 / SDXL) model: set format to auto, or load a "
                                   f"{_FAMILY[DIT_TRAIN_FORMATS[fmt][0]]} model")
        if adapter is not None and is_dit(adapter):
            raise TrainConfigError(f"IPAKitTrain: the adapter to fine-tune is {adapter.config.format} "
                                   f"({_FAMILY[adapter.config.family]}), but the MODEL is a UNet model: connect a "
                                   f"{_FAMILY[adapter.config.family]} model or an SD1.5 / SDXL adapter")
        return ""
    _check_architecture(model.get_model_object("diffusion_model"), family)
    if adapter is not None and not is_dit(adapter):
        raise TrainConfigError(f"IPAKitTrain: the adapter to fine-tune is a UNet ({adapter.config.variant}) adapter, "
                               f"but the MODEL is {_FAMILY[family]}: connect an official {_FAMILY[family]} adapter, "
                               "or none to train from scratch")
    if fmt == "auto":
        fmt = (adapter.config.format if adapter is not None else "instantx-sd3" if family == "sd3"
               else "instantx-flux" if _is_siglip(clip_vision) else "xlabs-flux")
    want = DIT_TRAIN_FORMATS[fmt][0]
    if want != family:
        options = ", ".join(f for f, (fam, _) in DIT_TRAIN_FORMATS.items() if fam == family)
        raise TrainConfigError(f"IPAKitTrain: format {fmt} is a {_FAMILY[want]} layout, but the MODEL is "
                               f"{_FAMILY[family]}: set format to {options} (or auto)")
    if adapter is not None and adapter.config.format != fmt:
        raise TrainConfigError(f"IPAKitTrain: the adapter to fine-tune is {adapter.config.format}, the format option "
                               f"says {fmt}: set format to {adapter.config.format} (or auto)")
    if projection != "plain" or fusion:
        raise TrainConfigError(f"IPAKitTrain: projection {projection}{' and fusion' if fusion else ''} are SD1.5 / "
                               f"SDXL options; the {fmt} format sets its own projection: set projection to plain "
                               "and fusion off")
    _check_encoder(clip_vision, fmt)
    return fmt


def _check_architecture(dm, family: str) -> None:
    """Flux.2 / Chroma (shared modulation) and SD3.5 Medium (second self-attention) are not what the official
    layouts patch: one line before any work."""
    from ipa_train.errors import TrainConfigError

    if family == "flux" and (getattr(getattr(dm, "params", None), "global_modulation", False)
                             or not getattr(dm.double_blocks[0], "modulation", True)):
        raise TrainConfigError("IPAKitTrain: this Flux-type MODEL (Flux.2 / Chroma) modulates its blocks from a "
                               "shared tuple; the Flux adapter layouts are made for FLUX.1: load a FLUX.1 dev or "
                               "schnell model")
    if family == "sd3" and any(getattr(b.x_block, "x_block_self_attn", False) for b in dm.joint_blocks):
        raise TrainConfigError("IPAKitTrain: this MMDiT MODEL has a second self-attention per block (SD3.5 Medium); "
                               "the instantx-sd3 layout is made for SD3.5 Large: load SD3.5 Large")


def _check_encoder(clip_vision, fmt: str) -> None:
    from ipa_train.errors import EncoderMismatchError

    dims = clip_vision_dims(clip_vision)
    siglip = _is_siglip(clip_vision)
    fits = dims["image_embeds"] == 768 and not siglip if fmt == "xlabs-flux" else siglip
    if not fits:
        got = "SigLIP so400m" if siglip else f"a CLIP vision model (width {dims['penultimate']}, projection " \
                                             f"{dims['image_embeds']})"
        raise EncoderMismatchError(f"IPAKitTrain: format {fmt} reads {_ENCODER[fmt]}, but the connected CLIP_VISION "
                                   f"is {got}: load that encoder in Load CLIP Vision")
    if fmt == "instantx-flux":
        from .dit import _pooling_head

        _pooling_head()  # one line naming the file with the head when none in models/clip_vision has it
