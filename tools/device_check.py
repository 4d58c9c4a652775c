#!/usr/bin/env python
"""One-GPU device check in at most 8 minutes, as ONE JSON object on the last stdout line:
BitDance-B-16x sampling in bf16 at batch 64 and 256, and the largest global batch of a
BitDance-B-4x bf16-mixed training step that fits (tried from 512 down, out-of-memory sizes
skipped), each with compile time, steady time, images/s and MFU.

    tools/device_check.sh                    # on the GPU machine (runs this under timeout 480)
    python tools/device_check.py --tiny      # tiny models, any device (the CPU test)

Weights are random (the cost does not depend on them); the measurements are those of
tools/bench_sample.py and tools/bench_train.py. A part starts only while enough of
``--budget-s`` is left, else the JSON says it was skipped; a compile that overruns cannot be
interrupted, so a watchdog prints what was measured by ``--hard-limit-s`` and exits. All other
output (the benchmarks' own prints, XLA logs) goes to stderr, keeping the JSON line clean.
"""
from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports: wall_s counts them too

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import threading
import traceback

import jax

import bench_sample
import bench_train
from bitdance_jax.c2i.config import default_cfg_scale
from bitdance_jax.c2i.sampler import Sampler
from bitdance_jax.configs.bitdance_models import MODELS
from bitdance_jax.nn.precision import DTYPES
from bitdance_jax.train.cli import parse_args

SAMPLE_DTYPE = "bfloat16"
SAMPLE_FIELDS = ("batch", "compile_s", "steady_s", "images_per_s", "tokens_per_s", "flops",
                 "peak_flops_per_device", "mfu")
TRAIN_FIELDS = ("global_batch", "compute_dtype", "compile_s", "step_s_median", "images_per_s",
                "tokens_per_s", "flops_per_step_per_device", "peak_flops_per_device", "mfu")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to measure, and the time a part needs left before it starts."""
    sample_model: str
    sample_batches: tuple[int, ...]
    head_steps: int
    sample_repeats: int
    sample_min_left_s: float
    train_config: str
    train_overrides: tuple[str, ...]
    train_batches: tuple[int, ...]   # tried in this order; the first that fits is reported
    train_steps: int
    train_warmup: int
    train_min_left_s: float


DEVICE_PLAN = Plan(
    sample_model="BitDance-B-16x", sample_batches=(64, 256), head_steps=25, sample_repeats=3,
    sample_min_left_s=60, train_config="configs/imagenet_bitdance.py:B,4",
    # cached latents: the transformer step alone, not the frozen tokenizer's encode
    train_overrides=("--config.model.precision=bf16-mixed", "--config.data.cache_latents=True"),
    train_batches=(512, 256, 128, 64, 32), train_steps=5, train_warmup=2, train_min_left_s=100)
TINY_PLAN = Plan(
    sample_model="tiny", sample_batches=(2,), head_steps=2, sample_repeats=1,
    sample_min_left_s=5, train_config="configs/digits_bitdance.py",
    train_overrides=("--config.model.precision=bf16-mixed", "--config.model.n_layer=1",
                     "--config.model.dim=64", "--config.model.diff_dim=64",
                     "--config.model.diff_layers=1"),
    train_batches=(8, 4), train_steps=1, train_warmup=1, train_min_left_s=5)


class Report:
    """The JSON object, printed once: at the end, or by the watchdog at the hard limit."""

    def __init__(self, out):
        self.out, self.lock, self.printed = out, threading.Lock(), False
        self.fields = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
                       "devices": jax.device_count(), "notes": []}
        self.running = None

    def set(self, key, value):
        self.fields[key] = value   # a fresh object each time, so the watchdog never sees it half-built

    def note(self, text: str):
        print(f"device_check: {text}", file=sys.stderr, flush=True)
        self.fields["notes"] = self.fields["notes"] + [text]

    def emit(self, note: str | None = None) -> bool:
        with self.lock:
            if self.printed:
                return False
            self.printed = True
            fields = dict(self.fields)
            if note:
                fields["notes"] = fields["notes"] + [note]
            fields["wall_s"] = round(time.monotonic() - STARTED, 1)
            self.out.write(json.dumps(fields) + "\n")
            self.out.flush()
            return True


def time_left(deadline: float) -> float:
    return deadline - time.monotonic()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def sample_part(plan: Plan, deadline: float, report: Report):
    """Sampler compile and steady time per batch size (bench_sample.bench_one)."""
    config = MODELS[plan.sample_model]
    cfg_scale = default_cfg_scale(plan.sample_model, announce=False)
    bench_args = argparse.Namespace(cfg_scale=cfg_scale, steps=plan.head_steps,
                                    repeats=plan.sample_repeats, decode=False, dtype=SAMPLE_DTYPE)
    params = bench_sample.random_params(config)
    sampler = Sampler(config, dtype=DTYPES[SAMPLE_DTYPE])
    part = {"model": plan.sample_model, "dtype": SAMPLE_DTYPE, "head_steps": plan.head_steps,
            "cfg_scale": cfg_scale, "weights": "random", "results": []}
    report.set("sample", part)
    for batch in plan.sample_batches:
        if time_left(deadline) < plan.sample_min_left_s:
            report.note(f"sample batch {batch} skipped: {time_left(deadline):.0f} s of the budget "
                        f"left, it needs {plan.sample_min_left_s:.0f} s")
            break
        report.running = f"sample batch {batch}"
        try:
            result = bench_sample.bench_one(bench_args, config, params, sampler, None,
                                            plan.sample_model, batch, DTYPES[SAMPLE_DTYPE], None)
            entry = {k: result[k] for k in SAMPLE_FIELDS}
        except jax.errors.JaxRuntimeError as e:
            if not is_out_of_memory(e):
                raise
            entry = {"batch": batch, "error": "out of memory"}
        part = dict(part, results=part["results"] + [entry])
        report.set("sample", part)


def train_part(plan: Plan, deadline: float, report: Report):
    """The largest global batch whose training step fits, timed (bench_train.bench_one)."""
    config, _, _ = parse_args(["device_check", "--config", plan.train_config,
                               "--workdir", "unused", *plan.train_overrides])
    config.tokenizer_dir = bench_train.random_tokenizer_dir(config.data.image_size)
    bench_args = argparse.Namespace(config=plan.train_config, steps=plan.train_steps,
                                    warmup=plan.train_warmup)
    part = {"config": plan.train_config, "overrides": list(plan.train_overrides),
            "weights": "random", "out_of_memory_batches": []}
    report.set("train", part)
    for batch in plan.train_batches:
        if time_left(deadline) < plan.train_min_left_s:
            report.note(f"train batch {batch} skipped: {time_left(deadline):.0f} s of the budget "
                        f"left, an attempt needs {plan.train_min_left_s:.0f} s")
            return
        report.running = f"train batch {batch}"
        config.global_batch_size = batch
        try:
            result = bench_train.bench_one(bench_args, config, list(plan.train_overrides), None)
        except jax.errors.JaxRuntimeError as e:
            if not is_out_of_memory(e):
                raise
            result = None
        if result is None:
            gc.collect()   # the failed attempt's buffers, now that its traceback is gone
            part = dict(part, out_of_memory_batches=part["out_of_memory_batches"] + [batch])
            report.set("train", part)
            continue
        report.set("train", dict(part, **{k: result[k] for k in TRAIN_FIELDS}))
        return
    report.note(f"no training batch of {list(plan.train_batches)} fits")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models (a CPU smoke run)")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="no part starts without its minimum time left before this (from start)")
    ap.add_argument("--hard-limit-s", type=float, default=465,
                    help="the watchdog prints what was measured and exits at this time")
    args = ap.parse_args(argv)
    plan = TINY_PLAN if args.tiny else DEVICE_PLAN
    report = Report(sys.stdout)
    report.set("plan", "tiny" if args.tiny else "device")
    report.set("budget_s", args.budget_s)

    def on_hard_limit():
        if report.emit(f"hard limit {args.hard_limit_s:.0f} s reached during {report.running}"):
            os._exit(3)
    watchdog = threading.Timer(max(0.0, args.hard_limit_s - (time.monotonic() - STARTED)),
                               on_hard_limit)
    watchdog.daemon = True
    watchdog.start()
    deadline = STARTED + args.budget_s
    failed = False
    with contextlib.redirect_stdout(sys.stderr):
        for name, part in (("sample", sample_part), ("train", train_part)):
            try:
                part(plan, deadline, report)
            except Exception as e:  # one part failing still reports the other
                traceback.print_exc()
                report.note(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
                failed = True
    watchdog.cancel()
    report.emit()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
