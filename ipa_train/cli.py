"""Command line: `python -m ipa_train inspect FILE [--json]`, `convert IN OUT`, `train ...`, `demo`, `evaluate ...`
(in `cli_evaluate`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from .argtypes import Parser, check_range, int_range, one_line
from .errors import IPAKitError

logger = logging.getLogger("ipa_train")

_LABELS = (
    ("variant", "variant"),
    ("format", "file format"),
    ("family", "base model family"),
    ("projection", "projection"),
    ("num_tokens", "image tokens"),
    ("clip_output", "CLIP output"),
    ("clip_embedding_dim", "CLIP width"),
    ("encoder", "CLIP vision encoder"),
    ("cross_attention_dim", "cross-attention width"),
    ("cross_attention_layers", "cross-attention layers"),
    ("blocks", "transformer blocks patched"),
    ("parameters", "parameters"),
    ("face_embedding_dim", "face embedding width"),
    ("lora_rank", "LoRA rank"),
    ("fusion", "fusion weights"),
    ("source", "file kind"),
)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .adapter.formats import inspect_file

    info = inspect_file(args.file, None if args.variant == "auto" else args.variant)
    if args.json:
        _out(json.dumps(info, sort_keys=True))
    else:
        _out(info["file"])
        for key, label in _LABELS:
            if key not in info:  # format / blocks: Flux and SD3.5 adapters only
                continue
            value = info[key]
            if key in ("face_embedding_dim", "lora_rank") and value is None:
                continue
            if key == "parameters":
                value = f"{value:,}"
            elif key == "fusion":
                value = "yes (trained)" if value else "no (fused mode uses the parameter-free fusion)"
            _out(f"  {label:<24} {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .adapter.dit_formats import DitConfig
    from .adapter.formats import convert_checkpoint
    from .outputs import check_output_file

    check_output_file(args.dst, 0, "converted file")
    cfg = convert_checkpoint(args.src, args.dst)
    if isinstance(cfg, DitConfig):  # a Flux / SD3.5 adapter
        _out(f"wrote {args.dst}: {cfg.format} adapter, {cfg.blocks} transformer blocks, encoder {cfg.encoder}")
    else:
        _out(f"wrote {args.dst}: {cfg.variant} adapter, {cfg.cross_attention_layers} layers, encoder {cfg.encoder}")
    return 0


# Flags named differently from their TrainConfig field (the field's own flag stays valid too).
_FLAG_ALIASES = {"output_dir": ["--output"], "gradient_accumulation": ["--gradient-accumulation-steps"],
                 "projection": ["--variant"]}


def add_train_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field, with the field's help, type, choices and default."""
    from .training.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}", *_FLAG_ALIASES.get(f.name, [])]
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        choices = None
        if typing.get_origin(kind) is typing.Literal:
            choices = list(typing.get_args(kind))
            kind = type(choices[0])
        elif typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        parser.add_argument(*flags, dest=f.name, type=kind, choices=choices, default=f.default,
                            help=f"{help_text} (default: {f.default})")


def cmd_train(args: argparse.Namespace) -> int:
    from .hosts.backbone_diffusers import DiffusersBackbone
    from .training.data import load_dataset
    from .training.dit import check_run
    from .training.train import TrainConfig, train

    config, family = check_run(TrainConfig.from_dict(vars(args)), args.base_model)
    _train_preflight(config)
    if not args.image_encoder and config.projection != "faceid":
        raise IPAKitError(f"train --projection {config.projection}: give --image-encoder (the CLIP vision model it reads)")
    analyzer = _face_analyzer(config)
    dataset = load_dataset(args.data, args.captions_json, resolution=config.resolution,
                           random_crop=config.random_crop, random_flip=config.random_flip)
    if analyzer is not None:
        from .training.faceid import face_dataset

        dataset = face_dataset(dataset, analyzer, config.output_dir, config.face_crop)
    accelerator = _accelerator(config)
    if accelerator is not None and not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one progress log: the main process's
    device = accelerator.device if accelerator is not None else None
    encoder_dtype = _encoder_dtype(config, device)
    if config.is_dit:
        from .hosts.backbone_dit import DitBackbone

        backbone = DitBackbone(args.base_model, args.image_encoder, device=device, encoder_dtype=encoder_dtype,
                               transformer_dtype=encoder_dtype, max_sequence_length=args.max_sequence_length,
                               family=family)
    else:
        backbone = DiffusersBackbone(args.base_model, args.image_encoder, device=device, encoder_dtype=encoder_dtype)
    result = train(config, backbone, dataset, accelerator=accelerator)
    if result.adapter_path is not None:
        _out(f"wrote {result.adapter_path} ({result.steps} steps, final loss {result.losses[-1]:.5f})")
    return 0


def _face_analyzer(config) -> typing.Any:
    """FaceID: onnxruntime and the face models, checked before the dataset is read (None for other adapters)."""
    if not config.is_faceid:
        return None
    from .training.faceid import open_face_models

    if config.projection == "faceid-plusv2" and "plusv2" not in config.name.lower():
        logger.warning("--name %s: the community pack tells plus v2 from plus by the file name only; a name "
                       "containing 'plusv2' lets it load this adapter as plus v2", config.name)
    return open_face_models(config.face_models, config.face_provider, config.face_pick)


def _train_preflight(config) -> None:
    """What can be checked before the base model loads: output folder and file, init adapter, resume checkpoint
    (`train` checks the free space again once it knows the adapter's size)."""
    from .adapter.formats import read_adapter_state
    from .outputs import check_output_dir, check_output_file
    from .training.checkpoints import find_checkpoint

    check_output_dir(config.output_dir, 0, "output folder")
    check_output_file(Path(config.output_dir) / f"{config.name}.safetensors", 0, "adapter file")
    if config.init_adapter and not config.is_dit:
        read_adapter_state(config.init_adapter)
    if config.resume:
        find_checkpoint(config)


def _accelerator(config) -> typing.Any:
    """An accelerate `Accelerator` when accelerate is installed (needed for `accelerate launch`), else None."""
    try:
        from accelerate import Accelerator
    except ImportError:
        logger.info("accelerate is not installed: training in a single process")
        return None
    import torch

    precision = config.mixed_precision if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def _encoder_dtype(config, device) -> typing.Any:
    import torch

    if device is None or torch.device(device).type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import REAL_FLUX_COMMAND, REAL_MODEL_COMMAND, run_demo
    from .outputs import MB, check_output_dir

    for flag, name, lo, hi in (("--steps", "steps", 1, 10**6), ("--sample-steps", "sample_steps", 1, 1000),
                               ("--seed", "seed", 0, 2**64 - 1), ("--seeds", "seeds", 1, 64), ("--threads", "threads", 1, 256)):
        check_range(flag, getattr(args, name, None), lo, hi)
    check_output_dir(args.output, 32 * MB, "demo output folder")  # the demo writes about 10 MB
    if args.random_backbone and args.family != "unet":
        raise IPAKitError("demo: --random-backbone is the UNet smoke run; leave out --family flux")
    result = run_demo(args.output, steps=args.steps, seed=args.seed, seeds=args.seeds,
                      random_backbone=args.random_backbone, sample_steps=args.sample_steps, threads=args.threads,
                      projection=args.projection, family=args.family, format=args.format)
    _out(f"adapter:   {result.adapter}")
    _out(f"loss plot: {result.loss_plot}")
    if args.random_backbone:
        for p in result.samples:
            _out(f"sample:    {p}")
        _out(f"done in {result.seconds:.0f} s. The backbone was a tiny random model: this checked the pipeline, "
             "not image quality.")
    else:
        _out(f"grid:      {result.grid}")
        _out(f"samples:   {len(result.samples)} PNGs under {Path(args.output) / 'samples'}; report: {result.report}")
        _out(f"done in {result.seconds:.0f} s. Samples showing the reference's colour (prompt without colour; "
             "chance 12%):")
        for column, acc in result.accuracy.items():
            _out(f"  {column:<11} {acc:6.1%}")
    _out("To train on a real base model:")
    _out(f"  {REAL_FLUX_COMMAND if args.family == 'flux' else REAL_MODEL_COMMAND}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .cli_evaluate import add_evaluate_parser

    p = Parser(prog="python -m ipa_train", description="ComfyUI IP-Adapter Kit command line")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe an IP-Adapter weight file")
    s.add_argument("file", help=".safetensors, .bin/.pt file, or training checkpoint folder")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--variant", default="auto", choices=("auto", "faceid-plus", "faceid-plusv2", "faceid-portrait-unnorm"),
                   help="what a FaceID file's keys cannot say (plusv2's shortcut, portrait unnorm); default: the file name")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("convert", help="convert a training checkpoint or adapter into the official layout")
    s.add_argument("src", help="checkpoint file or folder (accelerate checkpoint-N/), or an adapter file")
    s.add_argument("dst", help="output .safetensors, or .bin for the torch layout of the tencent / InstantX releases "
                               "(packs that read only that, e.g. ComfyUI-IPAdapter-Flux)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("train", help="train an IP-Adapter on captioned images (also under `accelerate launch`)")
    s.add_argument("--base-model", required=True, help="diffusers Stable Diffusion, Flux.1 or SD3.5 folder (or hub id)")
    s.add_argument("--image-encoder", default=None, help="CLIP vision (SD, xlabs-flux) or SigLIP (instantx-flux, "
                                                         "instantx-sd3) folder or hub id (not for faceid)")
    s.add_argument("--max-sequence-length", type=int_range(1, 4096), default=512, help="Flux / SD3.5: T5 tokens per caption")
    s.add_argument("--data", required=True, help="image folder (.txt captions or metadata.jsonl), or the reference JSON")
    s.add_argument("--captions-json", default=None, help='reference [{"image_file", "text"}] list; --data is then the image root')
    add_train_config_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("demo", help="offline demo: train an adapter on the shapes world with the shipped toy model, "
                                    "sample with and without it, report how often the reference colour comes through")
    s.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    s.add_argument("--family", choices=("unet", "flux"), default="unet",
                   help="toy base model: unet (default, the UNet shapes model) or flux (the Flux shapes model)")
    s.add_argument("--format", choices=("xlabs-flux", "instantx-flux"), default="xlabs-flux",
                   help="--family flux: adapter layout to train (default: xlabs-flux)")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: 600; 120 with --random-backbone)")
    s.add_argument("--projection", choices=("plain", "plus"), default="plain",
                   help="adapter projection of the shapes demo (default: plain, over CLIP image_embeds; plus: Resampler)")
    s.add_argument("--seeds", type=int, default=4, help="samples per reference and column (default: 4)")
    s.add_argument("--random-backbone", action="store_true",
                   help="former smoke run: tiny random backbone on the embedded photos (checks plumbing, not quality)")
    s.add_argument("--sample-steps", type=int, default=12, help="DDIM steps per sample with --random-backbone (default: 12)")
    s.add_argument("--threads", type=int, default=1,
                   help="CPU threads for the toy demo (default 1: its operations are too small to gain from more)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo)

    add_evaluate_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except IPAKitError as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except OSError as e:  # a file the checks could not foresee (permissions changed, a disk error)
        if args.verbose:
            raise
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"error: {one_line(where + (e.strerror or str(e)))}\n")
        return 2
    except Exception as e:  # a bug: still one line; -v shows the traceback
        if args.verbose:
            raise
        sys.stderr.write(f"error: unexpected {type(e).__name__}: {one_line(e)[:300]} (a bug: please report it "
                         "with the output of the same command with -v)\n")
        return 1
