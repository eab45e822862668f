"""IPAKitEvaluate (score images) and IPAKitWeightSweep (sample, score and plot a weight sweep); math in ipa_train.evaluation."""

from __future__ import annotations

import os

from comfy_api.latest import io

from .common import CATEGORY, TRAINED_SUBDIR, Adapter, Embeds, logger, pil_to_image

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
    from ipa_train.evaluation import CLIPEmbedder, FunctionImageEmbedder, Scorer

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
    from ipa_train.evaluation import EvalReport

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


def _clip_vision_input() -> io.ClipVision.Input:
    return io.ClipVision.Input("clip_vision", optional=True, tooltip=(
        "Optional: ComfyUI's loaded CLIP vision model, used for preservation and diversity (it cannot embed text)."))


def _save_as_input() -> io.String.Input:
    return io.String.Input("save_as", default="", optional=True, tooltip=(
        "Optional file name: the report is also written to output/ipadapter_kit/evaluations/<name>.json."))


def evaluate_and_save(images, reference, prompt="", clip_model="", clip_vision=None, save_as=""):
    """The evaluate node's work: -> (report JSON, combined score, grade); the report saved when `save_as` names a file."""
    report = evaluate(images, reference, prompt, clip_model, clip_vision)
    if save_as.strip():
        path = report.save(_report_path(save_as))
        logger.info("IPAKitEvaluate: wrote %s", path)
    s = report.scores
    logger.info("IPAKitEvaluate: combined %.1f (%s), preservation %.1f, prompt following %s, diversity %s",
                s.combined, s.grade, s.preservation,
                "skipped" if s.prompt_following is None else f"{s.prompt_following:.1f}",
                "n/a" if s.diversity is None else f"{s.diversity:.1f}")
    return report.to_json(), float(s.combined), s.grade


class IPAKitEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitEvaluate",
            display_name="Evaluate IP-Adapter Images (Kit)",
            category=f"{CATEGORY}/evaluation",
            description=("Scores generated images 0-100: reference preservation (CLIP image-image), prompt following "
                         "(CLIPScore), their mean with a grade (A+ >= 90, A >= 80, B >= 70, C >= 60, F), and diversity "
                         "across the batch (0 = identical images)."),
            inputs=[
                io.Image.Input("images", tooltip="The generated images (a batch, e.g. one per seed: diversity needs at least 2)."),
                io.Image.Input("reference", tooltip="The reference image given to the adapter (a batch: preservation averages over them)."),
                io.String.Input("prompt", default="", multiline=True, tooltip="The prompt the images were generated from."),
                io.String.Input("clip_model", default="", multiline=False, tooltip=_CLIP_TIP),
                _clip_vision_input(),
                _save_as_input(),
            ],
            outputs=[
                io.String.Output("report", display_name="report", tooltip=(
                    "The full report as JSON: every score, per-image scores, the scales used, and notes.")),
                io.Float.Output("combined", display_name="combined", tooltip=(
                    "Combined score 0-100: the mean of preservation and prompt following (preservation alone without a text model).")),
                io.String.Output("grade", display_name="grade", tooltip=(
                    "Grade of the combined score: A+ (>= 90), A (80-89), B (70-79), C (60-69), F (< 60).")),
            ],
        )

    @classmethod
    def execute(cls, images, reference, prompt="", clip_model="", clip_vision=None, save_as="") -> io.NodeOutput:
        return io.NodeOutput(*evaluate_and_save(images, reference, prompt, clip_model, clip_vision, save_as))


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


def _sweep_inputs() -> list[io.Input]:
    samplers, schedulers = _sampler_lists()
    return [
        io.Model.Input("model", tooltip="The model to sample (without the adapter applied: the sweep applies it)."),
        Adapter.Input("adapter", tooltip="From IPAKitLoadAdapter."),
        Embeds.Input("embeds", tooltip="From IPAKitEncodeImage, made from the reference image below."),
        io.Image.Input("reference", tooltip="The reference image the embeds were made from (scored against)."),
        io.Conditioning.Input("positive", tooltip="The encoded prompt."),
        io.Conditioning.Input("negative", tooltip="The encoded negative prompt."),
        io.Latent.Input("latent_image", tooltip="Sets the image size (the first latent of the batch is used)."),
        io.Vae.Input("vae", tooltip="Decodes the samples for scoring."),
        io.String.Input("prompt", default="", multiline=True, tooltip=(
            "The text of the positive prompt, for prompt following. Empty: prompt following is skipped.")),
        io.String.Input("clip_model", default="", multiline=False, tooltip=_CLIP_TIP),
        io.String.Input("weights", default="0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5", multiline=False, tooltip=(
            "Adapter weights to try, separated by commas. 0 is the model without the adapter.")),
        io.Combo.Input("modes", options=list(_SWEEP_MODES), default="scaled and fused", tooltip="Which apply modes to sweep."),
        io.Float.Input("fusion_lambda", default=0.8, min=0.0, max=1.0, step=0.05, tooltip=(
            "Fused mode: share of the raw image tokens (as in IPAKitApply).")),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=(
            "First seed; every point uses the same seeds, seed, seed+1, ...")),
        io.Int.Input("seeds_per_point", default=2, min=1, max=16, tooltip="Images per (mode, weight). Diversity needs at least 2."),
        io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps of each image."),
        io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance scale."),
        io.Combo.Input("sampler_name", options=samplers, default="euler", tooltip="The sampler, as in KSampler."),
        io.Combo.Input("scheduler", options=schedulers, default="normal", tooltip="The noise schedule, as in KSampler."),
        _clip_vision_input(),
        _save_as_input(),
    ]


class IPAKitWeightSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitWeightSweep",
            display_name="IP-Adapter Weight Sweep (Kit)",
            category=f"{CATEGORY}/evaluation",
            description=("Samples the prompt with the adapter at each weight (0 = the plain model) in scaled and/or fused "
                         "mode, a few seeds each, and scores every point: reference preservation, prompt following and "
                         "diversity, drawn as a plot. Shows which weight and mode suit this adapter and reference."),
            inputs=_sweep_inputs(),
            outputs=[
                io.Image.Output("plot", display_name="plot", tooltip=(
                    "The sweep plot: one panel per mode, preservation (blue), prompt following (orange) and diversity "
                    "(green), 0-100, over the weight.")),
                io.Image.Output("images", display_name="images", tooltip="Every generated image, in the order mode, weight, seed."),
                io.String.Output("report", display_name="report", tooltip=(
                    "The report as JSON: the scores of every (mode, weight) point, the settings, the scales used, and notes.")),
            ],
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(*run_sweep(**inputs))


def run_sweep(model, adapter, embeds, reference, positive, negative, latent_image, vae, prompt="", clip_model="",
              weights="0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5", modes="scaled and fused", fusion_lambda=0.8, seed=0,
              seeds_per_point=2, steps=20, cfg=7.0, sampler_name="euler", scheduler="normal", clip_vision=None,
              save_as=""):
    """The sweep node's work: -> (plot IMAGE, every sample IMAGE, report JSON)."""
    import comfy.utils
    import torch

    from ipa_train.errors import EvaluationError
    from ipa_train.evaluation import EvalReport, WeightSweep, parse_weights

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
    return pil_to_image(result.plot()), torch.cat(images), report.to_json()
