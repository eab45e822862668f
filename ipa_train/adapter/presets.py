"""Preset lookup: the adapter and CLIP vision files of a preset, found in folder listings by name (host-free).

The official files (h94/IP-Adapter on Hugging Face) and the names people commonly rename them to are matched
case-insensitively, ignoring '-', '_', '.', spaces and the extension, anywhere in a sub-folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import IPAKitError

HUB = "https://huggingface.co/h94/IP-Adapter/tree/main"
VIT_H, VIT_G = "ViT-H/14", "ViT-bigG/14"
CLIP_FILES = {
    VIT_H: (("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision_h.safetensors", "ViT-H-14.safetensors",
             "ip-adapter_image_encoder_sd15.safetensors", "image_encoder_vit-h.safetensors"),
            f"{HUB}/models/image_encoder (model.safetensors, rename it CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)"),
    VIT_G: (("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", "clip_vision_g.safetensors", "ViT-bigG-14.safetensors",
             "image_encoder_vit-bigg.safetensors"),
            f"{HUB}/sdxl_models/image_encoder (model.safetensors, rename it CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors)"),
}


@dataclass(frozen=True)
class PresetFiles:
    names: tuple[str, ...]  # official name first, then accepted renames
    encoder: str
    published: str


def _p(names: tuple[str, ...], encoder: str, sub: str) -> PresetFiles:
    return PresetFiles(names, encoder, f"{HUB}/{sub}")


PRESETS: dict[str, dict[str, PresetFiles]] = {
    "light": {"sd15": _p(("ip-adapter_sd15_light_v11.bin", "ip-adapter_sd15_light.safetensors"), VIT_H, "models")},
    "standard": {"sd15": _p(("ip-adapter_sd15.safetensors", "ip-adapter_sd15.bin"), VIT_H, "models"),
                 "sdxl": _p(("ip-adapter_sdxl_vit-h.safetensors", "ip-adapter_sdxl_vit-h.bin"), VIT_H, "sdxl_models")},
    "vit-G": {"sd15": _p(("ip-adapter_sd15_vit-G.safetensors", "ip-adapter_sd15_vit-G.bin"), VIT_G, "models"),
              "sdxl": _p(("ip-adapter_sdxl.safetensors", "ip-adapter_sdxl.bin"), VIT_G, "sdxl_models")},
    "plus": {"sd15": _p(("ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sd15.bin"), VIT_H, "models"),
             "sdxl": _p(("ip-adapter-plus_sdxl_vit-h.safetensors", "ip-adapter-plus_sdxl_vit-h.bin"), VIT_H, "sdxl_models")},
    "plus face": {"sd15": _p(("ip-adapter-plus-face_sd15.safetensors", "ip-adapter-plus-face_sd15.bin"), VIT_H, "models"),
                  "sdxl": _p(("ip-adapter-plus-face_sdxl_vit-h.safetensors", "ip-adapter-plus-face_sdxl_vit-h.bin"),
                             VIT_H, "sdxl_models")},
    "full face": {"sd15": _p(("ip-adapter-full-face_sd15.safetensors", "ip-adapter-full-face_sd15.bin"), VIT_H, "models")},
}
PRESET_NAMES = tuple(PRESETS)
FAMILY_BY_CONTEXT_DIM = {768: "sd15", 2048: "sdxl"}


def family_of_context_dim(context_dim: int | None) -> str:
    """The base family of a UNet from its cross-attention context width (768 = SD1.5, 2048 = SDXL)."""
    family = FAMILY_BY_CONTEXT_DIM.get(int(context_dim or 0))
    if family is None:
        raise IPAKitError(f"the model's cross-attention width is {context_dim}; presets exist for SD1.5 (768) and SDXL "
                          "(2048) models; load the adapter and CLIP vision files by hand for other models")
    return family


def _no_preset(preset: str, family: str) -> str:
    have = ", ".join(p for table in (PRESETS, DIT_PRESETS) for p, fams in table.items() if family in fams)
    if not have:
        return (f"presets exist for SD1.5, SDXL, Flux and SD3.5 models, not for this {family} model; load the adapter "
                "and CLIP vision files by hand")
    return f"there is no official '{preset}' adapter for {family} models; presets for {family}: {have}"


def _norm(part: str) -> str:
    return re.sub(r"[-_.\s]+", "", part.lower())


def _key(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return _norm(re.sub(r"\.(safetensors|bin|pt|pth|ckpt|sft)$", "", base, flags=re.IGNORECASE))


def _folder_key(name: str) -> str:
    """'<parent folder>/<file>' normalised: how a generic published name (ip-adapter.bin) is told apart."""
    parts = name.replace("\\", "/").rsplit("/", 2)
    return f"{_norm(parts[-2])}/{_key(name)}" if len(parts) > 1 else ""


def find_file(candidates: Iterable[str], listing: Iterable[str]) -> str | None:
    """The first listed file whose normalised name equals a candidate's, candidates in order of preference.

    A candidate with a folder ('FLUX.1-dev-IP-Adapter/ip-adapter.bin') matches that file in a folder of that name."""
    by_key: dict[str, str] = {}
    for name in sorted(listing):
        by_key.setdefault(_key(name), name)
        if _folder_key(name):
            by_key.setdefault(_folder_key(name), name)
    for cand in candidates:
        hit = by_key.get(_folder_key(cand) if "/" in cand else _key(cand))
        if hit is not None:
            return hit
    return None


def find_preset(preset: str, family: str, adapter_listing: Iterable[str], clip_listing: Iterable[str]) -> tuple[str, str, str]:
    """(adapter file, CLIP vision file, encoder name) of `preset` for `family`, from the two folders' listings.

    Raises one IPAKitError naming the file looked for, the folder it belongs in and where it is published.
    """
    if preset in DIT_PRESETS:
        return find_dit_preset(preset, family, adapter_listing, clip_listing)
    if preset not in PRESETS:
        raise IPAKitError(f"unknown preset {preset!r}; expected one of {', '.join(PRESET_NAMES + DIT_PRESET_NAMES)}")
    spec = PRESETS[preset].get(family)
    if spec is None:
        raise IPAKitError(_no_preset(preset, family))
    adapter = find_file(spec.names, adapter_listing)
    if adapter is None:
        raise IPAKitError(f"preset '{preset}' ({family}): adapter file {spec.names[0]} not found; put it in "
                          f"ComfyUI/models/ipadapter (published at {spec.published})")
    clip_names, published = CLIP_FILES[spec.encoder]
    clip = find_file(clip_names, clip_listing)
    if clip is None:
        raise IPAKitError(f"preset '{preset}' ({family}): CLIP vision file {clip_names[0]} ({spec.encoder}) not found; "
                          f"put it in ComfyUI/models/clip_vision (published at {published})")
    return adapter, clip, spec.encoder


# Flux / SD3.5 presets. The InstantX files are both published as ip-adapter.bin (and XLabs' as ip_adapter.safetensors),
# so the published name is matched inside a folder named after its repository, or as the file renamed to that.
SIGLIP_HEAD = "SigLIP-so400m/14-384 with its pooling head"
DIT_CLIP_FILES = {
    SIGLIP_HEAD: (("siglip-so400m-patch14-384.safetensors", "siglip-so400m-patch14-384/model.safetensors"),
                  "https://huggingface.co/google/siglip-so400m-patch14-384 (model.safetensors, which has the "
                  "attention-pooling head; rename it siglip-so400m-patch14-384.safetensors)"),
    "SigLIP-so400m/14-384": (("sigclip_vision_patch14_384.safetensors", "siglip-so400m-patch14-384.safetensors",
                              "siglip-so400m-patch14-384/model.safetensors"),
                             "https://huggingface.co/Comfy-Org/sigclip_vision_384 (sigclip_vision_patch14_384.safetensors)"),
    "ViT-L/14": (("clip-vit-large-patch14.safetensors", "clip-vit-large-patch14/model.safetensors",
                  "clip_vision_l.safetensors", "CLIP-ViT-L-14.safetensors"),
                 "https://huggingface.co/openai/clip-vit-large-patch14 (model.safetensors, rename it "
                 "clip-vit-large-patch14.safetensors)"),
}


def _d(repo: str, published: str, renames: tuple[str, ...], encoder: str, owner: str) -> PresetFiles:
    return PresetFiles((f"{repo}/{published}", f"{repo}.{published.rsplit('.', 1)[-1]}") + renames, encoder,
                       f"https://huggingface.co/{owner}/{repo}")


DIT_PRESETS: dict[str, dict[str, PresetFiles]] = {
    "instantx": {"flux": _d("FLUX.1-dev-IP-Adapter", "ip-adapter.bin", ("instantx-flux-ip-adapter.bin",),
                            SIGLIP_HEAD, "InstantX"),
                 "sd3": _d("SD3.5-Large-IP-Adapter", "ip-adapter.bin", ("instantx-sd3.5-ip-adapter.bin",),
                           "SigLIP-so400m/14-384", "InstantX")},
    "xlabs v1": {"flux": _d("flux-ip-adapter", "ip_adapter.safetensors", ("xlabs-flux-ip-adapter.safetensors",),
                            "ViT-L/14", "XLabs-AI")},
    "xlabs v2": {"flux": _d("flux-ip-adapter-v2", "ip_adapter.safetensors", ("xlabs-flux-ip-adapter-v2.safetensors",),
                            "ViT-L/14", "XLabs-AI")},
}
DIT_PRESET_NAMES = tuple(DIT_PRESETS)


def find_dit_preset(preset: str, family: str, adapter_listing: Iterable[str],
                    clip_listing: Iterable[str]) -> tuple[str, str, str]:
    """(adapter file, CLIP vision file, encoder) of a Flux / SD3.5 preset for `family` ("flux" / "sd3").

    Raises one IPAKitError listing every missing file, one line each: its name, folder and download page."""
    spec = DIT_PRESETS[preset].get(family)
    if spec is None:
        raise IPAKitError(_no_preset(preset, family))
    missing = []
    adapter = find_file(spec.names, adapter_listing)
    if adapter is None:
        folder, file = spec.names[0].split("/")
        missing.append(f"{file} -> ComfyUI/models/ipadapter/{folder}/ (or renamed {spec.names[1]} in "
                       f"ComfyUI/models/ipadapter; from {spec.published})")
    clip_names, published = DIT_CLIP_FILES[spec.encoder]
    clip = find_file(clip_names, clip_listing)
    if clip is None:
        missing.append(f"{clip_names[0]} ({spec.encoder}) -> ComfyUI/models/clip_vision (from {published})")
    if missing:
        raise IPAKitError(f"preset '{preset}' ({family}) is missing:\n" + "\n".join(f"  {m}" for m in missing))
    return adapter, clip, spec.encoder


# FaceID presets: adapter + (plus only) CLIP vision + the InsightFace model pack. The h94 FaceID files.
FACEID_HUB = "https://huggingface.co/h94/IP-Adapter-FaceID/tree/main"
FACEID_PRESETS: dict[str, dict[str, tuple[tuple[str, ...], str | None]]] = {
    "faceid": {"sd15": (("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid_sd15.safetensors"), None),
               "sdxl": (("ip-adapter-faceid_sdxl.bin", "ip-adapter-faceid_sdxl.safetensors"), None)},
    "faceid plus": {"sd15": (("ip-adapter-faceid-plus_sd15.bin", "ip-adapter-faceid-plus_sd15.safetensors"), VIT_H)},
    "faceid plus v2": {"sd15": (("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plusv2_sd15.safetensors"), VIT_H),
                       "sdxl": (("ip-adapter-faceid-plusv2_sdxl.bin", "ip-adapter-faceid-plusv2_sdxl.safetensors"), VIT_H)},
    "faceid portrait": {"sd15": (("ip-adapter-faceid-portrait-v11_sd15.bin", "ip-adapter-faceid-portrait_sd15.bin"), None),
                        "sdxl": (("ip-adapter-faceid-portrait_sdxl.bin", "ip-adapter-faceid-portrait_sdxl.safetensors"), None)},
    "faceid portrait unnorm": {"sdxl": (("ip-adapter-faceid-portrait_sdxl_unnorm.bin",), None)},
}
FACEID_PRESET_NAMES = tuple(FACEID_PRESETS)


def find_faceid_preset(preset: str, family: str, adapter_listing: Iterable[str], clip_listing: Iterable[str],
                       face_packs: Iterable[str], face_pack: str = "buffalo_l") -> tuple[str, str | None, str]:
    """(adapter file, CLIP vision file or None, face model pack) of a FaceID preset.

    Raises one IPAKitError listing every missing file, one line each: its name, folder and download page.
    """
    if preset not in FACEID_PRESETS:
        raise IPAKitError(f"unknown FaceID preset {preset!r}; expected one of {', '.join(FACEID_PRESET_NAMES)}")
    spec = FACEID_PRESETS[preset].get(family)
    if spec is None:
        have = ", ".join(p for p, fams in FACEID_PRESETS.items() if family in fams)
        raise IPAKitError(f"there is no official '{preset}' adapter for {family} models; FaceID presets for {family}: {have}")
    names, encoder = spec
    missing = []
    adapter = find_file(names, adapter_listing)
    if adapter is None:
        missing.append(f"{names[0]} -> ComfyUI/models/ipadapter (from {FACEID_HUB})")
    clip = None
    if encoder is not None:
        clip_names, published = CLIP_FILES[encoder]
        clip = find_file(clip_names, clip_listing)
        if clip is None:
            missing.append(f"{clip_names[0]} ({encoder}) -> ComfyUI/models/clip_vision (from {published})")
    if face_pack not in set(face_packs):
        from ..face.models import PACKS

        files, page = PACKS.get(face_pack, ("a detector and a recognizer .onnx", "the InsightFace model zoo"))
        missing.append(f"{files} -> ComfyUI/models/insightface/models/{face_pack}/ (from {page}; non-commercial "
                       "research only)")
    if missing:
        raise IPAKitError(f"FaceID preset '{preset}' ({family}) is missing:\n" + "\n".join(f"  {m}" for m in missing))
    return adapter, clip, face_pack
