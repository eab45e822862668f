"""Command line: `python -m ipa_train inspect FILE [--json]`, `convert IN OUT`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import IPAKitError

logger = logging.getLogger("ipa_train")

_LABELS = (
    ("variant", "variant"),
    ("family", "base model family"),
    ("projection", "projection"),
    ("num_tokens", "image tokens"),
    ("clip_output", "CLIP output"),
    ("clip_embedding_dim", "CLIP width"),
    ("encoder", "CLIP vision encoder"),
    ("cross_attention_dim", "cross-attention width"),
    ("cross_attention_layers", "cross-attention layers"),
    ("parameters", "parameters"),
    ("fusion", "fusion weights"),
    ("source", "file kind"),
)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .formats import inspect_file

    info = inspect_file(args.file)
    if args.json:
        _out(json.dumps(info, sort_keys=True))
    else:
        _out(info["file"])
        for key, label in _LABELS:
            value = info[key]
            if key == "parameters":
                value = f"{value:,}"
            elif key == "fusion":
                value = "yes (trained)" if value else "no (fused mode uses the parameter-free fusion)"
            _out(f"  {label:<24} {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats import convert_checkpoint

    cfg = convert_checkpoint(args.src, args.dst)
    _out(f"wrote {args.dst}: {cfg.variant} adapter, {cfg.cross_attention_layers} layers, encoder {cfg.encoder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ipa_train", description="ComfyUI IP-Adapter Kit command line")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe an IP-Adapter weight file")
    s.add_argument("file", help=".safetensors, .bin/.pt file, or training checkpoint folder")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("convert", help="convert a training checkpoint into the official flat safetensors layout")
    s.add_argument("src", help="checkpoint file or folder (accelerate checkpoint-N/)")
    s.add_argument("dst", help="output .safetensors")
    s.set_defaults(func=cmd_convert)
    return p



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except IPAKitError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
