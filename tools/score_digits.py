"""Score class-conditional digit samples with a classifier fitted on the real digits.

    python tools/score_digits.py out/default            # the embedded default's workdir
    python tools/score_digits.py samples/final.npz      # images + labels written by training
    python tools/score_digits.py --model out/default/bitdance/export --per-class 20

Prints the share of samples the classifier assigns to their conditioning class (and per
class) as JSON; the embedded default aims for >= 0.8.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


from bitdance_jax.evaluation.digits_score import score_samples


def find_samples(path: str) -> str:
    if path.endswith(".npz"):
        return path
    for candidate in (os.path.join(path, "bitdance", "samples", "final.npz"),
                      os.path.join(path, "samples", "final.npz")):
        if os.path.isfile(candidate):
            return candidate
    raise SystemExit(f"error: no samples under {path!r} (expected samples/final.npz; "
                     "run the training first)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="a workdir or a samples .npz")
    parser.add_argument("--model", help="a trained digits model directory: sample afresh")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--steps", type=int, default=25, help="diffusion-head sampling steps")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.model:
        from bitdance_jax.c2i.api import load_model
        model = load_model(args.model)
        labels = np.repeat(np.arange(model.config.num_classes, dtype=np.int32), args.per_class)
        images = model.sample(labels, seed=args.seed, cfg_scale=args.cfg_scale,
                              num_sampling_steps=args.steps)
    elif args.path:
        with np.load(find_samples(args.path)) as f:
            images, labels = f["images"], f["labels"]
    else:
        parser.error("give a workdir / .npz path or --model")
    result = score_samples(images, labels)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
