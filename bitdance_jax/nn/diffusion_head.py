"""BitDance binary diffusion heads: the x-predicting networks behind the flow-matching loss.

Three reference variants share one module (``DiffusionNet``):

* ``variant='imagenet'``, ``parallel_num > 1``: TransEncoder of diff_head_parallel.py (full
  attention over the P tokens predicted together, n_head = C // 64, SwiGLU MLP);
* ``variant='imagenet'``, ``parallel_num == 1``: MlpEncoder of diff_head.py (per-token adaLN
  ResBlocks, no attention; inputs carry no token axis);
* ``variant='t2i'``: TransEncoder of flow_head_parallel_x.py (n_head = C // 128, SwiGLU or
  Linear-SiLU-Linear MLP, output squashed to (-1, 1) by 2*sigmoid - 1).

Submodule names follow the torch keys under ``net.*`` (mapped by ``bitdance_jax.porting.head``).

Initialisation (the reference re-initialises its head after the model-wide N(0, 0.02)):
every Linear Xavier-uniform with zero bias, except the timestep MLP (N(0, 0.02), zero
bias) and every adaLN modulation and the final linear (all zero), so a fresh head predicts
x = 0 and each block starts as the identity.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from bitdance_jax.nn.attention import attention
from bitdance_jax.nn.layers import dense, layer_norm, linear_init, swiglu, xavier_init, zero_init
from bitdance_jax.nn.params import abstract_params
from bitdance_jax.nn.precision import PrecisionLike

Dtype = Any

VARIANTS = ("imagenet", "t2i")
FREQ_EMBED_DIM = 256
# Kernel init of each kind of head Linear (biases are always zero).
HEAD_INITS = {"xavier": xavier_init, "normal": linear_init, "zero": zero_init}


def head_dense(features: int, axes: tuple[str, str], *, name: str, init: str = "xavier", **kw):
    """A head Linear: Xavier-uniform (default), N(0, 0.02) (``normal``: timestep MLP) or
    zero (``zero``: adaLN modulations and the final layer); zero bias."""
    return dense(features, axes, name=name, kernel_init=HEAD_INITS[init](), **kw)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """DiffHead kwargs of the reference (plus which reference file the head comes from)."""
    ch_target: int
    ch_cond: int
    ch_latent: int
    depth_latent: int
    depth_adanln: int
    parallel_num: int = 4
    variant: str = "imagenet"
    use_swiglu: bool = True
    time_shift: float = 1.0
    P_mean: float = 0.0
    P_std: float = 1.0
    diff_batch_mul: int = 1

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln",
                     "parallel_num", "diff_batch_mul"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.variant == "imagenet" and not self.use_swiglu:
            raise ValueError("the imagenet heads always use a SwiGLU MLP (use_swiglu=True)")
        if not self.uses_mlp_encoder and self.ch_latent % self.head_dim:
            raise ValueError(f"ch_latent {self.ch_latent} is not a multiple of the head dim "
                             f"{self.head_dim} ({self.variant} head)")
        if self.depth_latent % self.adaln_switch_every:
            raise ValueError(f"depth_latent {self.depth_latent} must be divisible by "
                             f"max(1, depth_latent // depth_adanln) = {self.adaln_switch_every}")
        if self.depth_latent // self.adaln_switch_every > self.depth_adanln:
            raise ValueError(f"depth_latent {self.depth_latent} needs more than "
                             f"depth_adanln {self.depth_adanln} adaLN blocks")

    @property
    def uses_mlp_encoder(self) -> bool:
        """The 1x ImageNet head (diff_head.py): per-token MLP blocks, no token axis."""
        return self.variant == "imagenet" and self.parallel_num == 1

    @property
    def head_dim(self) -> int:
        return 128 if self.variant == "t2i" else 64

    @property
    def num_heads(self) -> int:
        return self.ch_latent // self.head_dim

    @property
    def adaln_switch_every(self) -> int:
        """Consecutive blocks share one adaLN projection."""
        return max(1, self.depth_latent // self.depth_adanln)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HeadConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown HeadConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_reference_kwargs(cls, kwargs: Mapping[str, Any], variant: str) -> "HeadConfig":
        """Config from reference ``DiffHead(**kwargs)`` (e.g. vision_head_config.json).

        ``variant='imagenet'`` without ``parallel_num`` is diff_head.py (the 1x head, whose
        DiffHead has no such argument); with it, diff_head_parallel.py. ``variant='t2i'`` is
        flow_head_parallel_x.py (defaults parallel_num=4, use_swiglu=False as there).
        """
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        known = {"ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln",
                 "grad_checkpointing", "time_shift", "time_schedule", "P_mean", "P_std",
                 "parallel_num"}
        if variant == "t2i":
            known |= {"diff_batch_mul", "use_swiglu"}
        unknown = set(kwargs) - known
        if unknown:
            raise ValueError(f"unknown {variant} DiffHead kwargs: {sorted(unknown)}")
        schedule = kwargs.get("time_schedule", "logit_normal")
        if schedule != "logit_normal":
            raise ValueError(f"time_schedule {schedule!r} is not supported (only 'logit_normal')")
        missing = {"ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln"} - set(kwargs)
        if missing:
            raise ValueError(f"DiffHead kwargs lack {sorted(missing)}")
        if variant == "imagenet":
            parallel_num = int(kwargs.get("parallel_num", 1))
            use_swiglu = True
        else:
            parallel_num = int(kwargs.get("parallel_num", 4))
            use_swiglu = bool(kwargs.get("use_swiglu", False))
        return cls(ch_target=int(kwargs["ch_target"]), ch_cond=int(kwargs["ch_cond"]),
                   ch_latent=int(kwargs["ch_latent"]), depth_latent=int(kwargs["depth_latent"]),
                   depth_adanln=int(kwargs["depth_adanln"]), parallel_num=parallel_num,
                   variant=variant, use_swiglu=use_swiglu,
                   time_shift=float(kwargs.get("time_shift", 1.0)),
                   P_mean=float(kwargs.get("P_mean", 0.0)), P_std=float(kwargs.get("P_std", 1.0)),
                   diff_batch_mul=int(kwargs.get("diff_batch_mul", 1)))


def timestep_embedding(t: jax.Array, dim: int = FREQ_EMBED_DIM, max_period: float = 10000.0
                       ) -> jax.Array:
    """[cos(1000 t f), sin(1000 t f)] with f = max_period^(-k / (dim/2)), in float32."""
    half = dim // 2
    freqs = jnp.exp(jnp.float32(-math.log(max_period)) * jnp.arange(half, dtype=jnp.float32)
                    / jnp.float32(half))
    args = (jnp.float32(1000.0) * t.astype(jnp.float32))[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedder(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, t):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  init="normal")
        h = head_dense(self.features, ("latent", "embed"), name="mlp_0", **kw)(timestep_embedding(t))
        return head_dense(self.features, ("mlp", "embed"), name="mlp_2", **kw)(nn.silu(h))


def modulate(x, scale, shift):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Bidirectional softmax attention over the tokens of each row (no mask, no RoPE)."""
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        n, length, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = head_dense(3 * dim, ("embed", "heads"), name="wqkv", **kw)(x)
        q, k, v = (a.reshape(n, length, self.num_heads, head_dim) for a in jnp.split(qkv, 3, -1))
        out = attention(q, k, v, implementation=self.attention_impl, precision=self.precision)
        return head_dense(dim, ("heads", "embed"), name="wo", **kw)(out.reshape(n, length, dim))


def feed_forward(h, use_swiglu: bool, kw):
    """Block MLP, its Dense layers registered in the calling block (torch ``<block>.w1`` /
    ``<block>.mlp.0``): SwiGLU (w1: C -> 3C, first half gated; w2: 1.5C -> C) or
    Linear(C, 1.5C)-SiLU-Linear(1.5C, C)."""
    dim = h.shape[-1]
    hidden = int(dim * 1.5)
    if use_swiglu:
        h = swiglu(head_dense(2 * hidden, ("embed", "mlp"), name="w1", **kw)(h))
        return head_dense(dim, ("mlp", "embed"), name="w2", **kw)(h)
    h = nn.silu(head_dense(hidden, ("embed", "mlp"), name="mlp_0", **kw)(h))
    return head_dense(dim, ("mlp", "embed"), name="mlp_2", **kw)(h)


class ResBlock(nn.Module):
    """MlpEncoder block (1x head): x + swiglu(LN(x)(1 + scale) + shift) * gate."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x, scale, shift, gate):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = modulate(layer_norm(name="norm", param_dtype=self.param_dtype)(x), scale, shift)
        return x + feed_forward(h, True, kw) * gate


class TransBlock(nn.Module):
    """adaLN transformer block over the P tokens of a row."""
    num_heads: int
    use_swiglu: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, scale1, shift1, gate1, scale2, shift2, gate2):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        h = modulate(layer_norm(name="norm1", param_dtype=self.param_dtype)(x), scale1, shift1)
        x = x + Attention(self.num_heads, name="attn", attention_impl=self.attention_impl,
                          **kw)(h) * gate1
        h = modulate(layer_norm(name="norm2", param_dtype=self.param_dtype)(x), scale2, shift2)
        return x + feed_forward(h, self.use_swiglu, kw) * gate2


class FinalLayer(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x, y):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  init="zero")
        dim = x.shape[-1]
        mod = head_dense(2 * dim, ("embed", "mlp"), name="ada_ln_modulation", **kw)(y)
        scale, shift = jnp.split(mod, 2, axis=-1)
        h = modulate(layer_norm(use_affine=False, name="norm_final",
                                param_dtype=self.param_dtype)(x), scale, shift)
        return head_dense(self.out_channels, ("embed", "latent"), name="linear", **kw)(h)


class DiffusionNet(nn.Module):
    """x-prediction network of a BitDance diffusion head (torch ``DiffHead.net``).

    ``__call__(x, t, c)``: TransEncoder heads take x [N, P, ch_target], t [N],
    c [N, P, ch_cond]; the 1x MlpEncoder head takes x [N, ch_target], t [N], c [N, ch_cond].
    Returns the predicted clean x, same shape as ``x`` (float32).
    """
    config: HeadConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    attention_impl: str = "auto"

    def _check_inputs(self, x, t, c):
        cfg = self.config
        rank = 2 if cfg.uses_mlp_encoder else 3
        what = "[N, C]" if rank == 2 else "[N, P, C]"
        if x.ndim != rank or c.ndim != rank or t.ndim != 1:
            raise ValueError(f"{cfg.variant} head (parallel_num={cfg.parallel_num}) expects x "
                             f"{what}, t [N], c like x; got x {x.shape}, t {t.shape}, c {c.shape}")
        if x.shape[-1] != cfg.ch_target or c.shape[-1] != cfg.ch_cond:
            raise ValueError(f"x needs {cfg.ch_target} channels and c {cfg.ch_cond}; got x "
                             f"{x.shape}, c {c.shape}")
        if x.shape[:-1] != c.shape[:-1] or t.shape[0] != x.shape[0]:
            raise ValueError(f"batch/token dims disagree: x {x.shape}, t {t.shape}, c {c.shape}")

    @nn.compact
    def __call__(self, x, t, c):
        self._check_inputs(x, t, c)
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        dim = cfg.ch_latent
        # The token stream h is float32 (Dense outputs are added to it or promoted).
        h = head_dense(dim, ("latent", "embed"), name="input_proj", **kw)(x).astype(jnp.float32)
        temb = TimestepEmbedder(dim, name="time_embed", **kw)(t)
        if not cfg.uses_mlp_encoder:
            temb = temb[:, None]
        y = nn.silu(temb + head_dense(dim, ("latent", "embed"), name="cond_embed", **kw)(c))

        chunks = 3 if cfg.uses_mlp_encoder else 6
        ada_ln = [head_dense(chunks * dim, ("embed", "mlp"), name=f"ada_ln_blocks_{k}",
                             init="zero", **kw)
                  for k in range(cfg.depth_adanln)]
        if self.is_initializing():
            for block in ada_ln[cfg.depth_latent // cfg.adaln_switch_every:]:
                block(y)  # unused by the forward, but part of the checkpoint
        for i in range(cfg.depth_latent):
            if i % cfg.adaln_switch_every == 0:
                mods = jnp.split(ada_ln[i // cfg.adaln_switch_every](y), chunks, axis=-1)
            if cfg.uses_mlp_encoder:
                h = ResBlock(name=f"res_blocks_{i}", **kw)(h, *mods)
            else:
                h = TransBlock(cfg.num_heads, cfg.use_swiglu, name=f"res_blocks_{i}",
                               attention_impl=self.attention_impl, **kw)(h, *mods)
        out = FinalLayer(cfg.ch_target, name="final_layer", **kw)(h, y).astype(jnp.float32)
        if cfg.variant == "t2i":
            out = 2 * jax.nn.sigmoid(out) - 1
        return out


def example_inputs(config: HeadConfig, batch: int = 1):
    """Zero inputs of the right shapes (for init / eval_shape)."""
    tokens = () if config.uses_mlp_encoder else (config.parallel_num,)
    return (jnp.zeros((batch, *tokens, config.ch_target), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, *tokens, config.ch_cond), jnp.float32))


def abstract_head_params(config: HeadConfig, dtype: Dtype = jnp.float32,
                         param_dtype: Dtype = jnp.float32):
    """Boxed abstract params of ``DiffusionNet(config)`` (no allocation)."""
    return abstract_params(DiffusionNet(config, dtype=dtype, param_dtype=param_dtype),
                           *example_inputs(config))

