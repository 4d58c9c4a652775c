"""Small building blocks shared by every model: annotated Dense/Conv/Embed and norms.

Every kernel carries logical axis names (see ``sharding.LOGICAL_AXIS_RULES``); compute
dtype and param dtype are explicit. Param names follow the porting convention of
``bitdance_jax.porting`` (kernel/bias/scale/embedding).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# Names accepted for compute/param dtypes in configs and command lines.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def torch_linear_init():
    """PyTorch's default Linear/Conv init (kaiming-uniform a=sqrt(5) -> U(+-1/sqrt(fan_in)))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(features: int, axes: tuple[str, str], *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: str | None = None,
          kernel_init=None, bias_init=nn.initializers.zeros) -> nn.Dense:
    kernel_init = kernel_init or torch_linear_init()
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
        precision=jax.lax.Precision.HIGHEST,
        name=name,
    )


def conv(features: int, kernel_size: int, *, stride: int = 1, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Conv:
    """A square NHWC conv with PyTorch's symmetric padding of ``kernel_size // 2``."""
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
        precision=jax.lax.Precision.HIGHEST,
        name=name,
    )


def embed(num: int, features: int, *, axes: tuple[str, str] = ("vocab", "embed"),
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          name: str | None = None, stddev: float = 0.02) -> nn.Embed:
    return nn.Embed(num, features, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=nn.with_logical_partitioning(
                        nn.initializers.normal(stddev), axes), name=name)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the reference), weight param named ``scale``."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * scale.astype(self.dtype))


def layer_norm(*, use_affine: bool = True, eps: float = 1e-6, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_bias=use_affine, use_scale=use_affine, dtype=dtype,
                        param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        name=name)


def group_norm(*, num_groups: int = 32, use_affine: bool = True, eps: float = 1e-6,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_bias=use_affine,
                        use_scale=use_affine, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        name=name)


def swiglu(a_and_b: jax.Array) -> jax.Array:
    """silu(a) * b where (a, b) are the two halves of the last dim (first half gated)."""
    a, b = jnp.split(a_and_b, 2, axis=-1)
    return nn.silu(a) * b

