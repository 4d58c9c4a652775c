"""Numerics policies: which dtype the matmuls take, how precise float32 matmuls are, and the
per-backend sampling default.

Two policies (config ``model.precision``, or ``compute_dtype`` for the tokenizer and T2I
tasks):

* ``float32``: everything float32.
* ``bf16-mixed`` (the reference's autocast training): params, optimizer state, the residual
  stream, norms, softmax and losses stay float32; Dense/Conv/attention inputs are cast to
  bfloat16 (float32 accumulation), attention logits are float32. ``bfloat16`` is accepted as
  an older name of the same policy.

The modules take the policy as ``dtype`` (the matmul input dtype; see ``nn.layers`` for where
float32 is kept) and ``precision`` (``matmul_precision``: ``default`` lets JAX choose, e.g.
one bf16 pass for float32 matmuls on TPU and TF32 on recent GPUs; ``highest`` forces full
float32, what the golden tests compare with; ``high`` is 3-pass bf16 on TPU).
"""
from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp

# Policy names (and older dtype names) -> the matmul input dtype.
PRECISIONS = {"float32": jnp.float32, "bf16-mixed": jnp.bfloat16}
DTYPES = {**PRECISIONS, "bfloat16": jnp.bfloat16}
MATMUL_PRECISIONS = {"default": None, "high": jax.lax.Precision.HIGH,
                     "highest": jax.lax.Precision.HIGHEST}
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")

PrecisionLike = Union[str, jax.lax.Precision, None]


def compute_dtype(name: str) -> Any:
    """The matmul input dtype of a policy name (``float32``, ``bf16-mixed``, ``bfloat16``)."""
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def policy_name(dtype) -> str:
    """``float32`` or ``bf16-mixed`` for a compute dtype."""
    return "bf16-mixed" if jnp.dtype(dtype) == jnp.bfloat16 else "float32"


def lax_precision(precision: PrecisionLike):
    """``default``/None -> None (JAX's default), ``high``/``highest`` -> ``lax.Precision``."""
    if precision is None or isinstance(precision, jax.lax.Precision):
        return precision
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"unknown matmul_precision {precision!r}: choose one of "
                         f"{sorted(MATMUL_PRECISIONS)}")
    return MATMUL_PRECISIONS[precision]


def is_accelerator(backend: str | None = None) -> bool:
    return (backend or jax.default_backend()) in ACCELERATOR_BACKENDS


def default_sampling_dtype(backend: str | None = None):
    """Sampling compute dtype when none is given: bf16-mixed on GPU/TPU (the reference samples
    in bf16), float32 on CPU (bf16 matmuls are emulated there, and slower)."""
    return jnp.bfloat16 if is_accelerator(backend) else jnp.float32


def resolve_dtype(dtype, backend: str | None = None):
    """``dtype`` as given (a dtype or a policy name), or the backend's sampling default for
    None / ``auto``."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return default_sampling_dtype(backend)
    if isinstance(dtype, str):
        return compute_dtype(dtype)
    return dtype
