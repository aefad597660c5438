"""The layer-stacked layout of a training state, and its conversions to and from the per-layer layout.

Per layer (the layout of models, ``save_pretrained``, training checkpoints and HF exports), the encoder's arrays live
at ``.../encoder/layer/<i>/<name>``. Stacked (the layout of a `TrainState` whose model scans its layers), each
``<name>`` is one array ``.../encoder/layer/<name>`` with a leading axis of the layers: the scan consumes the
parameters and produces their gradients and optimizer updates without a per-layer copy, so the train step's program
is the same at any depth. `stack` and `unstack` convert every `nnx.State` inside a pytree (parameters, or an optimizer
state holding parameter-shaped trees); leaves may be arrays, `jax.ShapeDtypeStruct` or `NamedSharding`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

LAYERS = ("encoder", "layer")
"""The path of the layers: a list (per layer) or one layer holding stacked arrays."""


def _after_layers(path: Sequence[Hashable]) -> int | None:
    """The position after ``encoder/layer`` in ``path`` (``None`` outside the layers)."""
    for i in range(len(path) - len(LAYERS)):
        if tuple(path[i:i + len(LAYERS)]) == LAYERS:
            return i + len(LAYERS)
    return None


def is_stacked(path: Sequence[Hashable]) -> bool:
    """Whether ``path`` is a layer array in the stacked layout (no layer index after ``encoder/layer``)."""
    at = _after_layers(path)
    return at is not None and not isinstance(path[at], int)


def per_layer_path(path: Sequence[Hashable], index: int) -> tuple:
    """The per-layer path of layer ``index`` of the stacked array at ``path``."""
    at = _after_layers(path)
    return (*path[:at], index, *path[at:])


def _join(values: list) -> Any:
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = _join([sharding])
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype, sharding=sharding)
    if isinstance(first, NamedSharding):
        return NamedSharding(first.mesh, PartitionSpec(None, *first.spec))
    if hasattr(first, "shape"):
        return jnp.stack(values)
    return first  # a leaf without data (e.g. optax.MaskedNode)


def _split(value: Any, count: int) -> list:
    if isinstance(value, jax.ShapeDtypeStruct):
        sharding = value.sharding
        if isinstance(sharding, NamedSharding):
            sharding = _split(sharding, 1)[0]
        return [jax.ShapeDtypeStruct(value.shape[1:], value.dtype, sharding=sharding)] * count
    if isinstance(value, NamedSharding):
        return [NamedSharding(value.mesh, PartitionSpec(*value.spec[1:]))] * count
    if hasattr(value, "shape"):
        return [value[i] for i in range(count)]
    return [value] * count


def _stack_state(state: nnx.State) -> nnx.State:
    groups: dict[tuple, dict[int, Any]] = {}
    flat = []
    for path, value in nnx.to_flat_state(state):
        at = _after_layers(path)
        if at is None or not isinstance(path[at], int):
            flat.append((path, value))
            continue
        key = (*path[:at], *path[at + 1:])
        if key not in groups:
            groups[key] = {}
            flat.append((key, groups[key]))
        groups[key][path[at]] = value
    return nnx.from_flat_state([(p, _join([v[i] for i in sorted(v)]) if p in groups else v) for p, v in flat])


def _unstack_state(state: nnx.State, num_layers: int) -> nnx.State:
    flat = []
    for path, value in nnx.to_flat_state(state):
        if is_stacked(path):
            flat += [(per_layer_path(path, i), part) for i, part in enumerate(_split(value, num_layers))]
        else:
            flat.append((path, value))
    return nnx.from_flat_state(flat)


def _each_state(tree: Any, fn) -> Any:
    return jax.tree.map(lambda x: fn(x) if isinstance(x, nnx.State) else x, tree,
                        is_leaf=lambda x: isinstance(x, nnx.State))


def stack(tree: Any) -> Any:
    """``tree`` with every `nnx.State` in it in the stacked layout (states already stacked are unchanged)."""
    return _each_state(tree, _stack_state)


def unstack(tree: Any, num_layers: int) -> Any:
    """``tree`` with every `nnx.State` in it in the per-layer layout, ``num_layers`` layers."""
    return _each_state(tree, lambda s: _unstack_state(s, num_layers))


def key_path(path: tuple) -> tuple:
    """A pytree key path -> the NNX parameter path (``("mra", "encoder", "layer", 0, ...)``)."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def num_stacked_layers(tree: Any) -> int | None:
    """The number of layers of the stacked arrays in ``tree`` (``None`` if it holds none)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if hasattr(leaf, "shape") and is_stacked(key_path(path)):
            return int(leaf.shape[0])
    return None
