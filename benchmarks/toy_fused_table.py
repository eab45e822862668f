"""Fused mode against scaled mode on the shapes world, when the prompt's colour conflicts with the reference's.

    python benchmarks/toy_fused_table.py [--steps 600] [--projection plain] [--pairs 16] [--seeds 4] [--no-fusion-training]
    python benchmarks/toy_fused_table.py --family flux [--format xlabs-flux]

Trains one colour adapter on world images with colourless captions (by default with `--fusion`, lambda 0.5,
so the fusion weights are trained; `--no-fusion-training` trains a scaled-mode adapter and samples fused mode
with the parameter-free fusion), then samples prompts that name a colour ("a red circle on a grey
background") with a reference of another colour, `--pairs` such pairs x `--seeds` seeds, in fused mode at
lambda 1.0 (which is scaled mode exactly), 0.8, 0.6, 0.4, at weights 0.5 and 1.0. Printed per row: the share of samples the
oracle reads as the prompt's colour, as the reference's colour, and the diversity across seeds of the same
(prompt, reference) pair: RMS pixel distance (x100) and the tiny offline CLIP's cosine distance (x100, the
`diversity` of `ipa_train.evaluation`; random weights, so a rough measure). `--family flux`: the toy Flux model
and an adapter of `--format` trained as the Flux demo does (DiT adapters have no fusion weights: fused mode is
the parameter-free fusion of the image tokens with the T5 prompt states).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipa_train.demo import DIT_DEMO_LR, DIT_DEMO_STEPS, DIT_DEMO_TOKENS  # noqa: E402
from ipa_train.toy.experiment import fused_table, train_world_adapter  # noqa: E402
from ipa_train.toy.flux import toy_flux_backbone  # noqa: E402
from ipa_train.toy.model import toy_backbone  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("unet", "flux"), default="unet")
    parser.add_argument("--format", choices=("xlabs-flux", "instantx-flux"), default="xlabs-flux")
    parser.add_argument("--steps", type=int, default=None, help=f"default: 600 (unet), {DIT_DEMO_STEPS} (flux)")
    parser.add_argument("--projection", choices=("plain", "plus"), default="plain")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--no-fusion-training", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    flux = args.family == "flux"
    backbone = toy_flux_backbone(args.format) if flux else toy_backbone()
    options = ({"format": args.format, "num_tokens": DIT_DEMO_TOKENS, "lr": DIT_DEMO_LR} if flux
               else {"projection": args.projection, "fusion": not args.no_fusion_training})
    steps = args.steps or (DIT_DEMO_STEPS if flux else 600)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train_world_adapter(backbone, tmp, steps=steps, **options)
        kind = args.format if flux else args.projection
        training = "scaled training" if flux or args.no_fusion_training else "fusion trained"
        print(f"trained a {kind} adapter {steps} steps in {time.perf_counter() - started:.0f} s ({training})", flush=True)
        rows = fused_table(backbone, result.adapter, pairs=args.pairs, seeds=args.seeds)
    print("| weight | mode | lambda | follows prompt colour | follows reference colour | pixel diversity | CLIP diversity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lam = f"{r['lambda']:.1f}" + (" (= scaled)" if r["lambda"] == 1.0 else "")
        print(f"| {r['weight']:.1f} | {r['mode']} | {lam} | {r['prompt_colour']:.0%} | {r['reference_colour']:.0%} "
              f"| {r['pixel_diversity']:.1f} | {r['clip_diversity']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
