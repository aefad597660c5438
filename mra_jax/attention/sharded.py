"""`mra_attention` under `jax.shard_map`: batch and heads split over mesh axes, no communication.

Everything MRA does (selection, block lists, kernels, combination) is per (batch, head), so each device runs the
unsharded algorithm on its own slice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh

from mra_jax.attention.mra import mra_attention
from mra_jax.options import shard_batch_and_heads


def sharded_mra_attention(query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None, *, mesh: Mesh,
                          batch_axes: str | Sequence[str] | None = ("data", "fsdp"), head_axis: str | None = None,
                          **kwargs) -> jax.Array:
    """`mra_attention` with ``[batch, seq, heads, head_dim]`` inputs split over ``batch_axes`` (batch) and
    ``head_axis`` (heads) of ``mesh``; the same result as the unsharded call. ``kwargs`` as `mra_attention`."""
    if isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    batch_axes = tuple(a for a in (batch_axes or ()) if a in mesh.axis_names) or None
    if head_axis is not None and head_axis not in mesh.axis_names:
        raise ValueError(f"head_axis {head_axis!r} is not an axis of the mesh {list(mesh.axis_names)}")
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes or ())
    if query.shape[0] % batch_shards:
        raise ValueError(f"batch {query.shape[0]} is not divisible by the {batch_shards} shards of {batch_axes}")
    if head_axis is not None and query.shape[2] % mesh.shape[head_axis]:
        raise ValueError(f"{query.shape[2]} heads are not divisible by the {mesh.shape[head_axis]} shards of "
                         f"{head_axis!r}")
    body = functools.partial(mra_attention, **kwargs)
    if mask is None:
        return shard_batch_and_heads(lambda q, k, v: body(q, k, v, None), mesh, batch_axes, head_axis,
                                     with_mask=False)(query, key, value)
    return shard_batch_and_heads(body, mesh, batch_axes, head_axis, with_mask=True)(query, key, value, mask)
