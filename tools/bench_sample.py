#!/usr/bin/env python
"""Throughput of the class-conditional sampler on whatever devices exist, as JSON.

    python tools/bench_sample.py --model tiny --batch 8 --steps 25
    python tools/bench_sample.py --model BitDance-B-4x --batch 64 --steps 100 --dtype bfloat16
    python tools/bench_sample.py --ckpt DIR --batch 64 --decode
    python tools/bench_sample.py --model BitDance-B-16x --batch 2,16 --steps 25 --cfg-scale 6.1

Without --ckpt the weights are random (same cost as real ones: the AR loop has static
shapes). Compile time is measured on its own (ahead-of-time lower + compile); the steady
state is the median of --repeats runs of the compiled program. ``tokens_per_s`` counts latent
tokens (h*w per image); the tokenizer decode is timed apart with --decode.

``--batch`` takes a comma-separated list (one JSON object per size, then a summary line).
``flops`` adds up XLA's counts of the loop bodies (prefill, one AR step, one head call) times
their trip counts, since XLA counts a loop's body once. ``mfu`` divides the achieved rate per
device by the chip's dense peak for ``--dtype`` (``bitdance_jax.train.metrics.peak_flops``;
null where the chip is not listed, e.g. CPUs); on CPUs ``fraction_of_matmul_rate`` divides it
by a measured float32 matmul rate instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np
from flax import linen as nn


from bitdance_jax.c2i.api import load_model
from bitdance_jax.c2i.config import BitDanceConfig, inference_config
from bitdance_jax.c2i.model import (BitDanceBackbone, abstract_backbone_params, head_apply,
                                    init_cache)
from bitdance_jax.c2i.sampler import Sampler
from bitdance_jax.configs.bitdance_models import MODELS
from bitdance_jax.nn.diffusion_head import abstract_head_params
from bitdance_jax.nn.layers import DTYPES
from bitdance_jax.train.metrics import peak_flops
from bench_train import matmul_flops_per_device  # tools/ is this script's directory


def random_params(config: BitDanceConfig, seed: int = 0) -> dict:
    """Random weights of the right shapes (norm scales 1, the rest N(0, 0.02^2))."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if path[-1].key == "scale":
            return np.ones(a.shape, np.float32)
        return (0.02 * rng.standard_normal(a.shape)).astype(np.float32)
    trees = {"model": abstract_backbone_params(config), "head": abstract_head_params(config.head_config)}
    return jax.tree_util.tree_map_with_path(leaf, nn.unbox(trees))


def sample_flops(config: BitDanceConfig, params, rows: int, head_steps: int, dtype) -> float | None:
    """FLOPs of one sampler call on ``rows`` rows (2B when guided): XLA's counts of the prefill,
    one AR step and one head evaluation, each lowered alone, times how often each runs."""
    import jax.numpy as jnp
    cfg = inference_config(config)
    backbone = BitDanceBackbone(cfg, dtype=dtype, param_dtype=jnp.float32)
    model_vars = {"params": params["model"]}
    caches = init_cache(cfg, rows, dtype)
    p = cfg.parallel_num

    def count(fn, *args):
        cost = jax.jit(fn).lower(*args).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", 0.0))
    try:
        prefill = count(lambda v, i, c: backbone.apply(v, i, c, method="prefill"),
                        model_vars, np.zeros((rows,), np.int32), caches)
        step = count(lambda v, x, c: backbone.apply(v, x, 1, c, method="step"),
                     model_vars, np.zeros((rows, p, cfg.latent_dim), np.float32), caches)
        net_fn = head_apply(cfg, params["head"], dtype)
        head = count(net_fn, np.zeros((rows, p, cfg.latent_dim), np.float32),
                     np.zeros((rows,), np.float32), np.zeros((rows, p, cfg.dim), np.float32))
    except Exception:  # some backends do not implement cost analysis
        return None
    return prefill + (cfg.num_steps - 1) * step + cfg.num_steps * (head_steps + 1) * head


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help=f"one of {sorted(MODELS)}")
    ap.add_argument("--ckpt", help="a ported model directory (overrides --model)")
    ap.add_argument("--batch", default="8",
                    help="images per call (global); a comma-separated list times each, e.g. 2,16")
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
    measured = matmul_flops_per_device() if jax.devices()[0].platform == "cpu" else None
    summary = []
    for batch in [int(b) for b in str(args.batch).split(",") if b.strip()]:
        result = bench_one(args, config, params, sampler, model, name, batch, dtype, measured)
        print(json.dumps(result, indent=2), flush=True)
        summary.append(result)
    if len(summary) > 1:
        print(json.dumps({"images_per_s": {r["batch"]: r["images_per_s"] for r in summary},
                          "mfu": {r["batch"]: r["mfu"] for r in summary},
                          "fraction_of_matmul_rate": {r["batch"]: r.get("fraction_of_matmul_rate")
                                                      for r in summary}}))
    return 0


def bench_one(args, config, params, sampler, model, name, batch, dtype, measured) -> dict:
    """Compile and time the sampler at one batch size; the JSON dict."""
    class_ids = np.arange(batch) % config.num_classes
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
        "batch": batch, "padded_batch": int(len(call_args[1])),
        "head_steps": args.steps, "cfg_scale": args.cfg_scale, "ar_steps": config.num_steps,
        "parallel_num": config.parallel_num, "tokens_per_image": config.num_tokens,
        "compile_s": round(compile_s, 3), "run_s": [round(t, 4) for t in times],
        "steady_s": round(steady, 4), "images_per_s": round(batch / steady, 3),
        "tokens_per_s": round(batch * config.num_tokens / steady, 1),
    }
    if args.decode and model is not None:
        latents = np.asarray(compiled(*call_args))[:batch]
        model.decode(latents)   # compile
        t0 = time.perf_counter()
        model.decode(latents)
        result["decode_s"] = round(time.perf_counter() - t0, 4)
        result["decode_images_per_s"] = round(batch / result["decode_s"], 3)
    rows = int(len(call_args[1])) * (2 if args.cfg_scale > 1.0 else 1)
    flops = sample_flops(config, params if model is None else model.params, rows, args.steps, dtype)
    peak = peak_flops(jax.devices()[0].device_kind, args.dtype)
    rate_per_device = flops / steady / jax.device_count() if flops else None
    result.update(flops=flops, peak_flops_per_device=peak,
                  mfu=round(rate_per_device / peak, 4) if rate_per_device and peak else None)
    if flops and measured:
        result["matmul_flops_per_device"] = measured
        result["fraction_of_matmul_rate"] = round(rate_per_device / measured, 4)
    return result


if __name__ == "__main__":
    sys.exit(main())
