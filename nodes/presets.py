"""IPAKitPresetLoader: MODEL + preset -> the adapter and CLIP vision files, found by name in the model folders."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY, FOLDER, Adapter, logger


class IPAKitPresetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ipa_train.adapter.presets import DIT_PRESET_NAMES, FACEID_PRESET_NAMES, PRESET_NAMES

        from .faceid import FaceModels

        return io.Schema(
            node_id="IPAKitPresetLoader", display_name="Load IP-Adapter Preset (Kit)", category=f"{CATEGORY}/loaders",
            description="Finds the official adapter of a preset for the model's family (SD1.5, SDXL, Flux, SD3.5) "
                        "and the CLIP vision model it needs, by their official names (or common renames), and loads "
                        "both; FaceID presets also load the InsightFace face models (buffalo_l).",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model; its family (SD1.5, SDXL, Flux, SD3) picks the files."),
                io.Combo.Input("preset", options=list(PRESET_NAMES) + list(FACEID_PRESET_NAMES) + list(DIT_PRESET_NAMES),
                               default="standard",
                               tooltip="SD1.5/SDXL: light, standard, vit-G, plus, plus face, full face (the official h94 "
                                       "files); faceid, faceid plus, faceid plus v2, faceid portrait, faceid portrait "
                                       "unnorm (h94/IP-Adapter-FaceID, with the buffalo_l face models). Flux: instantx, "
                                       "xlabs v1, xlabs v2. SD3.5 Large: instantx."),
            ],
            outputs=[
                Adapter.Output("adapter", display_name="adapter", tooltip="The preset's adapter."),
                io.ClipVision.Output("clip_vision", display_name="clip_vision",
                                     tooltip="The CLIP vision model it needs (none for FaceID and FaceID portrait)."),
                io.String.Output("info", display_name="info", tooltip="Which files were loaded."),
                FaceModels.Output("face_models", display_name="face_models",
                                  tooltip="FaceID presets: the face detector and recognizer, for Encode Face (Kit); "
                                          "none for the other presets."),
            ],
        )

    @classmethod
    def execute(cls, model, preset="standard") -> io.NodeOutput:
        import comfy.clip_vision
        import folder_paths

        from ipa_train.adapter.layout import context_dim_of_blocks
        from ipa_train.adapter.presets import FACEID_PRESETS, family_of_context_dim, find_preset
        from ipa_train.hosts.comfy.dit_apply import model_family

        unet = model.get_model_object("diffusion_model")
        family = model_family(unet)
        if family == "unet":
            family = family_of_context_dim(context_dim_of_blocks(unet.input_blocks, unet.middle_block, unet.output_blocks))
        elif family == "unknown":
            family = type(unet).__name__
        if preset in FACEID_PRESETS:
            return faceid_preset(preset, family)
        adapter_name, clip_name, encoder = find_preset(preset, family, folder_paths.get_filename_list(FOLDER),
                                                       folder_paths.get_filename_list("clip_vision"))
        adapter = load_adapter_file(adapter_name) if family in ("sd15", "sdxl") else _load_dit_file(adapter_name)
        clip_vision = comfy.clip_vision.load(folder_paths.get_full_path_or_raise("clip_vision", clip_name))
        info = f"{preset} ({family}): {adapter_name} + {clip_name} ({encoder})"
        logger.info("IPAKitPresetLoader: %s", info)
        return io.NodeOutput(adapter, clip_vision, info, None, ui={"text": [info]})


def faceid_preset(preset: str, family: str) -> io.NodeOutput:
    """A FaceID preset's adapter, CLIP vision model (plus variants only) and buffalo_l face models; every missing file
    is named in one error, one line each."""
    import comfy.clip_vision
    import folder_paths

    from ipa_train.adapter.presets import find_faceid_preset
    from ipa_train.errors import FaceError
    from ipa_train.face import FaceModels as Models
    from ipa_train.face import find_model_folder

    from .faceid import PACKS, insightface_root

    def found(pack: str) -> bool:
        try:
            return bool(find_model_folder(insightface_root(), pack))
        except FaceError:
            return False

    adapter_name, clip_name, pack = find_faceid_preset(
        preset, family, folder_paths.get_filename_list(FOLDER), folder_paths.get_filename_list("clip_vision"),
        [p for p in PACKS if found(p)])
    adapter = load_adapter_file(adapter_name)
    clip_vision = None
    if clip_name is not None:
        clip_vision = comfy.clip_vision.load(folder_paths.get_full_path_or_raise("clip_vision", clip_name))
    face_models = Models(find_model_folder(insightface_root(), pack))
    info = f"{preset} ({family}): {adapter_name} + {clip_name or 'no CLIP vision'} + face models {pack}"
    logger.info("IPAKitPresetLoader: %s", info)
    return io.NodeOutput(adapter, clip_vision, info, face_models, ui={"text": [info]})



def _load_dit_file(name: str):
    from .loaders import load

    return load(name)[0]


def load_adapter_file(name: str):
    import folder_paths

    from ipa_train.adapter.formats import build_adapter, detect_config, read_adapter_state

    state = read_adapter_state(folder_paths.get_full_path_or_raise(FOLDER, name))
    return build_adapter(state, detect_config(state)).float().eval()
