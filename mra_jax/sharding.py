"""Meshes and parameter shardings: logical axes per parameter, mapped to mesh axes by a rule set.

Mesh axes are ``("data", "fsdp", "tensor")``. Rule sets: ``"dp"`` (parameters replicated), ``"fsdp"`` (the hidden
axis sharded over ``fsdp``), ``"fsdp_tp"`` (also heads and the MLP axis over ``tensor``). A dimension that a mesh
axis does not divide stays replicated (e.g. the 50265-word vocabulary is never sharded).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mra_jax import stacked_layers

MESH_AXES = ("data", "fsdp", "tensor")

# (pattern on the "/"-joined parameter path, logical axes of the value in NNX layout)
LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"word_embeddings/embedding$", ("vocab", "embed")),
    (r"embeddings/embedding$", (None, "embed")),
    (r"attention/self/\w+/kernel$", ("embed", "heads")),
    (r"attention/self/\w+/bias$", ("heads",)),
    (r"attention/output/dense/kernel$", ("heads", "embed")),
    (r"intermediate/dense/kernel$", ("embed", "mlp")),
    (r"intermediate/dense/bias$", ("mlp",)),
    (r"layer/\d+/output/dense/kernel$", ("mlp", "embed")),
    (r"/kernel$", ("embed", None)),
)
"""Everything else (layer norms, other biases) is replicated."""

RULES: dict[str, dict[str, str | None]] = {
    "dp": {},
    "fsdp": {"embed": "fsdp"},
    "fsdp_tp": {"embed": "fsdp", "heads": "tensor", "mlp": "tensor"},
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis size may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh axes "
                             f"{dict(zip(MESH_AXES, sizes, strict=True))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(path: Sequence[Hashable], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at ``path`` (NNX layout; a stacked layer array's leading axis has none)."""
    if stacked_layers.is_stacked(path):
        return (None, *logical_axes(stacked_layers.per_layer_path(path, 0), ndim - 1))
    joined = "/".join(map(str, path))
    for pattern, axes in LOGICAL_AXES:
        if re.search(pattern, joined) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def partition_spec(path: Sequence[Hashable], shape: Sequence[int], mesh: Mesh,
                   rules: str | Mapping[str, str | None]) -> PartitionSpec:
    """Mesh axes for each dimension; dimensions the mesh axis does not divide stay replicated."""
    rule = RULES[rules] if isinstance(rules, str) else rules
    spec = []
    for dim, name in zip(shape, logical_axes(path, len(shape)), strict=True):
        axis = rule.get(name) if name else None
        spec.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
    return PartitionSpec(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: str | Mapping[str, str | None] = "fsdp") -> dict:
    """``{path: NamedSharding}`` for every parameter of ``model`` (concrete or abstract)."""
    if isinstance(rules, str) and rules not in RULES:
        raise ValueError(f"unknown sharding rules {rules!r}; expected one of {sorted(RULES)}")
    used = set((RULES[rules] if isinstance(rules, str) else rules).values()) - {None}
    if used - set(mesh.axis_names):
        raise ValueError(f"sharding rules use mesh axes {sorted(used)}, the mesh has {list(mesh.axis_names)}")
    return {path: NamedSharding(mesh, partition_spec(path, var.get_value().shape, mesh, rules))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
