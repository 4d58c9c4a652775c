#!/usr/bin/env python
"""Throughput of the class-conditional sampler on whatever devices exist, as JSON.

    python tools/bench_sample.py --model tiny --batch 8 --steps 25
    python tools/bench_sample.py --model BitDance-B-4x --batch 64 --steps 100 --dtype bfloat16
    python tools/bench_sample.py --ckpt DIR --batch 64 --decode

Without --ckpt the weights are random (same cost as real ones: the AR loop has static
shapes). Compile time is measured on its own (ahead-of-time lower + compile); the steady
state is the median of --repeats runs of the compiled program. ``tokens_per_s`` counts latent
tokens (h*w per image); the tokenizer decode is timed apart with --decode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np
from flax import linen as nn


from bitdance_jax.nn.diffusion_head import abstract_head_params
from bitdance_jax.nn.layers import DTYPES
from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.c2i.model import abstract_backbone_params
from bitdance_jax.c2i.api import load_model
from bitdance_jax.c2i.sampler import Sampler
from bitdance_jax.configs.bitdance_models import MODELS


def random_params(config: BitDanceConfig, seed: int = 0) -> dict:
    """Random weights of the right shapes (norm scales 1, the rest N(0, 0.02^2))."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if path[-1].key == "scale":
            return np.ones(a.shape, np.float32)
        return (0.02 * rng.standard_normal(a.shape)).astype(np.float32)
    trees = {"model": abstract_backbone_params(config), "head": abstract_head_params(config.head_config)}
    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(trees))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help=f"one of {sorted(MODELS)}")
    ap.add_argument("--ckpt", help="a ported model directory (overrides --model)")
    ap.add_argument("--batch", type=int, default=8, help="images per call (global)")
    ap.add_argument("--steps", type=int, default=100, help="head Euler-Maruyama steps per AR step")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", action="store_true", help="also time the tokenizer decode (--ckpt)")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]

    model = None
    if args.ckpt:
        model = load_model(args.ckpt, dtype=dtype)
        config, params, sampler = model.config, model.params, model.sampler
        name = args.ckpt
    else:
        if args.model not in MODELS:
            raise SystemExit(f"unknown --model {args.model!r}; choose from {sorted(MODELS)}")
        config = MODELS[args.model]
        params, sampler, name = random_params(config), Sampler(config, dtype=dtype), args.model
    class_ids = np.arange(args.batch) % config.num_classes
    program, call_args = sampler.prepare(params, class_ids, cfg_scale=args.cfg_scale,
                                         num_sampling_steps=args.steps)
    t0 = time.perf_counter()
    compiled = program.lower(*call_args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*call_args))
        times.append(time.perf_counter() - t0)
    steady = float(np.median(times))
    result = {
        "model": name, "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "dtype": args.dtype,
        "batch": args.batch, "padded_batch": int(len(call_args[1])),
        "head_steps": args.steps, "cfg_scale": args.cfg_scale, "ar_steps": config.num_steps,
        "parallel_num": config.parallel_num, "tokens_per_image": config.num_tokens,
        "compile_s": round(compile_s, 3), "run_s": [round(t, 4) for t in times],
        "steady_s": round(steady, 4), "images_per_s": round(args.batch / steady, 3),
        "tokens_per_s": round(args.batch * config.num_tokens / steady, 1),
    }
    if args.decode and model is not None:
        latents = np.asarray(compiled(*call_args))[:args.batch]
        model.decode(latents)   # compile
        t0 = time.perf_counter()
        model.decode(latents)
        result["decode_s"] = round(time.perf_counter() - t0, 4)
        result["decode_images_per_s"] = round(args.batch / result["decode_s"], 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
