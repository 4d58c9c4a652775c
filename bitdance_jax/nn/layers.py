"""Small building blocks shared by every model: annotated Dense/Conv/Embed, norms, and the
initialisers the models declare their params with.

Every kernel carries logical axis names (see ``sharding.LOGICAL_AXIS_RULES``); param dtype,
compute dtype and matmul precision are explicit (``bitdance_jax.nn.precision``). Param names
follow the porting convention of ``bitdance_jax.porting`` (kernel/bias/scale/embedding).

Numerics (the ``bf16-mixed`` policy when ``dtype`` is bfloat16): a Dense/Conv casts its input
and kernel to ``dtype`` and returns ``dtype``; norms compute and return float32, and
embeddings return float32, so the residual stream of every model (norm/embedding output plus
bf16 branch outputs) stays float32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from bitdance_jax.nn.precision import DTYPES, PrecisionLike, lax_precision

Dtype = Any
__all__ = ["DTYPES", "dense", "conv", "embed", "RMSNorm", "layer_norm", "group_norm", "swiglu",
           "LINEAR_STD", "linear_init", "xavier_init", "zero_init", "torch_linear_init",
           "torch_bias_init"]

# ----------------------------------------------------------------------------- initialisers
# The reference initialises every nn.Linear and nn.Embedding of its AR models N(0, 0.02)
# with zero biases (the diffusion head then re-initialises its own layers, see
# ``diffusion_head``); Hugging Face's Qwen3 does the same (initializer_range 0.02).
LINEAR_STD = 0.02


def linear_init():
    """N(0, 0.02): the default kernel init of ``dense`` and of ``embed``."""
    return nn.initializers.normal(LINEAR_STD)


def xavier_init():
    """Xavier/Glorot uniform, U(+-sqrt(6 / (fan_in + fan_out)))."""
    return nn.initializers.xavier_uniform()


def zero_init():
    return nn.initializers.zeros


def torch_linear_init():
    """PyTorch's default Linear/Conv kernel init (kaiming-uniform a=sqrt(5) ->
    U(+-1/sqrt(fan_in))): the convs and the modules the reference never re-initialises."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default Linear/Conv bias init, U(+-1/sqrt(fan_in))."""
    bound = 1.0 / max(1, fan_in) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# ----------------------------------------------------------------------------- layers

def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
          name: str | None = None, kernel_init=None, bias_init=None) -> nn.Dense:
    """Linear layer; kernel N(0, 0.02) and zero bias unless given."""
    kernel_init = kernel_init or linear_init()
    bias_init = bias_init or zero_init()
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
        precision=lax_precision(precision),
        name=name,
    )


def conv(features: int, kernel_size: int, *, stride: int = 1, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         precision: PrecisionLike = None, name: str | None = None) -> nn.Conv:
    """A square NHWC conv with PyTorch's symmetric padding of ``kernel_size // 2`` (PyTorch's
    default kernel init, zero bias)."""
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            torch_linear_init(), ("conv_height", "conv_width", "conv_in", "conv_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        precision=lax_precision(precision),
        name=name,
    )


def embed(num: int, features: int, *, axes: tuple[str, str] = ("vocab", "embed"),
          param_dtype: Dtype = jnp.float32, name: str | None = None,
          stddev: float = LINEAR_STD) -> nn.Embed:
    """Embedding table N(0, stddev); lookups return float32 (the residual stream's dtype).
    ``attend`` (a tied LM head) is then a float32 matmul."""
    return nn.Embed(num, features, dtype=jnp.float32, param_dtype=param_dtype,
                    embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(stddev), axes), name=name)


class RMSNorm(nn.Module):
    """RMSNorm computed and returned in float32 (weight param named ``scale``)."""
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y * scale.astype(jnp.float32)


def layer_norm(*, use_affine: bool = True, eps: float = 1e-6, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed and returned in float32."""
    return nn.LayerNorm(epsilon=eps, use_bias=use_affine, use_scale=use_affine, dtype=jnp.float32,
                        param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        name=name)


def group_norm(*, num_groups: int = 32, use_affine: bool = True, eps: float = 1e-6,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm computed and returned in float32."""
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_bias=use_affine,
                        use_scale=use_affine, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        name=name)


def swiglu(a_and_b: jax.Array) -> jax.Array:
    """silu(a) * b where (a, b) are the two halves of the last dim (first half gated)."""
    a, b = jnp.split(a_and_b, 2, axis=-1)
    return nn.silu(a) * b
