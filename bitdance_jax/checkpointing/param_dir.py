"""Self-describing param directories: ``<dir>/bitdance.json`` (what it is + config) and
``<dir>/params`` (an Orbax checkpoint of the param tree).

Written to a temporary sibling and renamed at the end, so an interrupted write never
leaves a directory that looks complete. In a multi-process job every process calls
``save_param_dir`` (the Orbax save is a collective) and ``load_param_dir``; process 0 alone
writes the metadata and renames.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from bitdance_jax.checkpointing.atomic import atomic_write, recover

META_FILE = "bitdance.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A param directory is missing, incomplete or of another kind than expected."""


def save_param_dir(dst: str, kind: str, config: dict[str, Any], params, *,
                   overwrite: bool = False, extra: dict[str, Any] | None = None,
                   extra_files: dict[str, str] | None = None) -> str:
    """Write ``params`` (host arrays, the same on every process) and their description.
    ``extra_files``: {name in the directory: file to copy there}.

    Multi-process: every process must call it with the same arguments (the Orbax save syncs
    all processes); it returns on each once the directory is in place."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise CheckpointError(f"{dst} exists and is not empty (refusing to overwrite)")
    params = jax.tree.map(np.asarray, params)
    with atomic_write(dst, directory=True, all_processes=True) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
        if jax.process_index() == 0:
            meta = {"format_version": FORMAT_VERSION, "kind": kind, "config": config,
                    **(extra or {})}
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, os.path.join(tmp, name))
    return dst


def read_meta(path: str) -> dict[str, Any]:
    recover(os.path.abspath(path))  # a crash while the directory was being replaced
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path} is not a bitdance-jax checkpoint directory "
                              f"(no {META_FILE}); port weights with python -m bitdance_jax.porting")
    with open(meta_path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path} is corrupt: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is corrupt: expected a JSON object, found a "
                              f"{type(meta).__name__}")
    return meta


def _params_path(path: str, kind: str | None):
    meta = read_meta(path)
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path} holds a '{meta.get('kind')}' checkpoint, expected '{kind}'")
    params_path = os.path.join(os.path.abspath(path), PARAMS_DIR)
    if not os.path.isdir(params_path):
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ (incomplete checkpoint)")
    return meta, params_path


def load_param_dir(path: str, kind: str | None = None, target=None):
    """Returns ``(meta, params)``. ``target`` (abstract tree with shardings) places arrays."""
    meta, params_path = _params_path(path, kind)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(params_path, target) if target is not None else ckptr.restore(params_path)
        except Exception as e:
            raise CheckpointError(f"cannot restore params from {params_path}: {e}") from e
    return meta, params


def load_param_dir_leafwise(path: str, kind: str | None, target, convert):
    """``(meta, params)`` read one tensor at a time: each leaf of ``target`` (a tree of
    ``ShapeDtypeStruct``, unboxed) is restored into host memory in its dtype and replaced by
    ``convert(path_tuple, array)`` before the next is read, so host memory holds the results
    plus one tensor (e.g. quantizing a float directory at load time)."""
    meta, params_path = _params_path(path, kind)
    out = {}
    with ocp.PyTreeCheckpointer() as ckptr:
        for key, leaf in traverse_util.flatten_dict(target).items():
            item = traverse_util.unflatten_dict({key: leaf})
            restore_args = traverse_util.unflatten_dict(
                {key: ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)})
            try:
                restored = ckptr.restore(params_path, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True))
            except Exception as e:
                raise CheckpointError(f"cannot restore {'/'.join(key)} from {params_path}: "
                                      f"{e}") from e
            value = traverse_util.flatten_dict(restored)[key]
            if tuple(value.shape) != tuple(leaf.shape):
                raise CheckpointError(f"{params_path}: {'/'.join(key)} has shape "
                                      f"{tuple(value.shape)}, expected {tuple(leaf.shape)}")
            out[key] = convert(key, value)
            del restored, value
    return meta, traverse_util.unflatten_dict(out)
