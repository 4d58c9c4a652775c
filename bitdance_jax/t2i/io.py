"""The text-to-image directory format (``kind: bitdance_t2i``): its one writer and reader,
used by loading, porting and training.

``bitdance.json`` holds the model and tokenizer configs; ``params`` holds {"llm", "head",
"projector", "tokenizer"}; the text tokenizer's files lie beside them. A quantized directory
(``"quantization": "int8"`` or ``"fp8"`` in the metadata) holds each LLM, head and projector
kernel as ``{"qvalue", "scale"}`` (``nn.quant.to_plain``)."""
from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from bitdance_jax.checkpointing import fingerprint, param_dir
from bitdance_jax.nn import quant
from bitdance_jax.parallel.sharding import divisible_logical_sharding
from bitdance_jax.t2i.config import KIND, T2IConfig
from bitdance_jax.t2i.model import abstract_t2i_params

__all__ = ["KIND", "save_t2i", "is_t2i_dir", "stored_quantization", "load"]


def save_t2i(dst: str, config: T2IConfig, params, *, source: str,
             text_tokenizer_files: Mapping[str, str], overwrite: bool = False,
             quantize: str | None = None) -> str:
    """Write ``params`` with their description and the text tokenizer's files ({name in the
    directory: file to copy}, copied before the directory is renamed into place). The
    metadata records the tokenizer's params digest (``tokenizer_params``). ``quantize``: the
    mode ``params`` were quantized with (``nn.quant``), recorded as ``quantization``."""
    extra = {"tokenizer": config.tokenizer.to_dict(), "source": source,
             "tokenizer_params": fingerprint.tree_digest(params["tokenizer"])}
    if quant.check_mode(quantize) is not None:
        extra["quantization"] = quantize
        params = quant.to_plain(params)
    return param_dir.save_param_dir(dst, KIND, config.to_dict(), params, overwrite=overwrite,
                                     extra=extra, extra_files=dict(text_tokenizer_files))


def is_t2i_dir(path: str) -> bool:
    """Whether ``path`` is a written directory (``bitdance.json``), not a released folder."""
    return os.path.isfile(os.path.join(path, param_dir.META_FILE))


def stored_quantization(path: str) -> str | None:
    """The quantization a written directory holds its kernels in (None: float)."""
    return _meta(path).get("quantization")


def _meta(path: str) -> dict:
    meta = param_dir.read_meta(path)
    if meta.get("kind") != KIND:
        raise param_dir.CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, "
                                         f"expected '{KIND}'")
    try:
        quant.check_mode(meta.get("quantization"))
    except ValueError as e:
        raise param_dir.CheckpointError(f"{path}: {e}") from e
    return meta


def load(path: str, *, param_dtype=jnp.float32, mesh=None,
         quantize: str | None = None) -> tuple[T2IConfig, dict]:
    """``(config, params)`` of a written directory, restored straight into ``param_dtype``
    (and onto ``mesh``'s shardings when given: no full host copy).

    A quantized directory restores its int8/fp8 kernels as they are (``quantize`` None or its
    own mode); a float one with ``quantize`` is quantized as it is read, one tensor at a time,
    so the float tree never exists in full."""
    meta = _meta(path)
    config = T2IConfig.from_dict(meta["config"])
    stored = meta.get("quantization")
    if stored is not None and quant.check_mode(quantize) not in (None, stored):
        raise param_dir.CheckpointError(
            f"{path} holds {stored} weights, not {quantize}: load it with quantize={stored!r} "
            "(or None), or write the float weights again with the other quantization")
    mode = stored or quantize
    abstract = abstract_t2i_params(config, param_dtype, mode)
    if mesh is None:
        shardings = jax.tree.map(lambda _: None, nn.unbox(abstract))
    else:
        shardings = divisible_logical_sharding(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(abstract), shardings)
    if stored is not None or mode is None:
        _, params = param_dir.load_param_dir(path, KIND, target=quant.to_plain(target))
        return config, quant.from_plain(params, nn.unbox(abstract))
    float_target = nn.unbox(abstract_t2i_params(config, param_dtype))
    flat_q = traverse_util.flatten_dict(nn.unbox(abstract), is_leaf=lambda _, v: quant.is_quantized(v))
    flat_s = traverse_util.flatten_dict(shardings, is_leaf=lambda _, v: quant.is_quantized(v))

    def convert(key, value):
        leaf = quant.quantize_leaf(value, flat_q[key])
        return jax.device_put(leaf, flat_s[key]) if mesh is not None else leaf
    _, params = param_dir.load_param_dir_leafwise(path, KIND, float_target, convert)
    return config, params
