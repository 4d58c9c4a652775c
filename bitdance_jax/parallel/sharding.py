"""One mesh, one set of logical-axis rules: every model is sharded through these names.

Modules annotate params with logical names (``embed``, ``mlp``, ``heads`` ...); the rules
below map them to the mesh axes ``data``, ``fsdp`` and ``tensor``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes). Params: fsdp shards the model dimension, tensor
# splits heads / MLP / vocab. Activations: batch over data and fsdp.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("latent", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape: Sequence[int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. ``shape=None`` puts every device on ``data``.

    A ``-1`` entry takes the remaining devices. Axis types are Auto so that logical-rule
    sharding (``nn.logical_to_mesh_sharding``) drives the partitioning.
    """
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    shape = [n, 1, 1] if shape is None else list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape needs 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one -1 in mesh shape, got {shape}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if n % known:
            raise ValueError(f"{n} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = n // known
    if int(np.prod(shape)) != n:
        raise ValueError(f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, have {n}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def logical_sharding(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a (boxed) abstract param tree from its logical annotations."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dim split over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def divisible_logical_sharding(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """``logical_sharding``, but a dim the mesh axes do not divide (e.g. 3 RGB output
    channels over tensor=2) is replicated instead of split. Leaves follow the unboxed tree."""
    def fit(named, leaf):
        spec = []
        for dim, axes in zip(leaf.shape, tuple(named.spec) + (None,) * len(leaf.shape)):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
            spec.append(axes if dim % ways == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(fit, logical_sharding(abstract_tree, mesh, rules), nn.unbox(abstract_tree))
