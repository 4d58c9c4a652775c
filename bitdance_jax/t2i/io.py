"""The text-to-image directory format (``kind: bitdance_t2i``): its one writer and reader,
used by loading, porting and training.

``bitdance.json`` holds the model and tokenizer configs; ``params`` holds {"llm", "head",
"projector", "tokenizer"}; the text tokenizer's files lie beside them."""
from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from bitdance_jax.checkpointing import fingerprint, param_dir
from bitdance_jax.parallel.sharding import divisible_logical_sharding
from bitdance_jax.t2i.config import KIND, T2IConfig
from bitdance_jax.t2i.model import abstract_t2i_params

__all__ = ["KIND", "save_t2i", "is_t2i_dir", "load"]


def save_t2i(dst: str, config: T2IConfig, params, *, source: str,
             text_tokenizer_files: Mapping[str, str], overwrite: bool = False) -> str:
    """Write ``params`` with their description and the text tokenizer's files ({name in the
    directory: file to copy}, copied before the directory is renamed into place). The
    metadata records the tokenizer's params digest (``tokenizer_params``)."""
    extra = {"tokenizer": config.tokenizer.to_dict(), "source": source,
             "tokenizer_params": fingerprint.tree_digest(params["tokenizer"])}
    return param_dir.save_param_dir(dst, KIND, config.to_dict(), params, overwrite=overwrite,
                                     extra=extra, extra_files=dict(text_tokenizer_files))


def is_t2i_dir(path: str) -> bool:
    """Whether ``path`` is a written directory (``bitdance.json``), not a released folder."""
    return os.path.isfile(os.path.join(path, param_dir.META_FILE))


def load(path: str, *, param_dtype=jnp.float32, mesh=None) -> tuple[T2IConfig, dict]:
    """``(config, params)`` of a written directory, restored straight into ``param_dtype``
    (and onto ``mesh``'s shardings when given: no full host copy)."""
    meta = param_dir.read_meta(path)
    if meta.get("kind") != KIND:
        raise param_dir.CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, "
                                         f"expected '{KIND}'")
    config = T2IConfig.from_dict(meta["config"])
    abstract = abstract_t2i_params(config, param_dtype)
    if mesh is None:
        shardings = jax.tree.map(lambda _: None, nn.unbox(abstract))
    else:
        shardings = divisible_logical_sharding(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(abstract), shardings)
    _, params = param_dir.load_param_dir(path, KIND, target=target)
    return config, params
