"""IPAKitDataset and IPAKitTrain: train an IP-Adapter inside ComfyUI from the models already loaded."""

from __future__ import annotations

import os
import tempfile

import torch

from .common import ADAPTER, CATEGORY, DATASET, TRAINED_SUBDIR, logger, pil_to_image

RUNS_SUBDIR = "ipadapter_kit_runs"  # checkpoints; only final adapters go to output/ipadapter_kit (listed by loaders)
EVENT = "ipakit.training"


class IPAKitDataset:
    DESCRIPTION = "A training dataset: a folder of images with same-name .txt captions, a metadata.jsonl, or the reference JSON list."
    CATEGORY = f"{CATEGORY}/training"
    RETURN_TYPES = (DATASET, "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset, for IPAKitTrain.", "How many images and captions were found, and what was skipped.")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "path": ("STRING", {"default": "", "tooltip": "Folder of images (with .txt captions or metadata.jsonl), or the reference "
                                                              "JSON list file [{\"image_file\", \"text\"}] (images next to it)."}),
            },
            "optional": {
                "captions_json": ("STRING", {"default": "", "tooltip": "Optional: the reference JSON list when the images live in 'path'."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, path, captions_json=""):
        # re-scan when files change: the newest modification time under the folder
        latest = 0.0
        for root, _, files in os.walk(path or "."):
            for f in files:
                try:
                    latest = max(latest, os.path.getmtime(os.path.join(root, f)))
                except OSError:
                    pass
        return f"{latest}:{captions_json}"

    def run(self, path, captions_json=""):
        from ipa_train.training.data import load_dataset

        ds = load_dataset(path, captions_json or None, resolution=64)
        info = ds.describe()
        summary = (f"{info['images']} images, {info['captions']} captions ({info['source']} layout)"
                   + (f", skipped {info['skipped']}: {', '.join(info['skipped_files'][:5])}" if info["skipped"] else ""))
        logger.info("IPAKitDataset: %s: %s", path, summary)
        return {"ui": {"text": [summary]}, "result": ({"path": path, "captions_json": captions_json or None, "info": info}, summary)}


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


class IPAKitTrain:
    DESCRIPTION = ("Trains (or fine-tunes, or resumes) an IP-Adapter on a captioned dataset, with the checkpoint, text encoder, "
                   "VAE and CLIP vision model already loaded. Cancel saves a checkpoint; queueing again with the same name resumes.")
    CATEGORY = f"{CATEGORY}/training"
    RETURN_TYPES = (ADAPTER, "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("adapter", "adapter_path", "loss_curve", "validation")
    OUTPUT_TOOLTIPS = (
        "The trained adapter, usable by the apply node in the same prompt.",
        "Where the final adapter was written (also listed by the loader, under output/ipadapter_kit).",
        "The training loss per step and its moving average.",
        "Validation samples (fixed prompt and reference) every N steps; a black 64x64 image when validation is off.",
    )
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to train against (SD1.5-style). It stays frozen."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder (frozen): encodes the captions."}),
                "vae": ("VAE", {"tooltip": "Its VAE (frozen): encodes the training images to latents."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision encoder the adapter will use (ViT-H/14 for the official SD1.5 layouts)."}),
                "dataset": (DATASET, {"tooltip": "From IPAKitDataset."}),
                "projection": (["plain", "plus"], {"default": "plain", "tooltip": "plain: 4 tokens from the CLIP image embedding; plus: 16 tokens from the CLIP hidden states (stronger, less diverse)."}),
                "fusion": ("BOOLEAN", {"default": False, "tooltip": "Also train the fused-mode layers (image tokens attend to the prompt)."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000, "tooltip": "Optimizer steps in total (a resumed run continues up to this)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-2, "step": 1e-6, "round": False, "tooltip": "AdamW learning rate (1e-4 as the reference)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip": "Training resolution (images are resized and centre-cropped)."}),
                "drop_text": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Share of steps trained with an empty prompt."}),
                "drop_image": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Share of steps trained without the image."}),
                "drop_both": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Share of steps trained with neither."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Makes a run reproducible."}),
                "save_every": ("INT", {"default": 250, "min": 0, "max": 1000000, "tooltip": "Write a checkpoint every N steps (0: only at the end)."}),
                "output_name": ("STRING", {"default": "my-ip-adapter", "tooltip": "Name of the adapter file; queueing again with the same name resumes from its last checkpoint."}),
            },
            "optional": {
                "adapter": (ADAPTER, {"tooltip": "Optional adapter to fine-tune (e.g. an official one) instead of training from scratch."}),
                "validate_every": ("INT", {"default": 0, "min": 0, "max": 1000000, "tooltip": "Sample the validation prompt and reference every N steps (0: off)."}),
                "validation_prompt": ("STRING", {"default": "", "tooltip": "Prompt of the validation samples."}),
                "validation_image": ("IMAGE", {"tooltip": "Reference image of the validation samples."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def run(self, model, clip, vae, clip_vision, dataset, projection, fusion, steps, batch_size, learning_rate, resolution,
            drop_text, drop_image, drop_both, seed, save_every, output_name, adapter=None, validate_every=0,
            validation_prompt="", validation_image=None, unique_id=None):
        import comfy.model_management as mm
        import comfy.utils
        import folder_paths

        from ipa_train.adapter.formats import save_adapter
        from ipa_train.plot import plot_losses
        from ipa_train.training.data import load_dataset
        from ipa_train.training.train import CHECKPOINTS_DIR, TrainConfig, train

        from .train_backbone import ComfyBackbone

        name = "".join(c for c in output_name.strip() if c.isalnum() or c in "-_.") or "my-ip-adapter"
        run_dir = os.path.join(folder_paths.get_output_directory(), RUNS_SUBDIR, name)
        has_checkpoint = os.path.isdir(os.path.join(run_dir, CHECKPOINTS_DIR)) and any(
            d.startswith("checkpoint-") for d in os.listdir(os.path.join(run_dir, CHECKPOINTS_DIR)))
        init = None
        if adapter is not None and not has_checkpoint:
            init = os.path.join(run_dir, "init-adapter.safetensors")
            save_adapter(adapter, init)
        config = TrainConfig(
            output_dir=run_dir, name=name, projection=projection, fusion=fusion, steps=steps, batch_size=batch_size,
            lr=learning_rate, resolution=resolution, drop_text=drop_text, drop_image=drop_image, drop_both=drop_both,
            seed=seed, save_every=save_every, init_adapter=init, resume="latest" if has_checkpoint else None,
            log_every=max(1, steps // 20),
        )
        if has_checkpoint:
            logger.info("IPAKitTrain: resuming %s from its last checkpoint in %s", name, run_dir)
        data = load_dataset(dataset["path"], dataset.get("captions_json"), resolution=resolution)
        bar = comfy.utils.ProgressBar(steps, node_id=unique_id)
        samples: list[torch.Tensor] = []

        with torch.inference_mode(False), torch.enable_grad():
            backbone = ComfyBackbone(model, clip, vae, clip_vision)

            def progress(step, total, loss):
                _progress_text(unique_id, f"step {step}/{total} · loss {loss:.4f}")
                bar.update_absolute(step, total)
                _send(unique_id, {"step": step, "total": total, "loss": float(loss), "done": False, "status": "training"})
                if validate_every and validation_image is not None and step % validate_every == 0:
                    samples.append(self._validate(backbone, model, clip, vae, clip_vision, validation_prompt, validation_image, seed))

            result = train(config, backbone, data, should_stop=mm.processing_interrupted, progress=progress,
                           interrupts=(mm.InterruptProcessingException,))

        status = "stopped" if result.stopped else "done"
        _send(unique_id, {"step": result.steps, "total": steps, "loss": result.losses[-1] if result.losses else float("nan"),
                          "done": True, "status": status})
        if result.stopped:
            logger.info("IPAKitTrain: cancelled at step %d; checkpoint saved, queue again with the same name to resume",
                        result.steps)
            raise mm.InterruptProcessingException()
        final = os.path.join(folder_paths.get_output_directory(), TRAINED_SUBDIR, f"{name}.safetensors")
        trained = result.adapter.float().eval()
        save_adapter(trained, final, {"ipa_kit.trained_steps": str(result.steps)})
        with tempfile.TemporaryDirectory() as tmp:
            curve = _image_tensor(plot_losses(result.losses, os.path.join(tmp, "loss.png"), title=f"{name}: training loss"))
        validation = torch.cat(samples) if samples else torch.zeros(1, 64, 64, 3)
        return {"ui": {"text": [f"{name}: {result.steps} steps, final loss {result.losses[-1]:.4f} -> {final}"]},
                "result": (trained, final, curve, validation)}

    @staticmethod
    def _validate(backbone, model, clip, vae, clip_vision, prompt, image, seed) -> torch.Tensor:
        """Sample the validation prompt with the current adapter (a few steps, 1 image)."""
        import comfy.sample

        from .apply import apply, encode

        adapter = backbone.adapter
        was_training = adapter.training
        adapter.eval()
        with torch.no_grad():
            embeds = encode(adapter, clip_vision, image)
            patched = apply(model, adapter, embeds, "fused" if adapter.fusion is not None else "scaled", 1.0, 0.8)
            pos = [[clip.encode_from_tokens(clip.tokenize(prompt)), {}]]
            neg = [[clip.encode_from_tokens(clip.tokenize("")), {}]]
            latent = torch.zeros(1, 4, 64, 64)
            noise = comfy.sample.prepare_noise(latent, seed)
            out = comfy.sample.sample(patched, noise, 12, 6.0, "euler", "normal", pos, neg, latent, seed=seed,
                                      disable_pbar=True)
            img = vae.decode(out).float().cpu()
        adapter.train(was_training)
        return img[:1]
