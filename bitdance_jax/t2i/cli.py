"""Command line for text-to-image sampling.

    python -m bitdance_jax.t2i --ckpt DIR --prompt "a red cube" --height 1024 --width 1024 --out a.png
    python -m bitdance_jax.t2i --ckpt DIR --prompts-file prompts.txt --out-dir images/
    python -m bitdance_jax.t2i --ckpt DIR --prompts-file dpg_bench/prompts.json --layout dpg \
        --out-dir results/dpg --num-images 4 --guidance-scale 7.5 --height 1024 --width 1024
    python -m bitdance_jax.t2i --ckpt DIR --layout geneval --out-dir results/geneval \
        --prompts-file geneval/evaluation_metadata_long.jsonl --num-images 4 --guidance-scale 13

Several processes (``--coordinator/--num-processes/--process-id``, or a SLURM / Open MPI /
TPU VM launch) split a prompt set into contiguous shares, one per process; each loads the
model and samples on its own devices (no collective). ``--prompt`` images are written by
process 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

from bitdance_jax import images as image_lib
from bitdance_jax.checkpointing.param_dir import CheckpointError
from bitdance_jax.hub import HubError
from bitdance_jax.nn.precision import DTYPES, MATMUL_PRECISIONS, resolve_dtype
from bitdance_jax.parallel import distributed
from bitdance_jax.porting.convention import PortingError
from bitdance_jax.t2i import evaluation
from bitdance_jax.t2i.pipeline import load_t2i, to_pil
from bitdance_jax.t2i.prompts import read_prompts_file

DONE_TIMEOUT_S = 7 * 24 * 3600.0  # how long a process that is done waits for the others' shares


def run_prompt_set(pipe, entries, args) -> list[str]:
    """Sample this process's pending prompts in batches and write them in ``args.layout``."""
    import jax
    from tqdm import tqdm
    distributed.run_once("t2i_prompt_set.prepare", lambda: evaluation.prepare_out_dir(
        args.out_dir, entries, args.layout, args.num_images, evaluation.run_fingerprint(
            pipe, entries, layout=args.layout, height=args.height, width=args.width,
            steps=args.steps, guidance_scale=args.guidance_scale, num_images=args.num_images,
            seed=args.seed)))
    mine = evaluation.process_share(entries, jax.process_index(), jax.process_count())
    todo = evaluation.pending(mine, args.out_dir, args.layout, args.num_images)
    written = []
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="prompts", unit="prompt",
               dynamic_ncols=True)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        seeds = [args.seed + e.index for e in chunk]
        bits = pipe.sample_latents([e.prompt for e in chunk], args.height, args.width,
                                   num_sampling_steps=args.steps,
                                   guidance_scale=args.guidance_scale,
                                   num_images=args.num_images,
                                   seed=args.seed,
                                   sample_indices=evaluation.sample_indices(chunk, args.num_images))
        n = args.num_images
        for k, entry in enumerate(chunk):  # decoded per prompt: a GAN decoder's noise from its seed
            images = image_lib.to_uint8_like_reference(
                pipe.decode_latents(bits[k * n:(k + 1) * n], seed=seeds[k]))
            written += evaluation.write_prompt(args.out_dir, entry, images, args.layout)
        bar.update(len(chunk))
    bar.close()
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="released folder or ported directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts-file", help="prompt set: .txt (one per line), .json (DPG-Bench "
                                            "{id: prompt}) or .jsonl (GenEval metadata lines)")
    p.add_argument("--out", help="PNG path (--prompt; several images get _<i> suffixes)")
    p.add_argument("--out-dir", help="output folder of a --prompts-file run")
    p.add_argument("--layout", choices=evaluation.LAYOUTS, default="flat",
                   help="--prompts-file outputs: flat PNGs, DPG-Bench grids or GenEval folders")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="SDE steps of the head per image step")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0,
                   help="--prompt: its seed; --prompts-file: prompt i uses seed + i")
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together")
    p.add_argument("--dtype", choices=["auto"] + sorted(DTYPES), default="auto",
                   help="compute policy (auto: bf16-mixed on GPU/TPU, float32 on CPU)")
    p.add_argument("--param-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="stored dtype of the LLM/head/projector params (auto: bfloat16 when "
                        "computing in bf16, as the reference loads its LLM, else float32)")
    p.add_argument("--matmul-precision", choices=sorted(MATMUL_PRECISIONS), default="default",
                   help="precision of float32 matmuls")
    p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                   help="weight-only quantized LLM/head/projector kernels, quantized as they "
                        "are read (a directory ported with --quantize loads as stored)")
    distributed.add_arguments(p)
    args = p.parse_args(argv)

    try:
        distributed.initialize_from(args)  # before any other JAX call
        if args.prompt is not None and not args.out:
            raise ValueError("--prompt needs --out")
        if args.prompts_file is not None and not args.out_dir:
            raise ValueError("--prompts-file needs --out-dir")
        if args.batch_size < 1 or args.num_images < 1:
            raise ValueError("--batch-size and --num-images must be >= 1")
        entries = read_prompts_file(args.prompts_file) if args.prompts_file else None
        dtype = resolve_dtype(args.dtype)
        param_dtype = dtype if args.param_dtype == "auto" else jnp.dtype(args.param_dtype)
        pipe = load_t2i(args.ckpt, param_dtype=param_dtype, dtype=dtype,
                        precision=args.matmul_precision, quantize=args.quantize)
        pipe.check_size(args.height, args.width)  # fail before any work
        if entries is not None:
            written = run_prompt_set(pipe, entries, args)
        else:
            bits = pipe.sample_latents(args.prompt, args.height, args.width,
                                       num_sampling_steps=args.steps,
                                       guidance_scale=args.guidance_scale,
                                       num_images=args.num_images, seed=args.seed, progress=True)
            stem, ext = os.path.splitext(args.out)
            written = []
            images = to_pil(pipe.decode_latents(bits, seed=args.seed))
            for j, im in enumerate(images if distributed.is_main() else []):
                path = args.out if args.num_images == 1 else f"{stem}_{j}{ext or '.png'}"
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                im.save(path)
                written.append(path)
    except (ValueError, FileNotFoundError, PortingError, CheckpointError, HubError,
            distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"images": len(written), "first": written[0] if written else None}))
    # Process 0 may still be writing: no process leaves before every one is done.
    distributed.barrier("t2i_cli_done", timeout_s=DONE_TIMEOUT_S)
    return 0
