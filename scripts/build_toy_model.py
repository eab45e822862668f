"""Rebuild the shipped toy base model `ipa_train/toy/shapes_base.safetensors` (pretraining on the shapes world).

Deterministic: the same arguments give the same weights, bit for bit (fixed seed and thread count). The
defaults are the settings of the shipped file; its metadata records them (`info.config`).

    python scripts/build_toy_model.py                       # about 30-40 minutes on a 2-core CPU (one thread)
    python scripts/build_toy_model.py --output /tmp/m.safetensors --steps 200   # quick check
    python scripts/build_toy_model.py --unet-from EARLIER.safetensors   # only the image-encoder stage (4 minutes)

Two stages: the UNet learns to draw the world from captions (`--steps`), then the image encoder learns to tell
its colours, shapes and backgrounds apart (`--encoder-steps`). They share only the seed, so `--unet-from` with
a file of an earlier build (same UNet settings) gives the same result as running both stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipa_train.toy.encoder import probe_accuracy  # noqa: E402
from ipa_train.toy.model import SHIPPED, load_components  # noqa: E402
from ipa_train.toy.pretrain import PretrainConfig, pretrain, text_only_accuracy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(SHIPPED), help="model file to write (default: the shipped one)")
    parser.add_argument("--checkpoints", default=None, help="folder for intermediate EMA checkpoints")
    parser.add_argument("--unet-from", default=None, help="take the UNet stage from this earlier build's file")
    for f in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--eval-samples", type=int, default=64, help="text-only samples read by the oracle at the end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    info = pretrain(args.output, config, args.checkpoints, unet_from=args.unet_from)
    print(json.dumps(info))
    print("image embeddings, nearest-class-mean accuracy:", json.dumps(probe_accuracy(load_components(args.output)["image_encoder"])))
    if args.eval_samples:
        print("text-only accuracy:", json.dumps(text_only_accuracy(load_components(args.output), n=args.eval_samples)))


if __name__ == "__main__":
    main()
