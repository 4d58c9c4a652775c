"""Tokenizer round trip on real image files: encode to bits, decode, report PSNR/SSIM.

    python -m bitdance_jax.tokenizer --ckpt DIR --images a.png b.jpg --out recon.png

Each image is converted to RGB, centre-cropped to a square and resized to ``--size``
(``--resize-mode resize`` stretches instead). ``--out`` gets a grid with one row per
image: original | reconstruction; ``--out-dir`` also writes each reconstruction.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from bitdance_jax.images import (RESIZE_MODES, load_image, make_grid, psnr, save_png, ssim,
                                 to_uint8)
from bitdance_jax.hub import HubError
from bitdance_jax.tokenizer.api import load_tokenizer


def round_trip(tokenizer, paths, size, resize_mode="center-crop", batch_size=8, progress=True):
    """Yields (path, original uint8, reconstruction uint8, bits) per image."""
    for i in tqdm(range(0, len(paths), batch_size), desc="tokenize", unit="batch",
                  disable=not progress or len(paths) <= batch_size):
        chunk = paths[i:i + batch_size]
        images = np.stack([load_image(p, size, resize_mode) for p in chunk])
        bits = tokenizer.encode(images)
        recon = tokenizer.decode(bits)
        for j, p in enumerate(chunk):
            yield p, to_uint8(images[j]), to_uint8(recon[j]), bits[j]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ported tokenizer (or model) directory")
    p.add_argument("--images", nargs="+", required=True, help="image files (any Pillow format)")
    p.add_argument("--out", required=True, help="PNG grid: original | reconstruction per row")
    p.add_argument("--out-dir", help="also write each reconstruction here")
    p.add_argument("--size", type=int, default=256, help="square side fed to the tokenizer")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="center-crop")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    try:
        tok = load_tokenizer(args.ckpt)
        if args.size % tok.downsample_factor:
            raise ValueError(f"--size {args.size} is not a multiple of the tokenizer's "
                             f"downsampling factor {tok.downsample_factor}")
        rows, scores = [], []
        for path, orig, recon, bits in round_trip(tok, args.images, args.size, args.resize_mode,
                                                  args.batch_size):
            score = {"image": path, "psnr": psnr(orig, recon), "ssim": ssim(orig, recon),
                     "latent_shape": list(bits.shape)}
            scores.append(score)
            print(json.dumps(score))
            rows.extend([orig, recon])
            if args.out_dir:
                name = os.path.splitext(os.path.basename(path))[0] + "_recon.png"
                save_png(recon, os.path.join(args.out_dir, name))
    except (ValueError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_png(make_grid(np.stack(rows), ncol=2), args.out)
    print(json.dumps({"images": len(scores), "mean_psnr": float(np.mean([s["psnr"] for s in scores])),
                      "mean_ssim": float(np.mean([s["ssim"] for s in scores])), "grid": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
