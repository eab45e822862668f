"""IPAKitDataset and IPAKitTrain: train an IP-Adapter inside ComfyUI from the models already loaded."""

from __future__ import annotations

import os
import tempfile

import torch
from comfy_api.latest import io

from .common import CATEGORY, TRAINED_SUBDIR, Adapter, Dataset, logger, pil_to_image
from .faceid import FaceModels

RUNS_SUBDIR = "ipadapter_kit_runs"  # checkpoints; only final adapters go to output/ipadapter_kit (listed by loaders)
EVENT = "ipakit.training"


def scan_dataset(path: str, captions_json: str = "") -> tuple[dict, str]:
    """-> (dataset handle for IPAKitTrain, one-line summary) for a dataset folder or JSON list."""
    from ipa_train.training.data import load_dataset

    ds = load_dataset(path, captions_json or None, resolution=64)
    info = ds.describe()
    summary = (f"{info['images']} images, {info['captions']} captions ({info['source']} layout)"
               + (f", skipped {info['skipped']}: {', '.join(info['skipped_files'][:5])}" if info["skipped"] else ""))
    logger.info("IPAKitDataset: %s: %s", path, summary)
    return {"path": path, "captions_json": captions_json or None, "info": info}, summary


def newest_change(path: str) -> float:
    """The newest modification time under `path`: the dataset is re-scanned when files change."""
    latest = 0.0
    for root, _, files in os.walk(path or "."):
        for f in files:
            try:
                latest = max(latest, os.path.getmtime(os.path.join(root, f)))
            except OSError:
                pass
    return latest


class IPAKitDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitDataset",
            display_name="IP-Adapter Training Dataset (Kit)",
            category=f"{CATEGORY}/training",
            description="A training dataset: a folder of images with same-name .txt captions, a metadata.jsonl, or the reference JSON list.",
            inputs=[
                io.String.Input("path", default="", tooltip=(
                    "Folder of images (with .txt captions or metadata.jsonl), or the reference "
                    "JSON list file [{\"image_file\", \"text\"}] (images next to it).")),
                io.String.Input("captions_json", default="", optional=True,
                                tooltip="Optional: the reference JSON list when the images live in 'path'."),
            ],
            outputs=[
                Dataset.Output("dataset", display_name="dataset", tooltip="The dataset, for IPAKitTrain."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="How many images and captions were found, and what was skipped."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, path, captions_json=""):
        return f"{newest_change(path)}:{captions_json}"

    @classmethod
    def execute(cls, path, captions_json="") -> io.NodeOutput:
        dataset, summary = scan_dataset(path, captions_json)
        return io.NodeOutput(dataset, summary, ui={"text": [summary]})


def _send(node_id, data):
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(EVENT, {"node": str(node_id), **data}, PromptServer.instance.client_id)
    except Exception:  # no server (in-process use): the progress bar and logs still report
        pass


def _progress_text(node_id, text: str) -> None:
    """Text under the node's progress bar (the loss), where the host supports it."""
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # older hosts or no server: the websocket event and logs still carry the loss
        pass


def _image_tensor(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        return pil_to_image(img)


def _train_inputs() -> list[io.Input]:
    return [
        io.Model.Input("model", tooltip="The base model to train against (SD1.x/2.x, SDXL, Flux or SD3.5). It stays frozen."),
        io.Clip.Input("clip", tooltip="Its text encoder (frozen): encodes the captions."),
        io.Vae.Input("vae", tooltip="Its VAE (frozen): encodes the training images to latents."),
        io.ClipVision.Input("clip_vision", tooltip=(
            "The CLIP vision encoder the adapter will use (ViT-H/14 for the official SD1.5 layouts; Flux: ViT-L/14 "
            "for xlabs-flux, SigLIP so400m-384 for instantx-flux; SD3.5: SigLIP so400m-384).")),
        Dataset.Input("dataset", tooltip="From IPAKitDataset."),
        io.Combo.Input("projection", options=["plain", "plus", "faceid", "faceid-plus", "faceid-plusv2"], default="plain", tooltip=(
            "plain: 4 tokens from the CLIP image embedding; plus: 16 tokens from the CLIP hidden states (stronger, less "
            "diverse); faceid: 4 tokens from each image's face embedding, with a rank-128 LoRA on every attention layer "
            "(needs face_models); faceid-plus / plusv2: also the CLIP states of the aligned face.")),
        io.Boolean.Input("fusion", default=False, tooltip="Also train the fused-mode layers (image tokens attend to the prompt)."),
        io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip="Optimizer steps in total (a resumed run continues up to this)."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-2, step=1e-6, round=False,
                       tooltip="AdamW learning rate (1e-4 as the reference)."),
        io.Int.Input("resolution", default=512, min=64, max=2048, step=64, tooltip="Training resolution (images are resized and centre-cropped)."),
        io.Float.Input("drop_text", default=0.05, min=0.0, max=1.0, step=0.01, tooltip="Share of steps trained with an empty prompt."),
        io.Float.Input("drop_image", default=0.05, min=0.0, max=1.0, step=0.01, tooltip="Share of steps trained without the image."),
        io.Float.Input("drop_both", default=0.05, min=0.0, max=1.0, step=0.01, tooltip="Share of steps trained with neither."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Makes a run reproducible."),
        io.Int.Input("save_every", default=250, min=0, max=1000000, tooltip="Write a checkpoint every N steps (0: only at the end)."),
        io.String.Input("output_name", default="my-ip-adapter", tooltip=(
            "Name of the adapter file; queueing again with the same name resumes from its last checkpoint.")),
        Adapter.Input("adapter", optional=True, tooltip=(
            "Optional adapter to fine-tune (e.g. an official one) instead of training from scratch.")),
        io.Int.Input("validate_every", default=0, min=0, max=1000000, optional=True,
                     tooltip="Sample the validation prompt and reference every N steps, at the training resolution (0: off)."),
        io.String.Input("validation_prompt", default="", optional=True, tooltip="Prompt of the validation samples."),
        io.Image.Input("validation_image", optional=True, tooltip="Reference image of the validation samples."),
        FaceModels.Input("face_models", optional=True, tooltip=(
            "FaceID projections: the face models (Load Face Models (Kit)) that embed each image's face; images "
            "without a face are skipped.")),
        io.Combo.Input("format", options=["auto", "instantx-flux", "xlabs-flux", "instantx-sd3"], default="auto",
                       optional=True, tooltip=(
            "Flux / SD3.5 models: the official layout to train and write. instantx-flux: SigLIP pooled, 128 tokens, "
            "every block; xlabs-flux: CLIP ViT-L image_embeds, 4 tokens, double blocks; instantx-sd3: SigLIP "
            "hidden states, time resampler, 64 tokens. auto: instantx-sd3 for SD3.5; for Flux the fine-tuned "
            "adapter's format, else instantx-flux with a SigLIP encoder and xlabs-flux with ViT-L. SD1.5/SDXL: auto.")),
        io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1, optional=True, tooltip=(
            "Flux dev: the distilled guidance input during training (1.0 as XLabs' trainer); other models ignore it.")),
        io.Boolean.Input("gradient_checkpointing", default=False, optional=True, tooltip=(
            "Flux / SD3.5: recompute each transformer block in the backward pass instead of keeping its activations "
            "(much less memory, about a third more time per step).")),
    ]


class IPAKitTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IPAKitTrain",
            display_name="Train IP-Adapter (Kit)",
            category=f"{CATEGORY}/training",
            description=("Trains (or fine-tunes, or resumes) an IP-Adapter on a captioned dataset, with the checkpoint, "
                         "text encoder, VAE and CLIP vision model already loaded. Cancel saves a checkpoint; queueing "
                         "again with the same name resumes."),
            inputs=_train_inputs(),
            outputs=[
                Adapter.Output("adapter", display_name="adapter",
                               tooltip="The trained adapter, usable by the apply node in the same prompt."),
                io.String.Output("adapter_path", display_name="adapter_path", tooltip=(
                    "Where the final adapter was written (also listed by the loader, under output/ipadapter_kit).")),
                io.Image.Output("loss_curve", display_name="loss_curve",
                                tooltip="The training loss per step and its moving average."),
                io.Image.Output("validation", display_name="validation", tooltip=(
                    "Validation samples (fixed prompt and reference) every N steps; a black 64x64 image when validation is off.")),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, dataset, projection, fusion, steps, batch_size, learning_rate,
                resolution, drop_text, drop_image, drop_both, seed, save_every, output_name, adapter=None,
                validate_every=0, validation_prompt="", validation_image=None, face_models=None, format="auto",
                guidance=1.0, gradient_checkpointing=False) -> io.NodeOutput:
        return train_in_comfy(model, clip, vae, clip_vision, dataset, projection, fusion, steps, batch_size,
                              learning_rate, resolution, drop_text, drop_image, drop_both, seed, save_every,
                              output_name, adapter, validate_every, validation_prompt, validation_image,
                              unique_id=cls.hidden.unique_id, face_models=face_models, format=format,
                              guidance=guidance, gradient_checkpointing=gradient_checkpointing)


def _run_config(output_name: str, adapter, **options):
    """-> (name, run folder, TrainConfig): resume from the run's last checkpoint when there is one, otherwise start
    from `adapter` (fine-tuning) or from scratch."""
    import folder_paths

    from ipa_train.adapter.formats import save_adapter
    from ipa_train.training.config import normalise_name
    from ipa_train.training.train import CHECKPOINTS_DIR, TrainConfig

    name = normalise_name(output_name)  # refused before anything is written (no folders, no hidden names)
    run_dir = os.path.join(folder_paths.get_output_directory(), RUNS_SUBDIR, name)
    checkpoints = os.path.join(run_dir, CHECKPOINTS_DIR)
    has_checkpoint = os.path.isdir(checkpoints) and any(d.startswith("checkpoint-") for d in os.listdir(checkpoints))
    init = None
    if adapter is not None and not has_checkpoint:
        init = os.path.join(run_dir, "init-adapter.safetensors")
        save_adapter(adapter, init)
    if has_checkpoint:
        logger.info("IPAKitTrain: resuming %s from its last checkpoint in %s", name, run_dir)
    config = TrainConfig(output_dir=run_dir, name=name, init_adapter=init, resume="latest" if has_checkpoint else None,
                         log_every=max(1, options["steps"] // 20), **options)
    return name, run_dir, config


def _face_data(data, face_models, config):
    """FaceID: the dataset's images with a face, their embeddings computed once with the connected face models."""
    if not config.is_faceid:
        return data
    from ipa_train.errors import IPAKitError
    from ipa_train.face import FaceAnalyzer
    from ipa_train.training.faceid import face_dataset

    if face_models is None:
        raise IPAKitError(f"IPAKitTrain: projection {config.projection} embeds each image's face: connect Load Face "
                          "Models (Kit) to face_models")
    return face_dataset(data, FaceAnalyzer(face_models), config.output_dir, config.face_crop)


def train_in_comfy(model, clip, vae, clip_vision, dataset, projection, fusion, steps, batch_size, learning_rate,
                   resolution, drop_text, drop_image, drop_both, seed, save_every, output_name, adapter=None,
                   validate_every=0, validation_prompt="", validation_image=None, unique_id=None,
                   face_models=None, format="auto", guidance=1.0, gradient_checkpointing=False) -> io.NodeOutput:
    """The training node's work: train against the loaded models, report progress, write the adapter."""
    import comfy.model_management as mm
    import comfy.utils

    from ipa_train.training.data import load_dataset
    from ipa_train.training.train import train

    from .train_backbone import ComfyBackbone, mixed_precision_for
    from .train_dit import ComfyDitBackbone, training_format

    fmt = training_format(model, clip_vision, format, projection, fusion, adapter)  # checked before any work
    dit = {"format": fmt, "guidance": guidance} if fmt else {}
    name, _, config = _run_config(output_name, adapter, projection=projection, fusion=fusion, steps=steps,
                                        batch_size=batch_size, lr=learning_rate, resolution=resolution,
                                        drop_text=drop_text, drop_image=drop_image, drop_both=drop_both, seed=seed,
                                        save_every=save_every, gradient_checkpointing=gradient_checkpointing,
                                        mixed_precision=mixed_precision_for(model, mm.get_torch_device()), **dit)
    data = _face_data(load_dataset(dataset["path"], dataset.get("captions_json"), resolution=resolution), face_models,
                      config)
    if validate_every and config.is_faceid:
        logger.warning("IPAKitTrain: validation samples are not made for FaceID adapters; sample with Encode Face (Kit)")
        validate_every = 0
    bar = comfy.utils.ProgressBar(steps, node_id=unique_id)
    samples: list[torch.Tensor] = []

    with torch.inference_mode(False), torch.enable_grad():
        backbone = (ComfyDitBackbone if fmt else ComfyBackbone)(model, clip, vae, clip_vision)
        validate = _validate_dit if fmt else _validate

        def progress(step, total, loss):
            _progress_text(unique_id, f"step {step}/{total} · loss {loss:.4f}")
            bar.update_absolute(step, total)
            _send(unique_id, {"step": step, "total": total, "loss": float(loss), "done": False, "status": "training"})
            if validate_every and validation_image is not None and step % validate_every == 0:
                samples.append(validate(backbone, model, clip, vae, clip_vision, validation_prompt, validation_image, seed,
                                        resolution))

        try:
            result = train(config, backbone, data, should_stop=mm.processing_interrupted, progress=progress,
                           interrupts=(mm.InterruptProcessingException,))
        finally:
            if not fmt:
                backbone.detach_lora()  # the FaceID LoRA's hooks sit on the user's (shared) UNet modules

    status = "stopped" if result.stopped else "done"
    _send(unique_id, {"step": result.steps, "total": steps, "loss": result.losses[-1] if result.losses else float("nan"),
                      "done": True, "status": status})
    if result.stopped:
        logger.info("IPAKitTrain: cancelled at step %d; checkpoint saved, queue again with the same name to resume",
                    result.steps)
        raise mm.InterruptProcessingException()
    return _finish(result, name, samples)


def _finish(result, name: str, samples: list[torch.Tensor]) -> io.NodeOutput:
    """Write the final adapter (official layout) to output/ipadapter_kit and return it with its loss curve."""
    import folder_paths

    from ipa_train.adapter.formats import save_adapter
    from ipa_train.plot import plot_losses

    final = os.path.join(folder_paths.get_output_directory(), TRAINED_SUBDIR, f"{name}.safetensors")
    trained = result.adapter.float().eval()
    trained.lora = {k: v.detach().clone() for k, v in trained.lora.items()}  # FaceID: no longer the trained parameters
    save_adapter(trained, final, {"ipa_kit.trained_steps": str(result.steps)})
    with tempfile.TemporaryDirectory() as tmp:
        curve = _image_tensor(plot_losses(result.losses, os.path.join(tmp, "loss.png"), title=f"{name}: training loss"))
    validation = torch.cat(samples) if samples else torch.zeros(1, 64, 64, 3)
    return io.NodeOutput(trained, final, curve, validation,
                         ui={"text": [f"{name}: {result.steps} steps, final loss {result.losses[-1]:.4f} -> {final}"]})


def _conditioning(clip, text: str) -> list:
    """ComfyUI conditioning of one prompt, with the pooled output SDXL's sampling reads."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def _validate(backbone, model, clip, vae, clip_vision, prompt, image, seed, resolution=512) -> torch.Tensor:
    """Sample the validation prompt with the current adapter (a few steps, 1 image at the training resolution,
    where the adapter learns)."""
    import comfy.sample

    from .apply import apply, encode

    adapter = backbone.adapter
    was_training = adapter.training
    adapter.eval()
    with torch.no_grad():
        embeds = encode(adapter, clip_vision, image)
        patched = apply(model, adapter, embeds, "fused" if adapter.fusion is not None else "scaled", 1.0, 0.8)
        pos, neg = (_conditioning(clip, text) for text in (prompt, ""))
        latent = torch.zeros(1, 4, max(8, resolution // 8), max(8, resolution // 8))
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patched, noise, 12, 6.0, "euler", "normal", pos, neg, latent, seed=seed,
                                  disable_pbar=True)
        img = vae.decode(out).float().cpu()
    adapter.train(was_training)
    return img[:1]


def _validate_dit(backbone, model, clip, vae, clip_vision, prompt, image, seed, resolution=512) -> torch.Tensor:
    """A Flux / SD3.5 validation sample through this pack's own encode and apply (the patches users sample with):
    a few euler steps at the training resolution; Flux dev at guidance 3.5 without CFG, SD3.5 at CFG 4."""
    import comfy.sample

    from .dit import apply_dit_node, encode_dit

    adapter = backbone.adapter
    was_training = adapter.training
    adapter.eval()
    flux = backbone.family == "flux"
    with torch.no_grad():
        patched = apply_dit_node(model, adapter, encode_dit(adapter, clip_vision, image), weight=1.0)
        pos, neg = (_conditioning(clip, text) for text in (prompt, ""))
        if flux:
            pos[0][1]["guidance"] = 3.5
        channels = int(model.get_model_object("latent_format").latent_channels)
        latent = torch.zeros(1, channels, max(2, resolution // 8), max(2, resolution // 8))
        noise = comfy.sample.prepare_noise(latent, seed)
        out = comfy.sample.sample(patched, noise, 12, 1.0 if flux else 4.0, "euler", "simple", pos, neg, latent,
                                  seed=seed, disable_pbar=True)
        img = vae.decode(out).float().cpu()
    adapter.train(was_training)
    return img[:1]
