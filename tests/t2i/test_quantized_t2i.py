"""Weight-only int8/fp8 text-to-image (``nn.quant``) on the golden tiny model against bf16:
quality figures (README "Quantized inference"), quantized ports, the mesh, host memory."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import linen as nn

import golden
from bitdance_jax.checkpointing import param_dir
from bitdance_jax.nn import quant
from bitdance_jax.parallel.sharding import make_mesh
from bitdance_jax.porting import cli as port_cli
from bitdance_jax.porting.t2i import read_released_config
from bitdance_jax.t2i import cli as t2i_cli
from bitdance_jax.t2i import io as t2i_io
from bitdance_jax.t2i import pipeline as t2i
from bitdance_jax.t2i.model import abstract_t2i_params

GEN = golden.case("t2i_gen")["config"]
GUIDED = max(GEN["runs"], key=lambda r: r["guidance_scale"])
PROMPT = "a red cube on a table"
IMAGES = 4
NUMERICS = dict(dtype="bfloat16")   # quantized and reference both compute in bf16-mixed
# Quality floors (README "Quantized inference" gives the measured figures and why these).
FLOORS = {"int8": dict(step0=0.95, mean=0.83, psnr=10.5, head_err=0.05),
          "fp8": dict(step0=0.83, mean=0.82, psnr=10.2, head_err=0.15)}


def _model_dir():
    return golden.path(GEN["model_dir"])


def _sample(pipe, seed=0):
    bits, trace = pipe.sample_latents(PROMPT, *GEN["image_size"],
                                      num_sampling_steps=GEN["num_sampling_steps"],
                                      guidance_scale=GUIDED["guidance_scale"], num_images=IMAGES,
                                      seed=seed, trace=True)
    return np.asarray(bits), trace, np.asarray(pipe.decode_latents(bits), np.float64)


@pytest.fixture(scope="module")
def runs():
    pipes = {q: t2i.load_t2i(_model_dir(), quantize=q, **NUMERICS) for q in (None, "int8", "fp8")}
    return {q: (p,) + _sample(p) for q, p in pipes.items()}


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_quant")
    qdir, fdir = str(root / "int8"), str(root / "float")
    assert port_cli.main([_model_dir(), qdir, "--quantize", "int8"]) == 0
    assert port_cli.main([_model_dir(), fdir]) == 0
    return qdir, fdir


def psnr(a, b):
    """Decoded images lie in about [-1, 1]: peak-to-peak 2."""
    return float(10 * np.log10(4.0 / np.mean((a - b) ** 2)))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quality_against_bf16(runs, mode):
    ref_pipe, ref_bits, ref_trace, ref_img = runs[None]
    pipe, bits, trace, img = runs[mode]
    assert pipe.quantize == mode and bits.shape == ref_bits.shape
    # identical sampled bits per AR step (the head's sample before the sign)
    steps = ref_trace.head_pred.shape[0]
    same = (np.sign(trace.head_pred) == np.sign(ref_trace.head_pred)).reshape(steps, -1).mean(1)
    # the head alone, on the reference's step-0 conditions: its relative prediction error
    cond = ref_trace.head_cond[0]
    x = np.random.default_rng(0).standard_normal(ref_trace.head_pred[0].shape).astype(np.float32)
    t = np.full((cond.shape[0],), 0.5, np.float32)
    ref_out = np.asarray(ref_pipe.head.apply({"params": ref_pipe.params["head"]}, x, t, cond), np.float64)
    out = np.asarray(pipe.head.apply({"params": pipe.params["head"]}, x, t, cond), np.float64)
    head_err = float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out))
    figures = dict(step0=float(same[0]), mean=float(same.mean()), psnr=psnr(img, ref_img),
                   head_err=head_err)
    print(f"[quant] t2i {mode}: {figures}")
    floor = FLOORS[mode]
    assert figures["step0"] >= floor["step0"] and figures["mean"] >= floor["mean"], figures
    assert figures["psnr"] >= floor["psnr"] and figures["head_err"] <= floor["head_err"], figures


def test_another_seed_is_farther_than_quantization(runs):
    """The floors separate quantization from resampling: bf16 with another seed shares far
    fewer first-step bits, and fewer bits and less PSNR than the floors ask overall."""
    ref_pipe, ref_bits, ref_trace, ref_img = runs[None]
    other_bits, other_trace, other_img = _sample(ref_pipe, seed=1)
    step0 = np.mean(np.sign(other_trace.head_pred[0]) == np.sign(ref_trace.head_pred[0]))
    assert step0 < min(f["step0"] for f in FLOORS.values()) - 0.05
    assert np.mean(other_bits == ref_bits) < min(f["mean"] for f in FLOORS.values())
    assert psnr(other_img, ref_img) < min(f["psnr"] for f in FLOORS.values())


def test_ported_quantized_and_float_dirs(runs, ported, tmp_path):
    """``--quantize int8`` writes int8 kernels + scales and says so; both it and a float port
    quantized at load time sample the very bits of the golden folder quantized on reading."""
    qdir, fdir = ported
    assert t2i_io.stored_quantization(qdir) == "int8" and t2i_io.stored_quantization(fdir) is None
    int8_bits = runs["int8"][1]
    stored = t2i.load_t2i(qdir, **NUMERICS)
    assert stored.quantize == "int8"
    q_proj = stored.params["llm"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q_proj.array.qvalue.dtype == np.int8 and q_proj.array.scale.shape[0] == 1
    np.testing.assert_array_equal(_sample(stored)[0], int8_bits)
    at_load = t2i.load_t2i(fdir, quantize="int8", **NUMERICS)
    np.testing.assert_array_equal(_sample(at_load)[0], int8_bits)
    with pytest.raises(param_dir.CheckpointError, match="holds int8 weights"):
        t2i_io.load(qdir, quantize="fp8")
    # the command line (same shapes and settings: the program compiled above serves it)
    out = tmp_path / "cube.png"
    h, w = GEN["image_size"]
    assert t2i_cli.main(["--ckpt", qdir, "--prompt", PROMPT, "--out", str(out), "--height", str(h),
                         "--width", str(w), "--steps", str(GEN["num_sampling_steps"]),
                         "--guidance-scale", str(GUIDED["guidance_scale"]),
                         "--num-images", str(IMAGES), "--dtype", "bfloat16",
                         "--param-dtype", "float32", "--quantize", "int8"]) == 0
    assert (tmp_path / "cube_0.png").is_file()


def test_quantized_tree_on_the_mesh(ported):
    """Quantized params take the logical-axis shardings on a (data, fsdp, tensor) mesh."""
    assert len(jax.devices()) >= 8, "conftest simulates 8 CPU devices; XLA_FLAGS overrode it"
    qdir, _ = ported
    mesh = make_mesh((2, 2, 2), devices=jax.devices()[:8])
    _, sharded = t2i_io.load(qdir, mesh=mesh)
    _, plain = t2i_io.load(qdir)
    kernel = sharded["llm"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"].array
    d_in, d_out = kernel.qvalue.shape   # ("embed", "mlp"): fsdp x tensor
    assert kernel.qvalue.sharding.shard_shape(kernel.qvalue.shape) == (d_in // 2, d_out // 2)
    assert kernel.scale.sharding.shard_shape(kernel.scale.shape) == (1, d_out // 2)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _scaled_config():
    """The golden config with a wide MLP and more layers, so that the params (tens of MB)
    dominate what a process allocates on its own while loading."""
    config = read_released_config(_model_dir())
    llm = config.llm
    return dataclasses.replace(config, llm=dataclasses.replace(
        llm, intermediate_size=llm.intermediate_size * 128, num_hidden_layers=4))


def _peaks(warm_float, warm_int8, *jobs):
    """Peak host memory (RSS above the level before the call) of each ``t2i_io.load(path,
    quantize=q)`` of ``jobs`` in one fresh process. tracemalloc cannot see it: Orbax,
    tensorstore and XLA allocate outside Python's allocator (under tracemalloc a whole float
    load peaks at a few percent of its size). glibc's mmap threshold is pinned so that freed
    tensors leave the RSS at once."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "peak_memory.py")
    args = [f"{path}:{q or '-'}" for path, q in jobs]
    out = subprocess.run([sys.executable, script, warm_float, warm_int8, *args], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_never_builds_the_float_tree(ported, tmp_path):
    qwarm, fwarm = ported   # the golden ports warm each path up (imports, first compiles)
    config = _scaled_config()
    abstract = nn.unbox(abstract_t2i_params(config))
    q_abstract = nn.unbox(abstract_t2i_params(config, quantize="int8"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)
    fdir, qdir = str(tmp_path / "float"), str(tmp_path / "int8")
    t2i_io.save_t2i(fdir, config, params, source="scaled golden", text_tokenizer_files={})
    t2i_io.save_t2i(qdir, config, quant.quantize_tree(params, q_abstract), source="scaled golden",
                    text_tokenizer_files={}, quantize="int8")
    del params
    float_bytes, q_bytes = quant.nbytes(abstract), quant.nbytes(q_abstract)
    layer_bytes = quant.nbytes(abstract["llm"]["model"]["layers_0"])
    assert q_bytes < float_bytes / 3
    q_peak, at_load_peak, float_peak = _peaks(fwarm, qwarm, (qdir, None), (fdir, "int8"),
                                              (fdir, None))
    print(f"[quant] load peaks (MB): float {float_peak / 1e6:.1f} int8 dir {q_peak / 1e6:.1f} "
          f"float -> int8 {at_load_peak / 1e6:.1f} (params: float {float_bytes / 1e6:.1f}, int8 "
          f"{q_bytes / 1e6:.1f}, one float layer {layer_bytes / 1e6:.1f})")
    assert float_peak >= 0.9 * float_bytes   # the measurement sees a whole tree
    assert q_peak <= q_bytes + layer_bytes < float_bytes
    assert at_load_peak <= q_bytes + 2 * layer_bytes < float_bytes
