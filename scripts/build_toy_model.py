"""Rebuild the shipped toy base model `ipa_train/toy/shapes_base.safetensors` (pretraining on the shapes world).

Deterministic: the same arguments give the same weights, bit for bit (fixed seed and thread count). The
defaults are the settings of the shipped file; its metadata records them (`info.config`).

    python scripts/build_toy_model.py                       # about 30-40 minutes on a 2-core CPU (one thread)
    python scripts/build_toy_model.py --output /tmp/m.safetensors --steps 200   # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipa_train.toy.model import SHIPPED, load_components  # noqa: E402
from ipa_train.toy.pretrain import PretrainConfig, pretrain, text_only_accuracy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(SHIPPED), help="model file to write (default: the shipped one)")
    parser.add_argument("--checkpoints", default=None, help="folder for intermediate EMA checkpoints")
    for f in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--eval-samples", type=int, default=64, help="text-only samples read by the oracle at the end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    info = pretrain(args.output, config, args.checkpoints)
    print(json.dumps(info))
    if args.eval_samples:
        print("text-only accuracy:", json.dumps(text_only_accuracy(load_components(args.output), n=args.eval_samples)))


if __name__ == "__main__":
    main()
