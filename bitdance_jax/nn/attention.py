"""The one softmax-attention function every model calls (c2i backbone, diffusion head, Qwen3).

``attention(q, k, v, mask, implementation=...)`` with ``q [B, T, N, H]``, ``k``/``v``
``[B, S, K, H]`` (grouped queries: query head i reads kv head i // (N / K)) and a boolean
``mask`` (True = may attend) broadcastable to ``[B, N, T, S]``. Logits and softmax are always
float32 (with bf16 inputs the logits come out of a float32-accumulating matmul); the
probabilities (``xla``: the unnormalised weights, the output is divided by the row sum in
float32) are cast to the value dtype for the second matmul. A fully masked row gives the mean
of the values (finite, with finite gradients), never NaN.

Implementations:

* ``xla``: a ``custom_vjp`` written with einsums, flash-attention style: the forward keeps only
  the output and the per-row log-sum-exp (tagged ``RESIDUAL_NAMES`` for the remat policies),
  the backward recomputes the probabilities. It works unit by unit (batch row, kv head); on
  CPU a loop over cache-sized chunks of units, so no [B, N, T, S] array reaches main memory
  (about 2x faster than ``jax.nn.dot_product_attention`` there, fwd+bwd), elsewhere one
  vectorised call;
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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bitdance_jax.nn.precision import PrecisionLike, lax_precision

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


# checkpoint_name tags of what the XLA path's forward keeps for its backward (saved by the
# remat policies, see c2i.config.REMAT_POLICIES)
RESIDUAL_NAMES = ("attention_out", "attention_lse")
# CPU: float32 logits per step of the loop over (batch, kv head): an L2 cache's worth, so the
# [T, S] temporaries never travel through main memory
CPU_CHUNK_BYTES = 1 << 21


def _to_units(x, kv_heads):
    """[B, T, N, H] -> [B * K, G, T, H]: one unit per (batch row, kv head)."""
    b, t, n, h = x.shape
    x = x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
    return x.reshape(b * kv_heads, n // kv_heads, t, h)


def _from_units(x, batch):
    """Inverse of ``_to_units``."""
    units, g, t, h = x.shape
    return x.reshape(batch, units // batch, g, t, h).transpose(0, 3, 1, 2, 4).reshape(
        batch, t, units // batch * g, h)


def _unit_masks(mask, batch, kv_heads):
    """Rank-4 mask [Bm, Nm, T, S] -> (shared [1, T, S], None) when it is the same for every
    unit, else (None, [B * K, G or 1, T, S]) to loop over with the units."""
    bm, nm, t, s = mask.shape
    if bm == 1 and nm == 1:
        return mask[0], None
    grouped = mask.reshape(bm, kv_heads, nm // kv_heads, t, s) if nm > 1 else mask[:, :, None]
    grouped = jnp.broadcast_to(grouped, (batch, kv_heads) + grouped.shape[2:])
    return None, grouped.reshape((batch * kv_heads,) + grouped.shape[2:])


def _masked_logits(q, k, mask, scale, precision):
    """float32 logits [G, T, S] of one unit, hidden keys at a large negative value; rows with
    no visible key are all zero instead (uniform weights, and an exact log-sum-exp)."""
    logits = jnp.einsum("gth,sh->gts", q, k, precision=precision,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    if mask is None:
        return logits
    fill = jnp.where(mask.any(-1, keepdims=True), jnp.float32(_large_negative()), jnp.float32(0))
    return jnp.where(mask, logits, fill)


def _unit_forward(q, k, v, mask, scale, precision):
    """Output [G, T, H] and log-sum-exp [G, T] of one unit."""
    logits = _masked_logits(q, k, mask, scale, precision)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - row_max)
    row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
    # normalise the [G, T, H] output rather than the [G, T, S] weights: one pass less
    out = jnp.einsum("gts,sh->gth", unnormalized.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32) / row_sum
    return out.astype(v.dtype), (row_max + jnp.log(row_sum))[..., 0]


def _unit_backward(q, k, v, mask, out, lse, d_out, scale, precision):
    """dq [G, T, H], dk, dv [S, H] of one unit, the probabilities recomputed from the lse."""
    probs = jnp.exp(_masked_logits(q, k, mask, scale, precision) - lse[..., None])
    d_v = jnp.einsum("gts,gth->sh", probs.astype(v.dtype), d_out, precision=precision,
                     preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("gth,sh->gts", d_out, v, precision=precision,
                         preferred_element_type=jnp.float32)
    # rowsum(P * dP) = rowsum(dO * O): a [G, T] reduction instead of a [G, T, S] one
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    d_logits = probs * (d_probs - delta) * jnp.float32(scale)
    if mask is not None:
        d_logits = jnp.where(mask, d_logits, jnp.float32(0))     # hidden keys get no gradient
    d_logits = d_logits.astype(q.dtype)
    d_q = jnp.einsum("gts,sh->gth", d_logits, k, precision=precision,
                     preferred_element_type=jnp.float32)
    d_k = jnp.einsum("gts,gth->sh", d_logits, q, precision=precision,
                     preferred_element_type=jnp.float32)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _map_units(fn, xs, shared_mask, unit_mask, unit_bytes):
    """``fn(*x, mask)`` over the leading (unit) axis of ``xs``: a loop over cache-sized chunks
    on CPU, one vectorised call elsewhere (a TPU/GPU wants the big batched matmuls)."""
    if unit_mask is not None:
        xs = xs + (unit_mask,)
        body = lambda x: fn(*x)
    else:
        body = lambda x: fn(*x, shared_mask)
    if jax.default_backend() != "cpu":
        return jax.vmap(body)(xs)
    units = xs[0].shape[0]
    return jax.lax.map(body, xs, batch_size=min(units, max(1, CPU_CHUNK_BYTES // unit_bytes)))


def _unit_args(q, k, v, mask):
    kv = k.shape[2]
    shared_mask, unit_mask = (None, None) if mask is None else _unit_masks(mask, q.shape[0], kv)
    units = tuple(_to_units(x, kv) for x in (q, k, v))
    unit_bytes = 4 * q.shape[2] // kv * q.shape[1] * k.shape[1]
    return units[0], units[1][:, 0], units[2][:, 0], shared_mask, unit_mask, unit_bytes


def _lse_forward(q, k, v, mask, scale, precision):
    qu, ku, vu, shared_mask, unit_mask, unit_bytes = _unit_args(q, k, v, mask)
    fwd = lambda q, k, v, m: _unit_forward(q, k, v, m, scale, precision)
    out, lse = _map_units(fwd, (qu, ku, vu), shared_mask, unit_mask, unit_bytes)
    return _from_units(out, q.shape[0]), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lse_attention(q, k, v, mask, scale, precision):
    """Softmax attention whose forward keeps only the output and the per-row log-sum-exp; the
    backward recomputes the probabilities (flash-attention style), unit by unit."""
    return _lse_forward(q, k, v, mask, scale, precision)[0]


def _lse_attention_fwd(q, k, v, mask, scale, precision):
    out, lse = _lse_forward(q, k, v, mask, scale, precision)
    out, lse = (checkpoint_name(a, name) for a, name in zip((out, lse), RESIDUAL_NAMES))
    return out, (q, k, v, mask, out, lse)


def _lse_attention_bwd(scale, precision, residuals, d_out):
    q, k, v, mask, out, lse = residuals
    qu, ku, vu, shared_mask, unit_mask, unit_bytes = _unit_args(q, k, v, mask)
    kv = k.shape[2]
    bwd = lambda q, k, v, o, lse, d_o, m: _unit_backward(q, k, v, m, o, lse, d_o, scale,
                                                        precision)
    d_q, d_k, d_v = _map_units(bwd, (qu, ku, vu, _to_units(out, kv), lse, _to_units(d_out, kv)),
                               shared_mask, unit_mask, unit_bytes)
    b = q.shape[0]
    return (_from_units(d_q, b), _from_units(d_k[:, None], b), _from_units(d_v[:, None], b),
            None)


_lse_attention.defvjp(_lse_attention_fwd, _lse_attention_bwd)


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
    return _lse_attention(q, k, v, mask, scale, lax_precision(precision))
