"""The `evaluate` command: score images against a reference and a prompt, or sweep an adapter's weight."""

from __future__ import annotations

import argparse
import logging

from .argtypes import float_range, int_range
from .cli import _out
from .errors import IPAKitError

logger = logging.getLogger("ipa_train")


def _print_scores(scores) -> None:
    follow = "skipped" if scores.prompt_following is None else f"{scores.prompt_following:5.1f} / 100"
    diversity = "n/a (one image)" if scores.diversity is None else f"{scores.diversity:5.1f} / 100"
    _out(f"  preservation      {scores.preservation:5.1f} / 100")
    _out(f"  prompt following  {follow}")
    _out(f"  combined          {scores.combined:5.1f} / 100   grade {scores.grade}")
    _out(f"  diversity         {diversity}   ({scores.images} images)")


def _print_sweep(sweep) -> None:
    def cell(v):
        return "  n/a" if v is None else f"{v:5.1f}"

    for mode in sweep.modes:
        _out(f"  {mode} mode: weight  preservation  prompt  diversity")
        for p in (p for p in sweep.points if p.mode == mode):
            _out(f"    {p.weight:12.2f}  {cell(p.preservation):>12}  {cell(p.prompt_following):>6}  {cell(p.diversity):>9}")


def _sweep_generator(args: argparse.Namespace, reference):
    """`generate(weight, mode, seed)` over the diffusers backbone named by the flags (or the tiny random one)."""
    import tempfile
    from pathlib import Path

    from .adapter.formats import load_adapter
    from .evaluation import backbone_generator
    from .hosts.backbone_diffusers import DiffusersBackbone

    if args.tiny:
        from .toy.tiny import tiny_adapter, tiny_components

        logger.warning("--tiny: the backbone is a tiny RANDOM model; this checks the pipeline, not an adapter")
        with tempfile.TemporaryDirectory() as tmp:
            components = tiny_components(Path(tmp) / "tokenizer", seed=0)
        backbone = DiffusersBackbone(components=components, device="cpu", keep_encoders=True)
        adapter = load_adapter(args.adapter) if args.adapter else tiny_adapter(backbone.unet)
    else:
        missing = [flag for flag, v in (("--base-model", args.base_model), ("--image-encoder", args.image_encoder),
                                         ("--adapter", args.adapter)) if not v]
        if missing:
            raise IPAKitError(f"evaluate --sweep needs {', '.join(missing)} (or --tiny for an offline check)")
        backbone = DiffusersBackbone(args.base_model, args.image_encoder, keep_encoders=True)
        adapter = load_adapter(args.adapter)
    return backbone_generator(backbone, adapter, reference, args.prompt, steps=args.steps, size=args.size,
                              guidance=args.guidance, fusion_lambda=args.fusion_lambda)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .adapter.formats import atomic_write
    from .evaluation import EvalReport, Scorer, WeightSweep, load_image

    if args.sweep == bool(args.images):
        raise IPAKitError("evaluate: give either --images IMG... (score those) or --sweep (generate and score)")
    if not args.clip and not args.tiny:
        raise IPAKitError("evaluate needs --clip: a folder or hub id of a full CLIP model (e.g. openai/clip-vit-large-patch14)")
    from .outputs import check_output_file

    if args.json:
        check_output_file(args.json, 0, "--json report")
    if args.sweep:
        check_output_file(args.plot, 0, "--plot image")
        if args.size % 8:
            raise IPAKitError(f"--size must be a multiple of 8 (the VAE's downscale), got {args.size}")
    reference = load_image(args.reference)
    if args.clip:
        scorer = Scorer.from_pretrained(args.clip)
    else:
        import tempfile

        from .toy.tiny import write_tiny_clip

        with tempfile.TemporaryDirectory() as tmp:
            scorer = Scorer.from_pretrained(write_tiny_clip(tmp))
    report = EvalReport(clip=args.clip or "tiny random CLIP", prompt=args.prompt, notes=scorer.notes,
                        inputs={"reference": args.reference})
    if args.sweep:
        generate = _sweep_generator(args, reference)
        sweep = WeightSweep(scorer, [reference], args.prompt, args.weights, args.modes, args.seeds).run(generate)
        report.sweep = sweep
        report.inputs.update({"adapter": args.adapter or ("tiny random" if args.tiny else None),
                              "base_model": "tiny random" if args.tiny else args.base_model,
                              "steps": args.steps, "size": args.size, "guidance": args.guidance,
                              "fusion_lambda": args.fusion_lambda})
        _out(f"weight sweep ({len(sweep.seeds)} seeds per point), prompt {args.prompt!r}:")
        _print_sweep(sweep)
        img = sweep.plot()
        atomic_write(args.plot, lambda tmp: img.save(tmp, format="PNG"))
        _out(f"wrote {args.plot}")
    else:
        images = [load_image(p) for p in args.images]
        report.inputs["images"] = list(args.images)
        report.scores = scorer.score(images, [reference], args.prompt)
        _out(f"{len(images)} images against {args.reference}, prompt {args.prompt!r}:")
        _print_scores(report.scores)
    for note in report.notes:
        _out(f"note: {note}")
    if args.json:
        _out(f"wrote {report.save(args.json)}")
    return 0


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("evaluate", help="score images (reference preservation, prompt following, diversity) "
                                        "or sweep the adapter weight in scaled and fused mode")
    s.add_argument("--clip", default=None, help="folder or hub id of a full CLIP model (text + vision), "
                                                "e.g. openai/clip-vit-large-patch14")
    s.add_argument("--reference", required=True, help="the reference image")
    s.add_argument("--prompt", required=True, help="the prompt the images were (or are) generated from")
    s.add_argument("--images", nargs="+", default=None, help="generated images to score")
    s.add_argument("--json", default=None, help="write the report to this JSON file")
    g = s.add_argument_group("weight sweep")
    g.add_argument("--sweep", action="store_true", help="generate at each weight x mode x seed and score")
    g.add_argument("--base-model", default=None, help="diffusers Stable Diffusion folder or hub id")
    g.add_argument("--image-encoder", default=None, help="CLIPVisionModelWithProjection folder or hub id")
    g.add_argument("--adapter", default=None, help="the IP-Adapter file to evaluate")
    g.add_argument("--tiny", action="store_true", help="offline check with a tiny random backbone (and CLIP and "
                                                       "adapter unless given): tests the pipeline, not an adapter")
    g.add_argument("--weights", nargs="+", type=float_range(-10.0, 10.0), default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
                   help="adapter weights (default: 0 to 1.5 in steps of 0.25)")
    g.add_argument("--modes", nargs="+", choices=["scaled", "fused"], default=["scaled", "fused"])
    g.add_argument("--seeds", nargs="+", type=int_range(0, 2**64 - 1), default=[0, 1, 2], help="seeds per point (default: 0 1 2)")
    g.add_argument("--steps", type=int_range(1, 1000), default=20, help="DDIM steps per image (default: 20)")
    g.add_argument("--size", type=int_range(8, 4096), default=512, help="image size in pixels (default: 512)")
    g.add_argument("--guidance", type=float_range(0.0, 100.0), default=5.0, help="classifier-free guidance (default: 5.0)")
    g.add_argument("--fusion-lambda", type=float_range(0.0, 1.0), default=0.8, help="fused mode's lambda (default: 0.8)")
    g.add_argument("--plot", default="weight_sweep.png", help="sweep plot PNG (default: weight_sweep.png)")
    s.set_defaults(func=cmd_evaluate)
