"""IPAKitEvaluate: scores generated images against the reference and the prompt (math in ipa_train.evaluate)."""

from __future__ import annotations

import os

from .common import CATEGORY, TRAINED_SUBDIR, logger

REPORTS_SUBDIR = "evaluations"  # under output/ipadapter_kit

_CLIP_TIP = ("Folder or hub id of a full transformers CLIP model (text + vision), e.g. openai/clip-vit-large-patch14, "
             "used for prompt following (and for preservation/diversity when no clip_vision is connected). "
             "Empty: prompt following is skipped. A hub id is downloaded on first use.")


def _device():
    try:
        import comfy.model_management as mm
    except ImportError:  # outside ComfyUI (tests)
        return None
    return mm.get_torch_device()


def evaluate(images, reference, prompt: str, clip_model: str = "", clip_vision=None):
    """-> EvalReport for ComfyUI IMAGE batches [N, H, W, 3]."""
    from ipa_train.evaluate import CLIPEmbedder, EvalReport, FunctionImageEmbedder, Scorer

    clip_model = clip_model.strip()
    text_model = CLIPEmbedder.from_pretrained(clip_model, _device()) if clip_model else None
    image_model = None
    if clip_vision is not None:
        image_model = FunctionImageEmbedder(lambda x: clip_vision.encode_image(x, crop=True)["image_embeds"],
                                            source="ComfyUI CLIP vision")
    scorer = Scorer(image_model, text_model)
    notes = scorer.notes
    if image_model is not None:
        notes.append("preservation and diversity use the connected CLIP vision model")
    scores = scorer.score(images, reference, prompt.strip() or None)
    if text_model is not None and not prompt.strip():
        notes.append("prompt following skipped: the prompt is empty")
    return EvalReport(clip=clip_model, prompt=prompt, scores=scores, notes=notes,
                      inputs={"images": int(images.shape[0]), "references": int(reference.shape[0]),
                              "clip_vision": clip_vision is not None})


def _report_path(name: str) -> str:
    import folder_paths

    from ipa_train.errors import EvaluationError

    stem = os.path.basename(name.strip()).removesuffix(".json")
    if not stem or stem in (".", ".."):
        raise EvaluationError(f"save_as {name!r} is not a file name; use e.g. 'my-adapter-eval'")
    return os.path.join(folder_paths.get_output_directory(), TRAINED_SUBDIR, REPORTS_SUBDIR, stem + ".json")


class IPAKitEvaluate:
    DESCRIPTION = ("Scores generated images 0-100: reference preservation (CLIP image-image), prompt following "
                   "(CLIPScore), their mean with a grade (A+ >= 90, A >= 80, B >= 70, C >= 60, F), and diversity "
                   "across the batch (0 = identical images).")
    CATEGORY = f"{CATEGORY}/evaluation"
    RETURN_TYPES = ("STRING", "FLOAT", "STRING")
    RETURN_NAMES = ("report", "combined", "grade")
    OUTPUT_TOOLTIPS = (
        "The full report as JSON: every score, per-image scores, the scales used, and notes.",
        "Combined score 0-100: the mean of preservation and prompt following (preservation alone without a text model).",
        "Grade of the combined score: A+ (>= 90), A (80-89), B (70-79), C (60-69), F (< 60).",
    )
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The generated images (a batch, e.g. one per seed: diversity needs at least 2)."}),
                "reference": ("IMAGE", {"tooltip": "The reference image given to the adapter (a batch: preservation averages over them)."}),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "The prompt the images were generated from."}),
                "clip_model": ("STRING", {"default": "", "multiline": False, "tooltip": _CLIP_TIP}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "Optional: ComfyUI's loaded CLIP vision model, used for preservation and diversity (it cannot embed text)."}),
                "save_as": ("STRING", {"default": "", "tooltip": "Optional file name: the report is also written to output/ipadapter_kit/evaluations/<name>.json."}),
            },
        }

    def run(self, images, reference, prompt="", clip_model="", clip_vision=None, save_as=""):
        report = evaluate(images, reference, prompt, clip_model, clip_vision)
        if save_as.strip():
            path = report.save(_report_path(save_as))
            logger.info("IPAKitEvaluate: wrote %s", path)
        s = report.scores
        logger.info("IPAKitEvaluate: combined %.1f (%s), preservation %.1f, prompt following %s, diversity %s",
                    s.combined, s.grade, s.preservation,
                    "skipped" if s.prompt_following is None else f"{s.prompt_following:.1f}",
                    "n/a" if s.diversity is None else f"{s.diversity:.1f}")
        return (report.to_json(), float(s.combined), s.grade)
