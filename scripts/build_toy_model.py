"""Rebuild a shipped toy base model of the shapes world (pretraining on it): the UNet one,
`ipa_train/toy/shapes_base.safetensors`, or with `--family flux` the Flux one, `ipa_train/toy/shapes_flux.safetensors`.

Deterministic: the same arguments give the same weights, bit for bit (fixed seed and thread count). The
defaults are the settings of the shipped files; their metadata records them (`info.config`).

    python scripts/build_toy_model.py                       # UNet: about 30-40 minutes on a 2-core CPU (one thread)
    python scripts/build_toy_model.py --family flux         # Flux: about 50 minutes (one thread)
    python scripts/build_toy_model.py --output /tmp/m.safetensors --steps 200   # quick check
    python scripts/build_toy_model.py --unet-from EARLIER.safetensors   # only the image-encoder stage (4 minutes)
    python scripts/build_toy_model.py --family flux --transformer-from EARLIER.safetensors   # encoders only
    python scripts/build_toy_model.py --family flux --vae pixel --output F.safetensors   # no learned VAE (pixel patches)

Two stages (for Flux, after the autoencoder that is its VAE, `--vae-steps`): the denoiser learns to draw the
world from captions (`--steps`), then the image encoder(s) learn to tell its colours, shapes and backgrounds apart
(`--encoder-steps`). They share only the seed, so `--unet-from` / `--transformer-from` with a file of an earlier
build (same settings) gives the same result as all stages.
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
from ipa_train.toy.flux import SHIPPED_FLUX, VAES, load_flux_components  # noqa: E402
from ipa_train.toy.model import SHIPPED, load_components  # noqa: E402
from ipa_train.toy.pretrain import PretrainConfig, pretrain, text_only_accuracy  # noqa: E402
from ipa_train.toy.pretrain_flux import FluxPretrainConfig, pretrain_flux, text_only_accuracy_flux  # noqa: E402

FAMILIES = {  # family -> (config class, build, load, text-only accuracy, shipped file, "take stage 1 from" flag)
    "unet": (PretrainConfig, pretrain, load_components, text_only_accuracy, SHIPPED, "--unet-from"),
    "flux": (FluxPretrainConfig, pretrain_flux, load_flux_components, text_only_accuracy_flux, SHIPPED_FLUX,
             "--transformer-from"),
}


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--family", choices=sorted(FAMILIES), default="unet")
    family = first.parse_known_args()[0].family
    config_cls, build, load, accuracy, shipped, from_flag = FAMILIES[family]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[first])
    parser.add_argument("--output", default=str(shipped), help="model file to write (default: the shipped one)")
    parser.add_argument("--checkpoints", default=None, help="folder for intermediate EMA checkpoints")
    parser.add_argument(from_flag, dest="stage_from", default=None,
                        help="take the first stage (the denoiser) from this earlier build's file")
    choices = {"vae": sorted(VAES)}  # the rest are numbers, checked by argparse's type
    for f in dataclasses.fields(config_cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            choices=choices.get(f.name))
    parser.add_argument("--eval-samples", type=int, default=64, help="text-only samples read by the oracle at the end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
    info = build(args.output, config, args.checkpoints, args.stage_from)
    print(json.dumps(info))
    parts = load(args.output)
    encoders = ("clip_vision", "siglip") if family == "flux" else ("image_encoder",)
    for name in encoders:
        print(f"{name} embeddings, nearest-class-mean accuracy:", json.dumps(probe_accuracy(parts[name])))
    if args.eval_samples:
        print("text-only accuracy:", json.dumps(accuracy(parts, n=args.eval_samples)))


if __name__ == "__main__":
    main()
