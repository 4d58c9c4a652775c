"""Training metrics: averaged logs to stdout with a progress bar and TensorBoard, FLOP counts and MFU."""
from __future__ import annotations

import os
import sys
import time

import jax

# Dense peak FLOP/s per chip (bf16) by jax device_kind prefix, for the MFU estimate.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12), ("NVIDIA L4", 121e12),
)


def peak_flops_per_device(config) -> float | None:
    if config.get("peak_tflops_per_device", 0):
        return config.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix):
            return flops
    return None

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
