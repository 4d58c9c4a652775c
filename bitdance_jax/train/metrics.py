"""Training metrics: averaged logs to stdout with a progress bar and TensorBoard, FLOP counts and MFU."""
from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp

from bitdance_jax.nn.precision import compute_dtype

# Dense (no 2:4 sparsity) peak FLOP/s per chip, by jax ``device_kind`` prefix, for the MFU
# estimate. "float32" is float32-input matmuls at JAX's default matmul precision: TF32 tensor
# cores on A100/H100/H200/B200, one bf16 pass on TPU (so the bf16 peak); matmul_precision
# "highest" (full float32) runs far below it. NVIDIA figures are the SXM parts, H100 PCIe
# apart (datasheets: A100, H100/H200, HGX B200 at 1000 W; their sparse figures halved); TPU
# figures from the Cloud TPU system-architecture pages. TPU v5e reports "TPU v5 lite", v6e "TPU v6 lite", v5p "TPU v5"
# ("TPU v5p" under Pathways); the longest matching prefix wins, so "TPU v5 lite" is not v5p.
PEAK_FLOPS = {
    #  prefix                 bfloat16    float32
    "NVIDIA A100":          (312e12,    156e12),
    "NVIDIA H100":          (989.5e12,  494.5e12),
    "NVIDIA H100 PCIe":     (756.5e12,  378e12),
    "NVIDIA H200":          (989.5e12,  494.5e12),
    "NVIDIA B200":          (2250e12,   1100e12),
    "TPU v4":               (275e12,    275e12),
    "TPU v5 lite":          (197e12,    197e12),
    "TPU v5e":              (197e12,    197e12),
    "TPU v5":               (459e12,    459e12),
    "TPU v6 lite":          (918e12,    918e12),
    "TPU v6e":              (918e12,    918e12),
}
PEAK_COLUMNS = ("bfloat16", "float32")

# HBM per TPU chip (bytes) and its bandwidth (bytes/s), same prefixes and pages as PEAK_FLOPS:
# what ``bitdance_jax.compile`` checks a program against and its roofline divides by.
GiB = 1 << 30
HBM = {
    #  prefix                 capacity     bandwidth
    "TPU v4":               (32 * GiB,   1228e9),
    "TPU v5 lite":          (16 * GiB,   819e9),
    "TPU v5e":              (16 * GiB,   819e9),
    "TPU v5":               (95 * GiB,   2765e9),
    "TPU v6 lite":          (32 * GiB,   1640e9),
    "TPU v6e":              (32 * GiB,   1640e9),
}
# The chip names users write (topology prefixes) -> their device_kind.
TPU_CHIPS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def _by_prefix(table: dict, device_kind: str):
    """``table``'s entry for the longest prefix of ``device_kind`` (None: not listed)."""
    matches = [prefix for prefix in table if device_kind.startswith(prefix)]
    return table[max(matches, key=len)] if matches else None


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one ``device_kind`` chip for matmuls taking ``dtype`` (a dtype or
    numerics policy name: float32, bfloat16, bf16-mixed); None for CPUs and unlisted chips."""
    column = PEAK_COLUMNS.index(jnp.dtype(compute_dtype(dtype)).name)
    row = _by_prefix(PEAK_FLOPS, device_kind)
    return None if row is None else row[column]


def hbm(device_kind: str) -> tuple[int, float] | None:
    """(HBM bytes, HBM bytes/s) of one ``device_kind`` TPU chip; None where not listed."""
    return _by_prefix(HBM, device_kind)


def peak_flops_per_device(config) -> float | None:
    """The MFU denominator of a training config: ``peak_tflops_per_device`` where set, else the
    table's figure for the first device and the config's ``compute_dtype``."""
    if config.get("peak_tflops_per_device", 0):
        return config.peak_tflops_per_device * 1e12
    return peak_flops(jax.devices()[0].device_kind, config.compute_dtype)


class MetricLogger:
    """Averages metrics over ``log_every`` steps; stdout (+ tqdm bar) and TensorBoard on process 0."""

    def __init__(self, workdir, total_steps, start_step, global_batch, tokens_per_example,
                 flops_per_device_step, peak_flops, enabled=True):
        self.enabled = enabled and jax.process_index() == 0
        self.global_batch, self.tokens_per_example = global_batch, tokens_per_example
        self.flops, self.peak = flops_per_device_step, peak_flops
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        self.writer = self.bar = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            from tqdm import tqdm
            self.writer = SummaryWriter(os.path.join(workdir, "tb"))
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                            file=sys.stdout, mininterval=1.0)

    def add(self, metrics: dict):
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", refresh=False)

    def flush(self, step: int) -> dict:
        if not self.count:
            return {}
        dt = time.perf_counter() - self.t0
        out = {k: v / self.count for k, v in self.sums.items()}
        steps_per_s = self.count / dt
        out.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * self.global_batch,
                   tokens_per_s=steps_per_s * self.global_batch * self.tokens_per_example)
        if self.flops and self.peak:
            out["mfu"] = self.flops * steps_per_s / self.peak
        if self.enabled:
            text = " ".join(f"{k}={v:.4g}" for k, v in sorted(out.items()))
            (self.bar.write if self.bar is not None else print)(f"step {step}: {text}")
            for k, v in out.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()
        return out

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def step_flops(compiled) -> float | None:
    """XLA's FLOP count of one compiled step per device (None where not reported)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
