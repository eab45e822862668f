"""The training backbone over the models a ComfyUI user already loaded (MODEL, CLIP, VAE, CLIP_VISION).

Implements `ipa_train.training.train.Backbone` by translating to ComfyUI calls; no second copy of the model is made.
The UNet runs with this pack's own attn2 patch, and gradients reach the adapter through it: each `predict`
computes the image K/V of every layer from the (trainable) image tokens and hands them to the patch for
that call only.

SDXL: the pooled text embedding comes from the user's CLIP with the hidden states, each sample's size/crop
conditioning from the dataset (`time_ids`), and both become the UNet's `y` vector through the model's own
`encode_adm`, exactly as ComfyUI's samplers condition SDXL.

Memory: sizes are read from the modules' shapes (nothing runs, nothing moves to the device); once every embedding
is cached, the user's encoders are unloaded from the device through ComfyUI's model management (the models stay
the user's, in RAM) before the UNet is loaded for training.
"""

from __future__ import annotations

import torch

from .common import host_text_attention


def _make_autograd_safe(module: torch.nn.Module) -> None:
    """Weights loaded while ComfyUI ran a node are inference tensors, which autograd may not save for backward.
    Swap each for a normal tensor with the same values (done once; the model computes exactly as before)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def clip_vision_dims(clip_vision) -> dict[str, int]:
    """Output widths of ComfyUI's CLIP vision model from its layers' shapes (no forward pass, no device load):
    image_embeds [B, D] = the projection's output width, penultimate hidden states [B, L, D] = the encoder's width."""
    model = clip_vision.model
    norm = getattr(getattr(model, "vision_model", None), "post_layernorm", None)
    if not isinstance(norm, torch.nn.LayerNorm):
        raise ValueError(f"this CLIP_VISION ({type(model).__name__}) is not a CLIP vision model; load the CLIP vision "
                         "encoder the adapter is for (ViT-H/14 for the official SD1.5 layouts)")
    width = int(norm.normalized_shape[0])
    proj = getattr(model, "visual_projection", None)
    return {"image_embeds": int(proj.out_features) if isinstance(proj, torch.nn.Linear) else width,
            "penultimate": width}


def compute_dtype(model) -> torch.dtype:
    """The dtype a ComfyUI MODEL computes in: its weights' dtype, or the manual-cast one (fp8-stored weights)."""
    inner = model.model
    return getattr(inner, "manual_cast_dtype", None) or inner.get_dtype()


def mixed_precision_for(model, device) -> str:
    """TrainConfig.mixed_precision matching a half-precision model on a GPU: autocast and, for fp16, loss scaling
    (gradients of fp16 activations underflow without it). The adapter's weights stay fp32 either way."""
    if torch.device(device).type != "cuda":
        return "no"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(compute_dtype(model), "no")


def _prediction_type(model, model_types) -> str:
    """epsilon or v_prediction from the MODEL's type; other parameterisations (EDM, flow) are refused."""
    kind = model.model.model_type
    if kind in (model_types.EPS, model_types.V_PREDICTION):
        return "v_prediction" if kind == model_types.V_PREDICTION else "epsilon"
    raise ValueError(f"this MODEL predicts {kind.name}; training inside ComfyUI supports epsilon and v-prediction "
                     "checkpoints (SD1.x/SD2.x, SDXL): load one of those as the base model")


class LoadedEncoders:
    """What every backbone over the user's loaded models shares: handing the encoders back once embeddings are cached."""

    def release(self, parts: tuple[str, ...]) -> None:
        """Every embedding is cached: unload these encoders from the device so the UNet gets its memory."""
        for part in parts:
            attr = {"vae": "vae", "text": "clip", "image": "clip_vision"}[part]
            owner = getattr(self, attr)
            if getattr(owner, "patcher", None) is not None:  # another pack's encoder may have no patcher
                self._unload(owner.patcher)
            setattr(self, attr, None)
        self.mm.soft_empty_cache()

    def _unload(self, patcher) -> None:
        """ComfyUI's own unload of one loaded model (its weights go back to the offload device)."""
        loaded = self.mm.current_loaded_models
        for i in reversed(range(len(loaded))):
            if loaded[i].model is patcher and loaded[i].model_unload():
                loaded.pop(i)


class ComfyBackbone(LoadedEncoders):
    def __init__(self, model, clip, vae, clip_vision):
        import comfy.model_base
        import comfy.model_management as mm

        from ipa_train.adapter.layout import context_dim_of_blocks, groups_from_blocks, sites_from_groups

        self.mm = mm
        self.base = model
        self.clip, self.vae, self.clip_vision = clip, vae, clip_vision
        unet = model.get_model_object("diffusion_model")
        blocks = (unet.input_blocks, unet.middle_block, unet.output_blocks)
        self.sites = sites_from_groups(groups_from_blocks(*blocks))
        if not self.sites:
            raise ValueError("this MODEL has no cross-attention layers an IP-Adapter could train on (is it a UNet model?)")
        self.cross_attention_dim = int(context_dim_of_blocks(*blocks))
        self.size_conditioning = isinstance(model.model, comfy.model_base.SDXL)  # pooled text + time_ids -> y
        if getattr(model.model, "adm_channels", 0) and not self.size_conditioning:
            raise ValueError(
                f"this MODEL ({type(model.model).__name__}) takes a conditioning vector other than SDXL's; training "
                "inside ComfyUI supports SD1.x/SD2.x and SDXL checkpoints: load one of those as the base model")
        self.prediction_type = _prediction_type(model, comfy.model_base.ModelType)
        sampling = model.get_model_object("model_sampling")
        self.sigmas = sampling.sigmas.detach().float().cpu()  # [1000], sigma of each DDPM timestep
        self.num_train_timesteps = int(self.sigmas.shape[0])
        self.device = mm.get_torch_device()
        self.patched = None
        self._clip_dims = clip_vision_dims(clip_vision)  # read now: the encoder may be released before a later ask

    # --- sizes (shapes of the user's modules: nothing is loaded)
    @property
    def sizes(self):
        from ipa_train.training.backbone import BackboneSizes

        return BackboneSizes(self.cross_attention_dim, tuple(s.hidden for s in self.sites), dict(self._clip_dims))

    def clip_embedding_dim(self, output: str) -> int:
        return self._clip_dims[output]

    def layer_hidden_sizes(self) -> list[int]:
        return [s.hidden for s in self.sites]

    # --- encoders (frozen, no grad)
    def encode_latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # [B, H, W, 3] in 0..1, ComfyUI IMAGE
        with torch.no_grad():
            latent = self.vae.encode(image)
            latent = self.base.model.process_latent_in(latent).float().cpu()
        return latent, torch.zeros_like(latent)  # ComfyUI's VAE returns the distribution's mode

    def encode_text(self, captions: list[str]):
        from ipa_train.training.train import TextCondition

        rows, pooled = [], []
        with torch.no_grad():
            for caption in captions:
                tokens = self.clip.tokenize(caption)
                if not self.size_conditioning:
                    rows.append(self.clip.encode_from_tokens(tokens).float().cpu())  # [1, 77, C]
                    continue
                cond, pool = self.clip.encode_from_tokens(tokens, return_pooled=True)  # [1, 77, C], [1, P]
                rows.append(cond.float().cpu())
                pooled.append(pool.float().cpu())
        extra = {"text_embeds": torch.cat(pooled)} if pooled else {}
        return TextCondition(hidden=torch.cat(rows), extra=extra)

    def _clip(self, clip_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cv = self.clip_vision
        self.mm.load_model_gpu(cv.patcher)
        with torch.no_grad():
            out = cv.model(pixel_values=clip_pixels.to(cv.load_device), intermediate_output=-2)
        return out[2].float().cpu(), out[1].float().cpu()

    def encode_image(self, clip_pixels: torch.Tensor, output: str) -> torch.Tensor:
        embeds, hidden = self._clip(clip_pixels)
        return embeds if output == "image_embeds" else hidden

    # --- DDPM noise schedule from the model's own sigmas
    def _alphas(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigmas[timesteps.long().cpu()].to(like)
        a = (1.0 / (1.0 + sigma**2)).sqrt().view(-1, 1, 1, 1)  # sqrt(alpha_bar)
        s = (sigma**2 / (1.0 + sigma**2)).sqrt().view(-1, 1, 1, 1)  # sqrt(1 - alpha_bar)
        return a, s

    def add_noise(self, latents, noise, timesteps):
        a, s = self._alphas(timesteps, latents)
        return a * latents + s * noise

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._alphas(timesteps, latents)
        return a * noise - s * latents

    # --- adapter
    def init_adapter(self, adapter) -> None:
        attn = self._attn2_modules(self.base.get_model_object("diffusion_model"))
        with torch.no_grad():
            for site, layer in zip(self.sites, adapter.layers):
                a = attn[site.key]
                layer.to_k_ip.weight.copy_(a.to_k.weight.float().cpu())
                layer.to_v_ip.weight.copy_(a.to_v.weight.float().cpu())

    @staticmethod
    def _transformer_blocks(unet) -> dict:
        out = {}
        for section, blocks in (("input", list(unet.input_blocks)), ("middle", [unet.middle_block]),
                                ("output", list(unet.output_blocks))):
            for block_id, block in enumerate(blocks):
                for layer in block.children():
                    for i, tb in enumerate(getattr(layer, "transformer_blocks", []) or []):
                        out[(section, 0 if section == "middle" else block_id, i)] = tb
        return out

    @classmethod
    def _attn2_modules(cls, unet) -> dict:
        return {k: tb.attn2 for k, tb in cls._transformer_blocks(unet).items()}

    def attach_lora(self, lora) -> None:
        """FaceID: the LoRA on attn1 and attn2 of every site (processors 2k and 2k+1, diffusers order), by forward
        hooks on the shared UNet modules: `detach_lora` must run when training ends."""
        from ipa_train.training.faceid import hook_lora

        self.detach_lora()
        blocks = self._transformer_blocks(self.base.get_model_object("diffusion_model"))
        attentions = [getattr(blocks[site.key], f"attn{n}") for site in self.sites for n in (1, 2)]
        names = [f"{site.key}.attn{n}" for site in self.sites for n in (1, 2)]
        self._lora_hooks = hook_lora(attentions, lora, names)

    def detach_lora(self) -> None:
        for handle in getattr(self, "_lora_hooks", []):
            handle.remove()
        self._lora_hooks = []

    def attach(self, adapter) -> None:
        from ipa_train.hosts.comfy.unet import AdapterApplication, ImageEmbeds, chain_patches

        self.adapter = adapter
        zeros = torch.zeros(1, 1, adapter.config.cross_attention_dim)
        self.app = AdapterApplication(adapter, ImageEmbeds(zeros, zeros, adapter.config.variant), [1.0] * len(self.sites))
        m = self.base.clone()
        existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for key, patch in chain_patches(existing, self.app, self.sites, host_text_attention).items():
            m.set_model_attn2_replace(patch, *key)
        self.mm.load_models_gpu([m], force_full_load=True)
        _make_autograd_safe(m.model.diffusion_model)
        self.patched = m
        m.model.requires_grad_(False)

    def predict(self, noisy, timesteps, text, ip_tokens):
        from ipa_train.hosts.comfy.unet import CALL_KV_KEY

        m = self.patched
        dtype = compute_dtype(m)  # the adapter stays fp32 (master weights); its K/V enter the UNet in this dtype
        to = dict(m.model_options.get("transformer_options", {}))
        kv = [(k.to(self.device, dtype), v.to(self.device, dtype)) for k, v in self.adapter.image_kv(ip_tokens.to(self.device))]
        to[CALL_KV_KEY] = {self.app.uid: kv}
        to["cond_or_uncond"] = [0]
        unet = m.model.diffusion_model
        extra = {"y": self._adm(text).to(self.device, dtype)} if self.size_conditioning else {}
        out = unet(noisy.to(self.device, dtype), timesteps.to(self.device).float(),
                   context=text.hidden.to(self.device, dtype), transformer_options=to, **extra)
        return out.float()

    def _adm(self, text) -> torch.Tensor:
        """SDXL's `y` [B, P + 6 * 256]: the model's own encode_adm of each sample's pooled text [P] and time_ids [6]
        (original height/width, crop top/left, target height/width), one row at a time (sizes differ per image)."""
        rows = []
        for pooled, ids in zip(text.extra["text_embeds"], text.extra["time_ids"].tolist()):
            h, w, top, left, th, tw = ids
            rows.append(self.base.model.encode_adm(pooled_output=pooled[None].float().cpu(), height=h, width=w,
                                                   crop_h=top, crop_w=left, target_height=th, target_width=tw))
        return torch.cat(rows)

    def enable_gradient_checkpointing(self) -> None:
        from .common import logger

        logger.warning("IPAKitTrain: gradient checkpointing is not available inside ComfyUI; training without it")
