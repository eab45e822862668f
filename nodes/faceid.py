"""FaceID nodes: the face models loader, the face encode node, and the FaceID LoRA the apply node adds to the model.

Math and the face pipeline live in `ipa_train` (`ipa_train.face`, `ipa_train.hosts.face_embeds`,
`ipa_train.adapter.faceid_lora`); this file translates ComfyUI types and folders.
"""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from .common import CATEGORY, Adapter, Embeds, clip_outputs, clip_outputs_of_zero_pixels, logger

FaceModels = io.Custom("IPAKIT_FACE_MODELS")
PACKS = ["buffalo_l", "antelopev2"]
PROVIDERS = ["auto", "cpu", "cuda", "rocm", "directml", "coreml", "openvino"]
COMBINE = ["concat", "add", "subtract", "average", "norm average", "max", "min"]
PLUS_UNCOND = ["zero-normalised (tencent, diffusers)", "black image (community pack)"]


def insightface_root() -> str:
    """`ComfyUI/models/insightface`, the folder the community pack reads (models/<name>/*.onnx below it)."""
    import folder_paths

    return os.path.join(folder_paths.models_dir, "insightface")


def model_packs() -> list[str]:
    root = os.path.join(insightface_root(), "models")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []
    return PACKS + [d for d in found if d not in PACKS]


class IPAKitLoadFaceModels(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitLoadFaceModels", display_name="Load Face Models (Kit)", category=f"{CATEGORY}/loaders",
            description="Loads InsightFace's face detector and recognizer ONNX files for FaceID, with onnxruntime only "
                        "(no insightface install). The models are for non-commercial research only.",
            inputs=[
                io.Combo.Input("models", options=model_packs(), default="buffalo_l", tooltip=(
                    "Folder under ComfyUI/models/insightface/models/ (the community pack's folder): buffalo_l for the "
                    "h94 FaceID adapters, antelopev2 for Kolors. Files are routed by their graph, not their names.")),
                io.Combo.Input("provider", options=PROVIDERS, default="auto", tooltip=(
                    "onnxruntime execution provider; auto = the fastest one your onnxruntime offers (CUDA, DirectML, "
                    "CoreML, ... then CPU).")),
                io.Float.Input("det_threshold", default=0.5, min=0.05, max=0.95, step=0.05,
                               tooltip="Minimum detection score of a face (InsightFace's default 0.5)."),
            ],
            outputs=[FaceModels.Output("face_models", display_name="face_models",
                                       tooltip="Face detector + recognizer, for Encode Face (Kit).")],
        )

    @classmethod
    def execute(cls, models="buffalo_l", provider="auto", det_threshold=0.5) -> io.NodeOutput:
        from ipa_train.face import FaceModels as Models
        from ipa_train.face import find_model_folder

        return io.NodeOutput(Models(find_model_folder(insightface_root(), models), provider, det_threshold))


def crop_size(adapter) -> int:
    """Aligned crop the plus variants' CLIP sees: 224 on SD1.5, 256 on SDXL (as the community pack crops)."""
    return 256 if adapter.config.family == "sdxl" else 224


def _uint8(image: torch.Tensor):
    return [img.numpy() for img in image.detach().float().cpu()]


def encode_faces(adapter, face_models, image, clip_vision=None, image_negative=None, combine="concat",
                 pick="score", skip_missing=False, faceid_v2_weight=1.0, plus_uncond=PLUS_UNCOND[0],
                 reference_weights="", per_frame=False):
    """-> (ImageEmbeds, aligned crops IMAGE [N, S, S, 3])."""
    from ipa_train.adapter.references import parse_weight_list
    from ipa_train.errors import IPAKitError
    from ipa_train.face import FaceAnalyzer
    from ipa_train.hosts.face_embeds import check_face_options, encode_face_embeds

    if not adapter.config.is_faceid:
        raise IPAKitError(f"Encode Face (Kit) needs a FaceID adapter; this one is {adapter.config.variant}: use Encode "
                          "Reference Image (Kit) for it")
    if face_models is None:
        raise IPAKitError("Encode Face (Kit): face_models is empty; connect Load Face Models (Kit), or the face_models "
                          "output of Load IP-Adapter Preset (Kit) with a FaceID preset")
    check_face_options(adapter.config, image_negative is not None, faceid_v2_weight)
    plus = adapter.config.clip_output == "penultimate"
    size = crop_size(adapter)
    faces = FaceAnalyzer(face_models, pick).analyze_batch(_uint8(image), (size,), skip_missing, what="image")
    kept = [f for f in faces if f is not None]
    if not kept:
        raise IPAKitError("no face found in any image of the batch; nothing to encode")
    normed = adapter.config.projection != "faceid-portrait-unnorm"
    emb = torch.stack([torch.from_numpy(f.normed_embedding if normed else f.embedding) for f in kept]).float()
    crops = torch.stack([torch.from_numpy(f.crops[size]).float() / 255.0 for f in kept])  # [N, S, S, 3]
    clip = clip_u = None
    if plus:
        if clip_vision is None:
            raise IPAKitError(f"this {adapter.config.variant} adapter also reads the face crop with CLIP vision "
                              f"({adapter.config.encoder}); connect a CLIP vision model to Encode Face (Kit)")
        clip = clip_outputs(clip_vision, crops, "center")[1]
        if image_negative is not None:
            clip_u = clip_outputs(clip_vision, image_negative, "center")[1]
        elif plus_uncond == PLUS_UNCOND[1]:
            clip_u = clip_outputs(clip_vision, torch.zeros(1, 224, 224, 3), "center")[1]
        else:
            clip_u = clip_outputs_of_zero_pixels(clip_vision)[1]
    weights = parse_weight_list(reference_weights or "") or None
    embeds = encode_face_embeds(adapter, emb, clip, clip_u, combine, weights, faceid_v2_weight, per_frame)
    logger.info("IPAKitEncodeFace: %d face(s) encoded for %s (%s)", len(kept), adapter.config.variant, embeds)
    return embeds, crops


class IPAKitEncodeFace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitEncodeFace", display_name="Encode Face (Kit)", category=CATEGORY,
            description="Detects, aligns and embeds the face in each reference image for a FaceID adapter; also "
                        "returns the aligned face crops so you see what was detected.",
            inputs=[
                Adapter.Input("adapter", tooltip="A FaceID adapter from Load IP-Adapter (Kit)."),
                FaceModels.Input("face_models", tooltip="From Load Face Models (Kit)."),
                io.Image.Input("image", tooltip="Reference image(s) with a face. A batch = several references (portrait: "
                                                "16 tokens per face), combined as below."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="FaceID-Plus / Plus v2 only: the CLIP vision model (ViT-H/14) that reads the face crop."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Plus only: image whose CLIP states replace the neutral unconditional ones."),
                io.Combo.Input("combine", options=COMBINE, default="concat", optional=True,
                               tooltip="Several faces: concat keeps every face's tokens; the others merge the face "
                                       "embeddings (and crop CLIP states) into one."),
                io.Combo.Input("pick", options=["score", "largest"], default="score", optional=True,
                               tooltip="Several faces in one image: the highest-scoring (InsightFace order) or the largest."),
                io.Boolean.Input("skip_missing", default=False, optional=True,
                                 tooltip="Off: an image without a face stops with its index. On: it is skipped (warned)."),
                io.Float.Input("faceid_v2_weight", default=1.0, min=-1.0, max=5.0, step=0.05, optional=True,
                               tooltip="Plus v2 only: s in tokens = ID + s x perceiver (tencent 1.0; the community "
                                       "pack's examples use 2.0)."),
                io.Combo.Input("plus_uncond", options=PLUS_UNCOND, default=PLUS_UNCOND[0], optional=True,
                               tooltip="Plus only, unconditional CLIP input: an all-zero normalised image (tencent, "
                                       "diffusers) or a black picture (the community pack)."),
                io.String.Input("reference_weights", default="", optional=True,
                                tooltip="One weight per face image, e.g. '1.0, 0.5' (empty = all 1)."),
                io.Boolean.Input("per_frame", default=False, optional=True,
                                 tooltip="Animation: face i drives latent frame i (the last repeats) instead of combining."),
            ],
            outputs=[
                Embeds.Output("embeds", display_name="embeds", tooltip="FaceID image tokens, for Apply IP-Adapter (Kit)."),
                io.Image.Output("faces", display_name="faces", tooltip="The aligned face crops that were encoded."),
            ],
        )

    @classmethod
    def execute(cls, adapter, face_models, image, clip_vision=None, image_negative=None, combine="concat", pick="score",
                skip_missing=False, faceid_v2_weight=1.0, plus_uncond=PLUS_UNCOND[0], reference_weights="",
                per_frame=False) -> io.NodeOutput:
        embeds, crops = encode_faces(adapter, face_models, image, clip_vision, image_negative, combine, pick,
                                     skip_missing, faceid_v2_weight, plus_uncond, reference_weights, per_frame)
        return io.NodeOutput(embeds, crops)


# --------------------------------------------------------------------------------------------------------
# The LoRA inside FaceID files, through ComfyUI's own LoRA machinery


def _model_sites(model):
    from ipa_train.adapter.layout import groups_from_blocks, sites_from_groups

    unet = model.get_model_object("diffusion_model")
    return sites_from_groups(groups_from_blocks(unet.input_blocks, unet.middle_block, unet.output_blocks))


def _already_patched(model, patches: dict) -> bool:
    """True when the model already carries these very LoRA matrices (the separate `_lora.safetensors` file)."""
    for key, patch in patches.items():
        for entry in model.patches.get(key, []):
            weights = getattr(entry[1], "weights", None)
            if weights and isinstance(weights[0], torch.Tensor) and weights[0].shape == patch.weights[0].shape:
                return bool(torch.equal(weights[0].float(), patch.weights[0].float()))
        return False
    return False


def apply_face_lora(model, adapter, strength: float = 1.0):
    """`model` with the adapter's embedded LoRA added as ComfyUI patches (a clone); unchanged without LoRA/strength 0."""
    import comfy.lora

    from ipa_train.adapter.faceid_lora import comfy_lora_state
    from ipa_train.errors import IPAKitError

    if not getattr(adapter, "lora", None) or strength == 0:
        return model
    lora = comfy_lora_state(adapter.lora, _model_sites(model))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    bases = {k.rsplit("_lora.", 1)[0] for k in lora}
    unmapped = sorted(b for b in bases if b not in key_map)
    if unmapped:
        raise IPAKitError(f"the FaceID LoRA of this {adapter.config.variant} adapter names {len(unmapped)} layers this "
                          f"model does not have (e.g. {unmapped[0]}); use the adapter made for this base model")
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    if _already_patched(model, patches):
        logger.warning("IPAKitApply: this model already carries the FaceID LoRA (the separate _lora.safetensors loaded "
                       "with a LoRA loader); the adapter applies it too, so it is now applied twice: remove the LoRA "
                       "loader or set faceid_lora_strength to 0")
    m = model.clone()
    m.add_patches(patches, strength)
    logger.info("IPAKitApply: FaceID LoRA (rank %d) on %d layers at strength %.2f", adapter.config.lora_rank,
                len(patches), strength)
    return m
