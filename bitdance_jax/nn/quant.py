"""Weight-only int8 / fp8 inference through qwix (Google's JAX quantization library).

``quantized(module, mode)`` wraps a linen module with qwix's post-training provider: every
``lax.dot_general`` whose right operand is a param, i.e. the kernel of every Dense, then takes
that kernel as a ``QArray`` (int8 or float8_e4m3fn values and one float scale per output
channel, absmax over the input dim), dequantized into the matmul's dtype. Activations keep the
compute dtype. Embeddings (gathers), norms (elementwise) and convolutions
(``conv_general_dilated``, outside the rule) keep their float params: they are a small part of
the weights and the tokenizer decoder makes the final pixels.

A quantized param tree holds ``WithAux(QArray(qvalue, scale), how)`` leaves where the float
tree holds a kernel; qwix keeps the kernel's logical axis names on ``qvalue`` and ``scale``,
so the sharding rules and the (data, fsdp, tensor) mesh apply unchanged (a size-1 scale dim
is replicated by ``divisible_logical_sharding``). Stored, such a leaf becomes the plain dict
``{"qvalue", "scale"}`` (``to_plain``/``from_plain``): the directory formats stay trees of
arrays.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn
from flax import traverse_util
from qwix._src.providers.ptq import WithAux  # the leaf type qwix's PTQ trees hold

from bitdance_jax.nn.params import abstract_params

# Weight types: per-channel absmax int8, and float8 e4m3 (the fp8 of inference kernels:
# more mantissa than e5m2; the per-channel scale takes care of the range).
MODES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
STORED = ("qvalue", "scale")


def check_mode(mode: str | None) -> str | None:
    """``mode`` if it is None or a known quantization, else a ValueError."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: choose one of {sorted(MODES)} "
                         "(or none)")
    return mode


def rules(mode: str) -> list[qwix.QuantizationRule]:
    """One rule: the param operand of every dot_general (the Dense kernels), weights only.
    Einsums (attention scores and values) are not params and not matched."""
    return [qwix.QuantizationRule(module_path=".*", weight_qtype=MODES[check_mode(mode)],
                                  op_names=("dot_general",))]


def quantized(module: nn.Module, mode: str | None, methods=("__call__",)) -> nn.Module:
    """``module`` with its ``methods`` taking quantized kernels (``module`` itself for None).
    Equal arguments give the same module, so programs jitted over it (the samplers' caches)
    are shared by every model loaded with the same config and mode."""
    if check_mode(mode) is None:
        return module
    return _quantized(module, mode, tuple(methods))


@functools.lru_cache(maxsize=64)   # bounded: models loaded in one process are few
def _quantized(module: nn.Module, mode: str, methods: tuple[str, ...]) -> nn.Module:
    # qwix builds a new subclass per call: without the cache no two calls compare equal.
    return qwix.quantize_model(module, qwix.PtqProvider(rules(mode)), methods=methods)


def abstract_quantized(module: nn.Module, mode: str, *example_args, method=None):
    """Boxed abstract params of ``quantized(module, mode)`` (nothing allocated): what the
    quantized tree looks like, with each kernel's ``how`` (axes of its scale)."""
    return abstract_params(quantized(module, mode, ("__call__",) if method is None
                                     else ("__call__", method)), *example_args, method=method)


def is_quantized(x) -> bool:
    return isinstance(x, WithAux)


def _flat(tree):
    return traverse_util.flatten_dict(tree, is_leaf=lambda _, v: is_quantized(v))


def quantize_leaf(value, abstract_leaf):
    """One tensor: quantized as ``abstract_leaf`` (a ``WithAux``) says, or returned as it is
    when that leaf is a float param."""
    if not is_quantized(abstract_leaf):
        return value
    how = abstract_leaf.how
    value = jnp.asarray(value).reshape(abstract_leaf.shape)
    return abstract_leaf.replace(array=_quantize(value, how.qtype, tuple(how.channelwise_axes),
                                                 how.calibration_method))


# Jitted: one fused program per kernel shape, not a full-size float temporary per eager op
# (eagerly, quantizing a float directory took 3x its size in host memory).
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(value, qtype, channelwise_axes, calibration_method):
    return qwix.quantize(value, qtype, channelwise_axes=channelwise_axes,
                         calibration_method=calibration_method)


def quantize_tree(params, abstract, place: Callable | None = None):
    """Quantize a float tree onto ``abstract`` (unboxed, from ``abstract_quantized``) one
    tensor at a time; ``place(path, leaf)`` may move each result (e.g. onto its devices)."""
    flat_abstract = _flat(abstract)
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        leaf = quantize_leaf(value, flat_abstract[path])
        out[path] = place(path, leaf) if place is not None else leaf
    return traverse_util.unflatten_dict(out)


def to_plain(tree):
    """Quantized leaves -> ``{"qvalue", "scale"}`` dicts (any leaf type: arrays, shapes,
    shardings); float leaves unchanged."""
    out = {}
    for path, leaf in _flat(tree).items():
        if is_quantized(leaf):
            out[path + ("qvalue",)] = leaf.array.qvalue
            out[path + ("scale",)] = leaf.array.scale
        else:
            out[path] = leaf
    return traverse_util.unflatten_dict(out)


def from_plain(plain, abstract):
    """The inverse of ``to_plain``: rebuild each quantized leaf of ``abstract`` (unboxed)."""
    flat = traverse_util.flatten_dict(plain)
    out = {}
    for path, leaf in _flat(abstract).items():
        if is_quantized(leaf):
            out[path] = leaf.replace(array=leaf.array.replace(
                qvalue=flat[path + ("qvalue",)], scale=flat[path + ("scale",)]))
        else:
            out[path] = flat[path]
    return traverse_util.unflatten_dict(out)


def cast_scales(tree, dtype):
    """Scales in the compute dtype: the dequantized kernel then enters the matmul in that
    dtype, as a float kernel would (bf16 x bf16, not a float32 matmul on bf16 activations)."""
    def cast(leaf):
        if not is_quantized(leaf):
            return leaf
        return leaf.replace(array=leaf.array.replace(scale=leaf.array.scale.astype(dtype)))
    return jax.tree.map(cast, tree, is_leaf=is_quantized)


def nbytes(tree) -> int:
    """Bytes of a (possibly abstract, possibly quantized) param tree."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                   for x in jax.tree.leaves(nn.unbox(tree))))
