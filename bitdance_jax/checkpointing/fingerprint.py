"""Fingerprints of resumable outputs: a digest of a param tree, and run manifests that a
resumed run must match.

A resumable output (``sample --npz`` chunks, a T2I prompt-set folder, the latent cache) is
only reused when everything that determines its bytes is the same: the weights (as a digest
of the param leaves, whatever file format they came from), the numerics and the sampling
settings. The manifest recording them is written atomically; a mismatch is refused with the
settings that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from bitdance_jax.checkpointing.atomic import atomic_write


def tree_digest(tree) -> str:
    """``sha256:<hex>`` of every leaf's path, dtype, shape and bytes (host or device arrays;
    leaves are fetched one at a time, so no second copy of the whole tree is made)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


def bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(saved: dict, wanted: dict) -> list[str]:
    """``key: saved -> now`` for every (dotted) key whose value differs."""
    a, b = _flat(saved), _flat(wanted)
    missing = object()
    return [f"{k}: {_short(a.get(k)) if k in a else '(absent)'} -> "
            f"{_short(b.get(k)) if k in b else '(absent)'}"
            for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]


class ManifestMismatch(ValueError):
    """A resumable output was started with other settings or weights."""


def read_manifest(path: str) -> dict | None:
    """The manifest at ``path``, or None if there is none (``ManifestMismatch`` if corrupt)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestMismatch(f"run manifest {path} is unreadable ({e}); remove it and the "
                               "outputs next to it") from None
    if not isinstance(saved, dict):
        raise ManifestMismatch(f"run manifest {path} is not a JSON object; remove it and the "
                               "outputs next to it")
    return saved


def check_or_write_manifest(path: str, run: dict, *, what: str) -> None:
    """Refuse to resume ``what`` when the manifest at ``path`` records other settings; write
    ``run`` there (atomically) when there is none."""
    run = json.loads(json.dumps(run))  # the form it takes on disk (tuples become lists)
    saved = read_manifest(path)
    if saved is not None:
        diff = differences(saved, run)
        if diff:
            raise ManifestMismatch(f"{what} was started with other settings or weights "
                                   f"({'; '.join(diff)}); rerun with the saved settings, "
                                   "or remove it / write to another path")
        return
    with atomic_write(path, directory=False) as tmp:
        with open(tmp, "w") as f:
            json.dump(run, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())


def numerics(dtype, precision) -> dict:
    """The numerics a sampler's bytes depend on: compute policy, matmul precision, backend."""
    from bitdance_jax.nn.precision import lax_precision, policy_name
    p = lax_precision(precision)
    return {"dtype": policy_name(dtype),
            "matmul_precision": "default" if p is None else p.name.lower(),
            "backend": jax.default_backend()}
