"""Benchmark the training step of a config on the devices present; prints JSON.

    python tools/bench_train.py --config configs/digits_bitdance.py [--config.<field>=<value>]
        [--steps 10] [--warmup 2] [--tokenizer-dir DIR] [--batch 4,16]

Times the jitted train step alone (synthetic batches of the config's shapes, no input
pipeline): steps/s, images/s, tokens/s, and an MFU estimate = XLA's FLOP count of the
compiled step x steps/s / the device's dense peak for the config's ``compute_dtype``
(``bitdance_jax.train.metrics.peak_flops``). Compile time is reported separately. Where the
device's peak is not known (CPUs), ``--config.peak_tflops_per_device`` sets it, and
``mfu_vs_matmul`` compares against a measured float32 matmul rate instead.

``--batch`` takes a comma-separated list of global batch sizes (each compiled and timed in
turn, one JSON object per size, and a summary line of images/s per size). XLA counts a
``while`` loop's body once, so with ``model.scan_layers`` the FLOPs come from lowering the same
step with unscanned layers (lowered, not compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np



def matmul_flops_per_device(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul FLOP/s of one device (a reference peak where none is known)."""
    import jax
    import jax.numpy as jnp
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        f(x).block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def random_tokenizer_dir(image_size: int) -> str:
    """An untrained tokenizer with the right shapes (benchmarks need no trained weights):
    ae_d16c32 for ImageNet sizes, the digits tokenizer for small images."""
    import jax
    from flax import linen as nn
    from bitdance_jax.tokenizer.model import AE_D16C32, BinaryAutoencoder, TokenizerConfig
    from bitdance_jax.tokenizer.api import save_tokenizer
    from bitdance_jax.configs import digits_tokenizer
    if image_size > 64:
        tok = AE_D16C32
    else:
        tok = TokenizerConfig(**digits_tokenizer.get_config().tokenizer.to_dict())
    f = tok.downsample_factor
    # Jitted: one compile instead of one per op of the eager init.
    params = nn.unbox(jax.jit(BinaryAutoencoder(tok).init)(
        jax.random.PRNGKey(0), np.zeros((1, f, f, 3), np.float32))["params"])
    return save_tokenizer(os.path.join(tempfile.mkdtemp(), "tokenizer"), tok, params)


def unrolled_step_flops(config, trainer) -> float | None:
    """FLOPs of one step with the layers unrolled (XLA's count of a ``while`` body is once,
    whatever its trip count): the same step lowered with ``scan_layers=False``, remat off."""
    import copy
    import jax
    from bitdance_jax.train.metrics import step_flops
    from bitdance_jax.train.trainer import Trainer
    if not config.get("model") or not config.model.get("scan_layers", False):
        return None
    c = copy.deepcopy(config)
    c.model.scan_layers, c.model.remat = False, "none"
    t = Trainer(c, tempfile.mkdtemp(), mesh=trainer.mesh).build(trainer.num_steps)
    batch = jax_shapes(synthetic_batch(trainer, np.random.default_rng(0)))
    with jax.set_mesh(t.mesh):
        lowered = t.step_fn(batch).lower(t.abstract_state, t.frozen, batch)
    return step_flops(lowered)


def jax_shapes(tree):
    import jax
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def synthetic_batch(trainer, rng: np.random.Generator) -> dict:
    """Host batch of the shapes the task trains on (images, or cached latents)."""
    c, b = trainer.config, trainer.global_batch
    labels = rng.integers(0, c.model.num_classes if c.kind == "bitdance" else 10, b).astype(np.int32)
    if c.kind == "bitdance" and not trainer.task.from_images:
        mc = trainer.task.model_config
        latents = np.where(rng.random((b, mc.grid_size, mc.grid_size, mc.latent_dim)) > 0.5, 1, -1)
        return {"latents": latents.astype(np.int8), "label": labels}
    s = c.data.image_size
    return {"image": rng.integers(0, 256, (b, s, s, 3)).astype(np.uint8), "label": labels}


def main(argv=None) -> int:
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--batch", default="",
                        help="comma-separated global batch sizes, e.g. 4,16 (default: the config's)")
    parser.add_argument("--tokenizer-dir", default="",
                        help="bitdance configs: the frozen tokenizer (default: an untrained one)")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv[1:] if not a.startswith("--config.")])

    import jax
    from bitdance_jax.train.cli import UsageError, parse_args
    try:
        config, _, _ = parse_args([argv[0], "--config", args.config, "--workdir", "unused"]
                                  + overrides)
    except UsageError as e:
        raise SystemExit(f"error: {e}") from None
    if config.kind == "pipeline":
        raise SystemExit("error: benchmark one stage's config (e.g. configs/digits_bitdance.py)")
    if config.kind == "bitdance" and not config.tokenizer_dir:
        config.tokenizer_dir = args.tokenizer_dir or random_tokenizer_dir(config.data.image_size)
    batches = [int(b) for b in args.batch.split(",") if b.strip()] if args.batch else [None]
    measured = None
    if jax.devices()[0].platform == "cpu":
        measured = matmul_flops_per_device()
    summary = []
    for batch_size in batches:
        if batch_size is not None:
            config.global_batch_size = batch_size
        out = bench_one(args, config, overrides, measured)
        print(json.dumps(out, indent=2), flush=True)
        summary.append(out)
    if len(summary) > 1:
        print(json.dumps({"images_per_s": {o["global_batch"]: round(o["images_per_s"], 4) for o in summary},
                          "fraction_of_matmul_rate": {o["global_batch"]: o.get("mfu_vs_matmul")
                                                      for o in summary}}))
    return 0


def bench_one(args, config, overrides, measured):
    """Compile and time the step of ``config`` (one global batch size); the JSON dict."""
    import jax
    from bitdance_jax.train.metrics import peak_flops_per_device, step_flops
    from bitdance_jax.train.trainer import Trainer
    trainer = Trainer(config, tempfile.mkdtemp()).build(max(1, config.num_steps or 10 ** 6))
    state = trainer.init_state()
    rng = np.random.default_rng(0)
    batches = [trainer.to_device(synthetic_batch(trainer, rng)) for _ in range(2)]
    with jax.set_mesh(trainer.mesh):
        t = time.perf_counter()
        step = trainer.compile_step(batches[0])
        compile_s = time.perf_counter() - t
        for i in range(args.warmup):
            state, metrics = step(state, trainer.frozen, batches[i % 2])
        jax.block_until_ready(state)
        times = []
        for i in range(args.steps):
            t = time.perf_counter()
            state, metrics = step(state, trainer.frozen, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    flops = unrolled_step_flops(config, trainer) or step_flops(step)
    peak = peak_flops_per_device(config)
    out = {
        "config": args.config, "overrides": overrides, "kind": config.kind,
        "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(trainer.mesh.shape), "global_batch": trainer.global_batch,
        "compute_dtype": config.compute_dtype, "compile_s": round(compile_s, 3),
        "step_s": [round(t, 3) for t in times],
        "step_s_median": step_s, "steps_per_s": 1.0 / step_s,
        "images_per_s": trainer.global_batch / step_s,
        "tokens_per_s": trainer.global_batch * trainer.task.tokens_per_example / step_s,
        "flops_per_step_per_device": flops, "peak_flops_per_device": peak,
        "mfu": flops / step_s / peak if flops and peak else None,
        "loss": float(metrics["loss"]),
    }
    if flops and measured:
        out["matmul_flops_per_device"] = measured
        out["mfu_vs_matmul"] = flops / step_s / measured
    return out


if __name__ == "__main__":
    sys.exit(main())
