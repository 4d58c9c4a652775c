"""The peak-FLOP/s table behind every MFU figure (real device_kind strings, both dtype columns,
prefix order, the config's dtype and override), the training-batch descent of
tools/device_check.py on faked out-of-memory errors, and ``device_check.py --tiny`` run for
real on CPU: one clean JSON line whose MFU is null there."""
import json
import os
import subprocess
import sys

import jax
import pytest

from bitdance_jax.configs import digits_bitdance
from bitdance_jax.train import metrics
from bitdance_jax.train.metrics import peak_flops, peak_flops_per_device

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")
HARD_TIMEOUT = 180


@pytest.mark.parametrize("kind, bf16, f32", [
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
    ("NVIDIA H100 80GB HBM3", 989.5e12, 494.5e12),
    ("NVIDIA H100 PCIe", 756.5e12, 378e12),
    ("NVIDIA H200", 989.5e12, 494.5e12),
    ("NVIDIA B200", 2250e12, 1100e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v6 lite", 918e12, 918e12),
])
def test_peak_flops_of_real_device_kinds(kind, bf16, f32):
    assert peak_flops(kind, "bfloat16") == bf16
    assert peak_flops(kind, "bf16-mixed") == bf16
    assert peak_flops(kind, "float32") == f32


def test_float32_column_is_tf32_on_gpus_and_one_bf16_pass_on_tpus():
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32") < peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")
    assert peak_flops("TPU v6 lite", "float32") == peak_flops("TPU v6 lite", "bfloat16")


def test_v5_lite_is_not_v5p():
    assert peak_flops("TPU v5 lite", "bfloat16") != peak_flops("TPU v5", "bfloat16")
    assert peak_flops("TPU v5 lite", "bfloat16") == 197e12


@pytest.mark.parametrize("kind", ["cpu", "TFRT_CPU_0", "NVIDIA GeForce RTX 4090", "TPU v9", ""])
def test_peak_flops_unknown_kinds_are_none(kind):
    assert peak_flops(kind, "bfloat16") is None
    assert peak_flops(kind, "float32") is None


def test_peak_flops_rejects_unknown_dtype():
    with pytest.raises(ValueError):
        peak_flops("NVIDIA H100 80GB HBM3", "float8")


class FakeDevice:
    def __init__(self, device_kind):
        self.device_kind = device_kind


def test_peak_flops_per_device_reads_config_dtype_and_override(monkeypatch):
    config = digits_bitdance.get_config()
    assert peak_flops_per_device(config) is None   # the CPU test machine
    monkeypatch.setattr(metrics.jax, "devices", lambda: [FakeDevice("NVIDIA H100 80GB HBM3")])
    config.model.precision = "bf16-mixed"          # compute_dtype follows model.precision
    assert config.compute_dtype == "bf16-mixed"
    assert peak_flops_per_device(config) == 989.5e12
    config.model.precision = "float32"
    assert peak_flops_per_device(config) == 494.5e12
    config.peak_tflops_per_device = 100.0
    assert peak_flops_per_device(config) == 100e12


@pytest.fixture
def device_check(monkeypatch):
    monkeypatch.syspath_prepend(TOOLS)
    import device_check
    return device_check


def fake_train_step(device_check, fits_up_to: int, calls: list):
    """bench_train.bench_one that runs out of device memory above ``fits_up_to``."""
    def bench_one(args, config, overrides, measured):
        calls.append(config.global_batch_size)
        if config.global_batch_size > fits_up_to:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying "
                                             "to allocate 123 bytes")
        return {k: config.global_batch_size for k in device_check.TRAIN_FIELDS}
    return bench_one


def run_train_part(device_check, monkeypatch, bench_one, seconds_left=1000.0):
    monkeypatch.setattr(device_check.bench_train, "bench_one", bench_one)
    monkeypatch.setattr(device_check.bench_train, "random_tokenizer_dir", lambda size: "unused")
    plan = device_check.dataclasses.replace(device_check.TINY_PLAN, train_batches=(512, 64, 32, 8))
    report = device_check.Report(sys.stdout)
    device_check.train_part(plan, device_check.time.monotonic() + seconds_left, report)
    return report.fields


def test_train_part_reports_largest_batch_that_fits(device_check, monkeypatch):
    calls = []
    fields = run_train_part(device_check, monkeypatch, fake_train_step(device_check, 32, calls))
    assert calls == [512, 64, 32]
    assert fields["train"]["global_batch"] == 32
    assert fields["train"]["out_of_memory_batches"] == [512, 64]
    assert fields["notes"] == []


def test_train_part_notes_when_nothing_fits(device_check, monkeypatch):
    calls = []
    fields = run_train_part(device_check, monkeypatch, fake_train_step(device_check, 4, calls))
    assert calls == [512, 64, 32, 8]
    assert "global_batch" not in fields["train"]
    assert any("fits" in note for note in fields["notes"])


def test_train_part_raises_other_runtime_errors(device_check, monkeypatch):
    def broken(args, config, overrides, measured):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run_train_part(device_check, monkeypatch, broken)


def test_train_part_skips_attempts_when_budget_is_spent(device_check, monkeypatch):
    calls = []
    fields = run_train_part(device_check, monkeypatch, fake_train_step(device_check, 32, calls),
                            seconds_left=0.0)
    assert calls == []
    assert any("skipped" in note for note in fields["notes"])


def test_device_check_tiny_prints_one_json_line_on_cpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "device_check.py"), "--tiny"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=HARD_TIMEOUT)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout[-4000:]
    report = json.loads(lines[-1])
    assert report["device_kind"] == "cpu" and report["jax_version"] == jax.__version__
    assert report["plan"] == "tiny" and report["notes"] == [] and report["wall_s"] > 0
    sample = report["sample"]
    assert sample["dtype"] == "bfloat16" and len(sample["results"]) == 1
    for result in sample["results"]:
        assert result["compile_s"] > 0 and result["steady_s"] > 0 and result["images_per_s"] > 0
        assert result["flops"] > 0
        assert result["mfu"] is None and result["peak_flops_per_device"] is None
    train = report["train"]
    assert train["global_batch"] == 8 and train["out_of_memory_batches"] == []
    assert train["compute_dtype"] == "bf16-mixed"
    assert train["compile_s"] > 0 and train["step_s_median"] > 0 and train["images_per_s"] > 0
    assert train["mfu"] is None and train["peak_flops_per_device"] is None
