"""Accuracy against training steps on the shapes world, for plain, plus and fused adapters (one run each).

    python benchmarks/bench_toy_learning.py [--steps 1200] [--every 400] [--samples 64] [--attribute colour]
    python benchmarks/bench_toy_learning.py --family flux [--variants xlabs-flux,instantx-flux]

Each variant trains once with the library's `train` on 256 world images whose captions leave the attribute out
(the shipped toy base model, CPU, batch 16, lr 1e-3), writing a checkpoint every `--every` steps; each
checkpoint's adapter then samples `--samples` prompts without the attribute, with a reference of a known value,
and the oracle reads them. Printed: the share showing the reference's value (chance: 1/8 for colour, 1/3 for
shape), at weight 1 (scaled) and, for the first variant, at weight 0. "fused" trains with `--fusion`
(lambda 0.5) and samples in fused mode at lambda 0.8; "plus-fused" does the same with the plus projection.
`--family flux`: the toy Flux model with flow-matching training of the XLabs and InstantX layouts (the demo's
token count and learning rate), sampled in scaled mode.
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

from ipa_train.adapter.formats import load_adapter  # noqa: E402
from ipa_train.demo import DIT_DEMO_LR, DIT_DEMO_TOKENS  # noqa: E402
from ipa_train.toy.experiment import train_world_adapter, transfer_accuracy  # noqa: E402
from ipa_train.toy.flux import toy_flux_backbone  # noqa: E402
from ipa_train.toy.model import toy_backbone  # noqa: E402

VARIANTS = {"plain": ("plain", False, "scaled", 1.0), "plus": ("plus", False, "scaled", 1.0),
            "fused": ("plain", True, "fused", 0.8), "plus-fused": ("plus", True, "fused", 0.8)}
DIT_VARIANTS = ("xlabs-flux", "instantx-flux")


def _variant(name: str, family: str) -> tuple[object, dict, str, float]:
    """(backbone, training options, sampling mode, lambda) of one variant."""
    if family == "flux":
        return (toy_flux_backbone(name), {"format": name, "num_tokens": DIT_DEMO_TOKENS}, "scaled", 1.0)
    projection, fusion, mode, lam = VARIANTS[name]
    return toy_backbone(), {"projection": projection, "fusion": fusion}, mode, lam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--attribute", choices=("colour", "shape"), default="colour")
    parser.add_argument("--family", choices=("unet", "flux"), default="unet")
    parser.add_argument("--variants", default=None, help="default: plain,plus,fused,plus-fused (unet), "
                                                          "xlabs-flux,instantx-flux (flux)")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (the demo's, both families)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    variants = args.variants or (",".join(DIT_VARIANTS) if args.family == "flux" else ",".join(VARIANTS))
    lr = args.lr or (DIT_DEMO_LR if args.family == "flux" else 1e-3)
    results = {}
    for name in variants.split(","):
        backbone, options, mode, lam = _variant(name, args.family)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            train_world_adapter(backbone, tmp, attribute=args.attribute, steps=args.steps, save_every=args.every,
                                lr=lr, keep_checkpoints=0, **options)
            seconds = time.perf_counter() - started
            rows = []
            checkpoints = sorted((Path(tmp) / "checkpoints").glob("checkpoint-*"))
            for ck in checkpoints:
                adapter = load_adapter(ck / "adapter.safetensors")
                step = int(ck.name.split("-")[1])
                acc = transfer_accuracy(backbone, adapter, n=args.samples, attribute=args.attribute, mode=mode,
                                        fusion_lambda=lam)
                row = {"step": step, "accuracy": acc}
                if name == variants.split(",")[0] and ck == checkpoints[-1]:
                    row["accuracy_weight0"] = transfer_accuracy(backbone, adapter, n=args.samples,
                                                                attribute=args.attribute, weight=0.0)
                rows.append(row)
                print(f"{name:13} step {step:5d}  {args.attribute} accuracy {acc:6.1%}"
                      + (f"  (weight 0: {row['accuracy_weight0']:.1%})" if "accuracy_weight0" in row else ""),
                      flush=True)
            results[name] = {"train_seconds": round(seconds, 1), "rows": rows}
            print(f"{name:13} trained {args.steps} steps in {seconds:.0f} s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
