"""Jitted next-patch sampler of the class-conditional models.

One compiled program per (model, batch, head steps, guided?) runs every AR step: step 0
feeds the class and query slots, then each later step feeds the P tokens of the previous
step into a preallocated KV cache; each step's conditioning goes through the head's
Euler-Maruyama sampler and the sign of its prediction gives the next P binary tokens.

Classifier-free guidance doubles the batch ([cond; null class]) with the reference's linear
schedule cfg_i = 1 + (cfg - 1) i / num_steps. As in the reference, step 0 has cfg_0 = 1 and is
sampled unguided on all 2B rows, so the null-class rows get tokens of their own.

The AR loop is the shared one of ``sampling.next_patch``. Random draws come from a
``noise_fn(step) -> [head_steps + 1, rows, P, C]``. The public path (``Sampler``) derives
each row's draws from its global sample index, so sample i is the same whatever the batch
size or device count; tests plug in the reference's recorded draws.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bitdance_jax.nn import flow
from bitdance_jax.nn import patching, quant
from bitdance_jax.nn.precision import PrecisionLike, resolve_dtype
from bitdance_jax.parallel import sharding
from bitdance_jax.sampling import next_patch
from bitdance_jax.c2i.config import BitDanceConfig, inference_config
from bitdance_jax.c2i.model import BitDanceBackbone, head_apply, init_cache, unstack_layer_params

Dtype = Any
NoiseFn = Callable[[jax.Array], jax.Array]
NULL_ROWS_STREAM = 1   # noise stream of the null-class rows (the conditional ones: 0)
BACKBONE_METHODS = ("__call__", "prefill", "step")   # what takes quantized kernels


def cfg_schedule(cfg_scale, step, num_steps):
    """Guidance of AR step ``step``: linear from 1 (step 0) towards ``cfg_scale``."""
    return 1 + (jnp.asarray(cfg_scale, jnp.float32) - 1) * step / num_steps


def generate(config: BitDanceConfig, params, class_ids, cfg_scale, noise_fn: NoiseFn, *,
             num_sampling_steps: int, guided: bool, dtype: Dtype = jnp.float32,
             precision: PrecisionLike = None, attention_impl: str = "auto",
             record: bool = False, quantize: str | None = None):
    """Sample binary tokens [B, h*w, C] (token order) for ``class_ids`` [B] (traceable), by
    the shared next-patch loop (``sampling.next_patch``).

    ``guided`` (static) doubles the batch with null-class rows; ``cfg_scale`` may be traced.
    ``noise_fn(step)`` returns the head's draws [num_sampling_steps + 1, rows, P, C] with rows
    = 2B when guided (from step 1 on only the first B are used) else B.
    With ``record`` also returns (head conditioning [steps, rows, P, dim], head prediction
    before the sign [steps, rows, P, C]).
    The KV cache runs unscanned blocks: ``params["model"]`` must have the ``layers_<i>``
    layout whatever ``config.scan_layers`` says (``Sampler`` unstacks scanned params).
    ``quantize`` (static): the mode of the kernels in ``params`` (``nn.quant``), or None.
    """
    cfg = inference_config(config)
    numerics = dict(precision=precision, attention_impl=attention_impl)
    backbone = quant.quantized(BitDanceBackbone(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                **numerics), quantize, BACKBONE_METHODS)
    net_fn = head_apply(cfg, params["head"], dtype, quantize=quantize, **numerics)
    model_vars = {"params": params["model"]}
    b = class_ids.shape[0]
    ids = class_ids.astype(jnp.int32)
    if guided:
        ids = jnp.concatenate([ids, jnp.full((b,), cfg.num_classes, jnp.int32)])
    rows, p = ids.shape[0], cfg.parallel_num

    def prefill():
        return backbone.apply(model_vars, ids, init_cache(cfg, rows, dtype), method="prefill")

    def feed(cache, bits, step):
        return backbone.apply(model_vars, bits.astype(dtype), step, cache, method="step")

    def draw(cond, step):
        noise = noise_fn(step)
        expected = (num_sampling_steps + 1, rows, p, cfg.latent_dim)
        if noise.shape != expected:
            raise ValueError(f"noise_fn must return {expected}, got {noise.shape}")
        # cfg_0 = 1, as in the reference: step 0 is unguided on all rows (the null-class
        # rows draw tokens of their own).
        step_guided = guided and not (isinstance(step, int) and step == 0)
        guidance = cfg_schedule(cfg_scale, step, cfg.num_steps) if step_guided else 1.0
        return flow.euler_maruyama(net_fn, cond, noise, num_steps=num_sampling_steps,
                                   guided=step_guided, cfg_scale=guidance,
                                   time_shift=cfg.time_shift)

    tokens, recorded = next_patch.sample_steps(cfg.num_steps, prefill, feed, draw, keep_rows=b,
                                               record=record)
    return (tokens, recorded) if record else tokens


def keyed_noise(seed, sample_indices, guided: bool, num_sampling_steps: int,
                config: BitDanceConfig) -> NoiseFn:
    """Per-sample draws (``next_patch.KeyedNoise``): the conditional row of global sample g
    uses stream 0, its null-class twin stream 1."""
    keys = next_patch.KeyedNoise(jnp.asarray(seed, jnp.int32), jnp.asarray(sample_indices, jnp.int32))
    p, c = config.parallel_num, config.latent_dim

    def noise_fn(step):
        draws = next_patch.head_draws(keys, step, num_sampling_steps, p, c)
        if guided:
            null = next_patch.head_draws(keys, step, num_sampling_steps, p, c, NULL_ROWS_STREAM)
            draws = jnp.concatenate([draws, null], axis=1)
        return draws
    return noise_fn


@functools.lru_cache(maxsize=64)
def _sharded_program(config: BitDanceConfig, dtype, precision, attention_impl: str, mesh,
                     batch: int, num_sampling_steps: int, guided: bool, quantize: str | None):
    """The jitted sampler of one shape, shared by every ``Sampler`` of the same model/mesh:
    each device runs its slice of the batch (its own cond/null doubling) independently."""
    def local(params, class_ids, sample_indices, seed, cfg_scale):
        noise_fn = keyed_noise(seed, sample_indices, guided, num_sampling_steps, config)
        tokens = generate(config, params, class_ids, cfg_scale, noise_fn,
                          num_sampling_steps=num_sampling_steps, guided=guided, dtype=dtype,
                          precision=precision, attention_impl=attention_impl, quantize=quantize)
        return patching.unpatchify(tokens, config.token_patch, config.grid_size, config.grid_size)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data"), P(), P()),
                            out_specs=P("data"), check_vma=False)
    return jax.jit(sharded)


class Sampler:
    """Public sampler: validates input, shards the batch over the mesh's ``data`` axis and
    reuses one compiled program per (model, mesh, batch, head steps, guided). Takes params
    in either layer layout (scanned ones are unstacked once, when placed).

    ``dtype`` None (or ``"auto"``) picks the backend's default: bf16-mixed on GPU/TPU,
    float32 on CPU (``nn.precision.default_sampling_dtype``); params stay float32.
    ``quantize``: the mode of the params' kernels (``nn.quant``), None for float params.
    """

    def __init__(self, config: BitDanceConfig, dtype: Dtype | str | None = None, mesh=None,
                 precision: PrecisionLike = None, attention_impl: str = "auto",
                 quantize: str | None = None):
        self.config = config
        self.quantize = quant.check_mode(quantize)
        self.dtype = resolve_dtype(dtype)
        self.precision = precision
        self.attention_impl = attention_impl
        # default: this process's devices (several processes each sample their own batch)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.local_devices())
        self._placed = (None, None)

    @property
    def num_shards(self) -> int:
        return self.mesh.shape["data"]

    def check_inputs(self, class_ids, cfg_scale: float, num_sampling_steps: int) -> np.ndarray:
        ids = np.asarray(class_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"class_ids must be a non-empty list of integers, got {class_ids!r}")
        bad = ids[(ids < 0) | (ids >= self.config.num_classes)]
        if bad.size:
            raise ValueError(f"unknown class id(s) {sorted(set(bad.tolist()))}: the model has "
                             f"classes 0..{self.config.num_classes - 1}")
        if not 1.0 <= cfg_scale < float("inf"):   # inf made NaN images, NaN passed too
            raise ValueError(f"cfg_scale must be a finite number >= 1 (1 = no guidance), got "
                             f"{cfg_scale}")
        if int(num_sampling_steps) < 1:
            raise ValueError(f"num_sampling_steps must be >= 1, got {num_sampling_steps}")
        return ids.astype(np.int32)

    def _program(self, batch: int, num_sampling_steps: int, guided: bool):
        return _sharded_program(inference_config(self.config), self.dtype, self.precision,
                                self.attention_impl, self.mesh, batch, num_sampling_steps, guided,
                                self.quantize)

    def _replicated(self, params):
        if self._placed[0] is not params:
            placed = {"model": params["model"], "head": params["head"]}
            if "layers" in placed["model"]:
                placed["model"] = unstack_layer_params(placed["model"])
            if self.quantize:
                placed = quant.cast_scales(placed, self.dtype)
            self._placed = (params, jax.device_put(placed, NamedSharding(self.mesh, P())))
        return self._placed[1]

    def prepare(self, params, class_ids: Sequence[int], *, seed: int = 0, cfg_scale: float = 1.0,
                num_sampling_steps: int = 100, sample_indices: Sequence[int] | None = None):
        """Validated (jitted program, its arguments): ``program(*args)`` gives the latents of
        the batch padded to a multiple of the data shards."""
        ids = self.check_inputs(class_ids, cfg_scale, num_sampling_steps)
        b = len(ids)
        idx = np.arange(b) if sample_indices is None else np.asarray(sample_indices)
        if idx.shape != (b,):
            raise ValueError(f"sample_indices must have one entry per class id ({b}), got {idx.shape}")
        padded = -(-b // self.num_shards) * self.num_shards
        ids = np.pad(ids, (0, padded - b))
        idx = np.pad(idx.astype(np.int32), (0, padded - b))
        program = self._program(padded, int(num_sampling_steps), cfg_scale > 1.0)
        return program, (self._replicated(params), ids, idx, np.int32(seed), np.float32(cfg_scale))

    def sample(self, params, class_ids: Sequence[int], *, seed: int = 0, cfg_scale: float = 1.0,
               num_sampling_steps: int = 100, sample_indices: Sequence[int] | None = None
               ) -> np.ndarray:
        """Binary latents [B, h, w, C] (NHWC, in {-1, +1})."""
        program, args = self.prepare(params, class_ids, seed=seed, cfg_scale=cfg_scale,
                                     num_sampling_steps=num_sampling_steps,
                                     sample_indices=sample_indices)
        return np.asarray(program(*args))[:len(class_ids)]
