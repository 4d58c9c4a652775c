"""Command line for text-to-image sampling.

    python -m bitdance_jax.t2i --ckpt DIR --prompt "a red cube" --height 1024 --width 1024 --out a.png
    python -m bitdance_jax.t2i --ckpt DIR --prompts-file prompts.txt --out-dir images/
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

from bitdance_jax.checkpointing.param_dir import CheckpointError
from bitdance_jax.nn.precision import DTYPES, MATMUL_PRECISIONS, resolve_dtype
from bitdance_jax.porting.convention import PortingError
from bitdance_jax.t2i.pipeline import load_t2i, to_pil
from bitdance_jax.t2i.prompts import read_prompts_file

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="released folder or ported directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--out", help="PNG path (--prompt; several images get _<i> suffixes)")
    p.add_argument("--out-dir", help="folder for --prompts-file: <line index>[_<i>].png")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="SDE steps of the head per image step")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch (+1 per batch)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together")
    p.add_argument("--dtype", choices=["auto"] + sorted(DTYPES), default="auto",
                   help="compute policy (auto: bf16-mixed on GPU/TPU, float32 on CPU)")
    p.add_argument("--param-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="stored dtype of the LLM/head/projector params (auto: bfloat16 when "
                        "computing in bf16, as the reference loads its LLM, else float32)")
    p.add_argument("--matmul-precision", choices=sorted(MATMUL_PRECISIONS), default="default",
                   help="precision of float32 matmuls")
    args = p.parse_args(argv)
    from tqdm import tqdm

    try:
        if args.prompt is not None and not args.out:
            raise ValueError("--prompt needs --out")
        if args.prompts_file is not None and not args.out_dir:
            raise ValueError("--prompts-file needs --out-dir")
        prompts = [args.prompt] if args.prompt is not None else read_prompts_file(args.prompts_file)
        dtype = resolve_dtype(args.dtype)
        param_dtype = dtype if args.param_dtype == "auto" else jnp.dtype(args.param_dtype)
        pipe = load_t2i(args.ckpt, param_dtype=param_dtype, dtype=dtype,
                        precision=args.matmul_precision)
        pipe.check_size(args.height, args.width)  # fail before any work
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        written = []
        bar = tqdm(total=len(prompts), desc="prompts", unit="prompt", disable=len(prompts) == 1)
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            seed = args.seed + start // args.batch_size
            bits = pipe.sample_latents(chunk, args.height, args.width,
                                       num_sampling_steps=args.steps,
                                       guidance_scale=args.guidance_scale,
                                       num_images=args.num_images, seed=seed,
                                       progress=len(prompts) == 1)
            images = to_pil(pipe.decode_latents(bits, seed=seed))
            for k, im in enumerate(images):
                i, j = start + k // args.num_images, k % args.num_images
                if args.prompt is not None:
                    stem, ext = os.path.splitext(args.out)
                    path = args.out if args.num_images == 1 else f"{stem}_{j}{ext or '.png'}"
                else:
                    name = f"{i:05d}.png" if args.num_images == 1 else f"{i:05d}_{j}.png"
                    path = os.path.join(args.out_dir, name)
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                im.save(path)
                written.append(path)
            bar.update(len(chunk))
        bar.close()
    except (ValueError, FileNotFoundError, PortingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"images": len(written), "first": written[0] if written else None}))
    return 0
