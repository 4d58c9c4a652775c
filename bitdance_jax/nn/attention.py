"""The one softmax-attention function every model calls (c2i backbone, diffusion head, Qwen3).

``attention(q, k, v, mask, implementation=...)`` with ``q [B, T, N, H]``, ``k``/``v``
``[B, S, K, H]`` (grouped queries: query head i reads kv head i // (N / K)) and a boolean
``mask`` (True = may attend) broadcastable to ``[B, N, T, S]``. Logits and softmax are always
float32 (with bf16 inputs the logits come out of a float32-accumulating matmul); the
probabilities are cast to the value dtype for the second matmul. A fully masked row gives
the mean of the values (finite), never NaN.

Implementations:

* ``xla``: ``jax.nn.dot_product_attention(implementation='xla')``;
* ``cudnn``: ``jax.nn.dot_product_attention(implementation='cudnn')`` (flash attention;
  GPU only, bf16/fp16 inputs, head dim a multiple of 8 up to 128). The mask becomes an
  additive bias; odd sequence lengths are padded by one masked slot (its training kernel
  with a bias needs even lengths);
* ``einsum``: the same math written out (the plain path the others are tested against);
* ``auto`` (default): ``cudnn`` on GPU where the inputs allow it, ``xla`` elsewhere.

No Pallas splash-attention option: its masks must be static, and the masks that would
need it (packed T2I rows: per-row segment and block ids) are data.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bitdance_jax.nn.precision import PrecisionLike, lax_precision, matmul_precision_context

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def _large_negative() -> float:
    return float(-0.7 * np.finfo(np.float32).max)


def _mask_4d(mask):
    """Boolean mask -> rank 4 ([T, S] -> [1, 1, T, S], [B, T, S] -> [B, 1, T, S])."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"attention masks are boolean (True = attend), got {mask.dtype}")
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    if mask.ndim == 4:
        return mask
    raise ValueError(f"mask must have rank 2, 3 or 4, got shape {mask.shape}")


def cudnn_supported(q, k, v, backend: str | None = None) -> bool:
    """Whether the cuDNN flash kernel takes these inputs on this backend."""
    backend = backend or jax.default_backend()
    head_dim = q.shape[-1]
    return (backend in ("gpu", "cuda") and q.dtype in CUDNN_DTYPES
            and q.dtype == k.dtype == v.dtype and k.shape[-1] == v.shape[-1] == head_dim
            and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)


def resolve_implementation(implementation: str, q, k, v) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}: choose one "
                         f"of {IMPLEMENTATIONS}")
    if implementation == "auto":
        return "cudnn" if cudnn_supported(q, k, v) else "xla"
    return implementation


def _einsum_attention(q, k, v, mask, scale, precision):
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    p = lax_precision(precision)
    qg = q.reshape(b, t, kv, n // kv, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, precision=p,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    if mask is not None:
        m = jnp.broadcast_to(mask, (mask.shape[0], n, t, s))
        m = m.reshape(m.shape[0], kv, n // kv, t, s)
        logits = jnp.where(m, logits, jnp.float32(_large_negative()))
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, precision=p)
    return out.reshape(b, t, n, v.shape[-1])


def _cudnn_attention(q, k, v, mask, scale):
    t, s = q.shape[1], k.shape[1]
    pad_t, pad_s = t % 2, s % 2
    if mask is not None and (pad_t or pad_s):
        pad = lambda a, n: jnp.pad(a, ((0, 0), (0, n), (0, 0), (0, 0)))
        q, k, v = pad(q, pad_t), pad(k, pad_s), pad(v, pad_s)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_t), (0, pad_s)))  # padded slots: hidden
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    return out[:, :t]


def attention(q, k, v, mask=None, *, implementation: str = "auto",
              precision: PrecisionLike = None, scale: float | None = None) -> jax.Array:
    """Softmax attention ``[B, T, N, H]`` (see the module docstring); ``scale`` defaults to
    1/sqrt(H); ``precision`` is the matmul precision of float32 inputs."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q must be [B, T, N, H] and k, v [B, S, K, H]; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads do not group over {k.shape[2]} kv heads")
    scale = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    mask = _mask_4d(mask)
    impl = resolve_implementation(implementation, q, k, v)
    if impl == "einsum":
        return _einsum_attention(q, k, v, mask, scale, precision)
    if impl == "cudnn":
        if not cudnn_supported(q, k, v):
            raise ValueError(f"cuDNN attention needs a GPU, bf16/fp16 inputs and a head dim "
                             f"that is a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}; got "
                             f"{jax.default_backend()}, {q.dtype}, head dim {q.shape[-1]}")
        return _cudnn_attention(q, k, v, mask, scale)
    with matmul_precision_context(precision):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation="xla")
