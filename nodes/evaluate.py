"""IPAKitEvaluate (score images) and IPAKitWeightSweep (sample, score and plot a weight sweep); math in ipa_train.evaluation.evaluate."""

from __future__ import annotations

import os

from .common import ADAPTER, CATEGORY, EMBEDS, TRAINED_SUBDIR, logger, pil_to_image

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


def _scorer(clip_model: str, clip_vision=None):
    """-> (Scorer, notes): the transformers CLIP for text (and images when no CLIP vision model is connected)."""
    from ipa_train.evaluation.evaluate import CLIPEmbedder, FunctionImageEmbedder, Scorer

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
    return scorer, notes


def evaluate(images, reference, prompt: str, clip_model: str = "", clip_vision=None):
    """-> EvalReport for ComfyUI IMAGE batches [N, H, W, 3]."""
    from ipa_train.evaluation.evaluate import EvalReport

    scorer, notes = _scorer(clip_model, clip_vision)
    scores = scorer.score(images, reference, prompt.strip() or None)
    if scorer.text_model is not None and not prompt.strip():
        notes.append("prompt following skipped: the prompt is empty")
    return EvalReport(clip=clip_model.strip(), prompt=prompt, scores=scores, notes=notes,
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


_SWEEP_MODES = {"scaled and fused": ("scaled", "fused"), "scaled": ("scaled",), "fused": ("fused",)}


def _sampler_lists() -> tuple[list[str], list[str]]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def sweep_generator(model, adapter, embeds, positive, negative, latent, vae, *, steps: int, cfg: float,
                    sampler_name: str, scheduler: str, fusion_lambda: float, on_step=None):
    """`generate(weight, mode, seed)` for ipa_train's WeightSweep: apply, sample and decode one image with ComfyUI.

    Each (weight, mode) patches a clone of `model` once (IPAKitApply: the image K/V are projected there); each call
    samples the first latent of `latent` with `seed` and decodes it: IMAGE [1, H, W, 3]. `on_step(step)` is called
    after each sampling step (progress bar).
    """
    import comfy.sample

    from .apply import apply

    base = comfy.sample.fix_empty_latent_channels(model, latent["samples"][:1])  # [1, C, h, w]
    mask = latent.get("noise_mask")

    def callback(step, x0, x, total_steps):
        if on_step is not None:
            on_step(step + 1)

    last: dict = {}  # (weight, mode) -> patched model: the sweep runs every seed of a point in a row

    def generate(weight: float, mode: str, seed: int):
        if (weight, mode) not in last:
            last.clear()
            last[(weight, mode)] = apply(model, adapter, embeds, mode, weight, fusion_lambda)
        patched = last[(weight, mode)]
        noise = comfy.sample.prepare_noise(base, seed, None)
        samples = comfy.sample.sample(patched, noise, steps, cfg, sampler_name, scheduler, positive, negative, base,
                                      denoise=1.0, noise_mask=None if mask is None else mask[:1], callback=callback,
                                      disable_pbar=True, seed=seed)
        return vae.decode(samples)[:1].float().cpu()  # [1, H, W, 3]

    return generate


class IPAKitWeightSweep:
    DESCRIPTION = ("Samples the prompt with the adapter at each weight (0 = the plain model) in scaled and/or fused "
                   "mode, a few seeds each, and scores every point: reference preservation, prompt following and "
                   "diversity, drawn as a plot. Shows which weight and mode suit this adapter and reference.")
    CATEGORY = f"{CATEGORY}/evaluation"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("plot", "images", "report")
    OUTPUT_TOOLTIPS = (
        "The sweep plot: one panel per mode, preservation (blue), prompt following (orange) and diversity (green), "
        "0-100, over the weight.",
        "Every generated image, in the order mode, weight, seed.",
        "The report as JSON: the scores of every (mode, weight) point, the settings, the scales used, and notes.",
    )
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_lists()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to sample (without the adapter applied: the sweep applies it)."}),
                "adapter": (ADAPTER, {"tooltip": "From IPAKitLoadAdapter."}),
                "embeds": (EMBEDS, {"tooltip": "From IPAKitEncodeImage, made from the reference image below."}),
                "reference": ("IMAGE", {"tooltip": "The reference image the embeds were made from (scored against)."}),
                "positive": ("CONDITIONING", {"tooltip": "The encoded prompt."}),
                "negative": ("CONDITIONING", {"tooltip": "The encoded negative prompt."}),
                "latent_image": ("LATENT", {"tooltip": "Sets the image size (the first latent of the batch is used)."}),
                "vae": ("VAE", {"tooltip": "Decodes the samples for scoring."}),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "The text of the positive prompt, for prompt following. Empty: prompt following is skipped."}),
                "clip_model": ("STRING", {"default": "", "multiline": False, "tooltip": _CLIP_TIP}),
                "weights": ("STRING", {"default": "0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5", "multiline": False, "tooltip": "Adapter weights to try, separated by commas. 0 is the model without the adapter."}),
                "modes": (list(_SWEEP_MODES), {"default": "scaled and fused", "tooltip": "Which apply modes to sweep."}),
                "fusion_lambda": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "Fused mode: share of the raw image tokens (as in IPAKitApply)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "First seed; every point uses the same seeds, seed, seed+1, ..."}),
                "seeds_per_point": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip": "Images per (mode, weight). Diversity needs at least 2."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps of each image."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (samplers, {"default": "euler", "tooltip": "The sampler, as in KSampler."}),
                "scheduler": (schedulers, {"default": "normal", "tooltip": "The noise schedule, as in KSampler."}),
            },
            "optional": {
                "clip_vision": ("CLIP_VISION", {"tooltip": "Optional: ComfyUI's loaded CLIP vision model, used for preservation and diversity (it cannot embed text)."}),
                "save_as": ("STRING", {"default": "", "tooltip": "Optional file name: the report is also written to output/ipadapter_kit/evaluations/<name>.json."}),
            },
        }

    def run(self, model, adapter, embeds, reference, positive, negative, latent_image, vae, prompt="", clip_model="",
            weights="0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5", modes="scaled and fused", fusion_lambda=0.8, seed=0,
            seeds_per_point=2, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal", clip_vision=None,
            save_as=""):
        import comfy.utils
        import torch

        from ipa_train.errors import EvaluationError
        from ipa_train.evaluation.evaluate import EvalReport, WeightSweep, parse_weights

        if modes not in _SWEEP_MODES:
            raise EvaluationError(f"modes {modes!r}: use one of {list(_SWEEP_MODES)}")
        weight_list = parse_weights(weights)
        scorer, notes = _scorer(clip_model, clip_vision)
        sweep = WeightSweep(scorer, reference, prompt.strip(), weight_list, _SWEEP_MODES[modes],
                            [seed + i for i in range(seeds_per_point)])
        total = len(sweep.weights) * len(sweep.modes) * len(sweep.seeds)
        pbar = comfy.utils.ProgressBar(total * steps)
        done = [0]  # images finished; the bar counts sampling steps over all images

        generate = sweep_generator(model, adapter, embeds, positive, negative, latent_image, vae, steps=steps, cfg=cfg,
                                   sampler_name=sampler_name, scheduler=scheduler, fusion_lambda=fusion_lambda,
                                   on_step=lambda step: pbar.update_absolute(done[0] * steps + step, total * steps))
        images = []

        def generate_and_keep(weight, mode, s):
            image = generate(weight, mode, s)
            images.append(image)
            done[0] += 1
            return image

        logger.info("IPAKitWeightSweep: %d images (%s x weights %s x %d seeds)", total, "/".join(sweep.modes),
                    sweep.weights, len(sweep.seeds))
        result = sweep.run(generate_and_keep)
        if scorer.text_model is not None and not prompt.strip():
            notes.append("prompt following skipped: the prompt is empty")
        report = EvalReport(clip=clip_model.strip(), prompt=prompt, sweep=result, notes=notes,
                            inputs={"references": int(reference.shape[0]), "clip_vision": clip_vision is not None,
                                    "steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler,
                                    "fusion_lambda": fusion_lambda, "adapter": adapter.config.variant})
        if save_as.strip():
            path = report.save(_report_path(save_as))
            logger.info("IPAKitWeightSweep: wrote %s", path)
        return (pil_to_image(result.plot()), torch.cat(images), report.to_json())
