"""PyTorch state_dict <-> Flax param tree, by one naming convention, strictly checked.

Convention: a Flax path segment ``name_<int>`` is the PyTorch path ``name.<int>``
(ModuleList / Sequential index); leaf ``kernel`` is ``weight`` (conv OIHW -> HWIO,
linear (out, in) -> (in, out)), ``scale`` and ``embedding`` are ``weight``, other
leaves keep their name. Models whose PyTorch names break the convention pass
``renames`` (flax-derived torch key -> real torch key).

Nothing is returned unless every source key is consumed and every target leaf is filled
with the right shape; the error names every offending key.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util
from flax import linen as nn

from bitdance_jax.nn.params import abstract_params  # noqa: F401  (porting's callers build targets with it)

_INDEXED = re.compile(r"^(.*)_(\d+)$")


class PortingError(ValueError):
    """A checkpoint does not match the target architecture (missing/extra/mis-shaped keys)."""


def torch_key_for(flax_path: tuple[str, ...]) -> str:
    parts = []
    for seg in flax_path[:-1]:
        m = _INDEXED.match(seg)
        parts.extend([m.group(1), m.group(2)] if m else [seg])
    leaf = flax_path[-1]
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def torch_to_flax_array(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 4:   # conv OIHW -> HWIO
            return np.transpose(value, (2, 3, 1, 0))
        if value.ndim == 2:   # linear (out, in) -> (in, out)
            return value.T
        raise PortingError(f"kernel of unexpected rank {value.ndim}")
    return value


def porting_map(abstract_params, renames: Mapping[str, str] | None = None
                ) -> dict[tuple[str, ...], str]:
    """Flax leaf path -> torch key for every leaf of an (abstract) param tree."""
    renames = renames or {}
    flat = traverse_util.flatten_dict(nn.unbox(abstract_params))
    out = {}
    for path in flat:
        key = torch_key_for(path)
        out[path] = renames.get(key, key)
    return out


def expected_torch_shapes(abstract_params, renames=None) -> dict[str, tuple[int, ...]]:
    """The torch state_dict (key -> shape) that ports exactly onto ``abstract_params``."""
    flat = traverse_util.flatten_dict(nn.unbox(abstract_params))
    shapes = {}
    for path, key in porting_map(abstract_params, renames).items():
        shape = tuple(flat[path].shape)
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        shapes[key] = shape
    return shapes


def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_params, *,
                       renames: Mapping[str, str] | None = None,
                       ignore: Callable[[str], bool] = lambda k: False,
                       what: str = "checkpoint") -> dict:
    """Port ``state_dict`` onto the structure of ``abstract_params`` (strict).

    ``ignore(key)`` marks source keys that are deliberately not ported (e.g. buffers).
    Returns a plain nested dict of float numpy arrays in the target dtypes.
    """
    unboxed = nn.unbox(abstract_params)
    flat_target = traverse_util.flatten_dict(unboxed)
    mapping = porting_map(abstract_params, renames)
    consumed, missing, bad_shape, out = set(), [], [], {}
    for path, key in mapping.items():
        if key not in state_dict:
            missing.append(key)
            continue
        consumed.add(key)
        value = torch_to_flax_array(path[-1], np.asarray(state_dict[key]))
        target = flat_target[path]
        if tuple(value.shape) != tuple(target.shape):
            bad_shape.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
            continue
        out[path] = value.astype(target.dtype)
    extra = [k for k in state_dict if k not in consumed and not ignore(k)]
    raise_if_mismatch(what, missing, extra, bad_shape)
    return traverse_util.unflatten_dict(out)


def key_shape(state_dict: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    """Shape of ``state_dict[key]`` (an array or a bare shape); a PortingError saying the
    file is not ``what`` when the key is absent. Used to infer architectures."""
    if key not in state_dict:
        raise PortingError(f"not {what}: missing key {key!r}")
    value = state_dict[key]
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def raise_if_mismatch(what: str, missing, extra, bad_shape) -> None:
    """One PortingError naming every missing, unexpected and mis-shaped key (if any)."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(sorted(missing))}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {', '.join(sorted(extra))}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): {'; '.join(bad_shape)}")
    if problems:
        raise PortingError(f"{what} does not match the model: " + " | ".join(problems))


def load_torch_file(path: str) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True`` (never runs pickled code).

    ``argparse.Namespace`` (the ``args`` of the reference's training checkpoints, plain
    attributes) is allowed."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading .pt files needs torch: pip install 'bitdance-jax[torch]'") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PortingError(f"cannot read {path} as a PyTorch checkpoint "
                           f"(truncated or not a weights-only file): {e}") from e


def tensors_to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if str(v.dtype) == "torch.bfloat16":
                v = v.float()
            v = v.numpy()
        out[k] = np.asarray(v)
    return out


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise PortingError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e


def read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise PortingError(f"{what}: missing file {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PortingError(f"{what}: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise PortingError(f"{what}: {path} should hold a JSON object, found a {type(data).__name__}")
    return data

