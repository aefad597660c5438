"""The block size and the on-device CSR metadata of a block selection.

A selection is given per fused batch·head row ``bh = b * H + h`` as ``indices[bh, :]``: ``K`` distinct flat block-pair
ids ``p = i * n + j`` (``i`` = query block, ``j`` = key block, ``n`` blocks of ``BLOCK`` tokens per side).  The kernels
need it grouped two ways:

* row view (forward and dQ): for query block ``i`` the key blocks are
  ``row_cols[bh, row_start[bh, i] : row_start[bh, i] + row_count[bh, i]]`` (ascending);
* column view (dK/dV): for key block ``j`` the query blocks are
  ``col_rows[bh, col_start[bh, j] : col_start[bh, j] + col_count[bh, j]]`` (ascending).

Everything is int32 and built on device (no Python loop over data).  Because ``K`` is static the flat lists need no
padding, however ragged the rows are.  Ids that are already ascending (as a top-k selection returns them) *are* the
row view: only the column view needs a sort.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["BLOCK", "BlockLayout", "build_block_layout"]

BLOCK = 32
"""Tokens per block, in every kernel, the reference and the library built on them."""


class BlockLayout(NamedTuple):
    """Row and column CSR views of a block selection (all int32, leading axis ``B·H``)."""

    row_start: jax.Array  # [BH, n]  offset of query block i's key-block list in row_cols
    row_count: jax.Array  # [BH, n]  number of key blocks selected for query block i
    row_cols: jax.Array  # [BH, K]  key-block ids grouped by query block (ascending within a group)
    col_start: jax.Array  # [BH, n]  offset of key block j's query-block list in col_rows
    col_count: jax.Array  # [BH, n]  number of query blocks that selected key block j
    col_rows: jax.Array  # [BH, K]  query-block ids grouped by key block (ascending within a group)

    @property
    def num_blocks(self) -> int:
        return self.row_start.shape[-1]


def _csr(ascending_keys: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Group ascending flat ``major * n + minor`` keys by ``major``: (start [BH, n], count [BH, n], minor [BH, K])."""
    count = jax.vmap(lambda m: jnp.bincount(m, length=n))(ascending_keys // n).astype(jnp.int32)
    start = (jnp.cumsum(count, axis=-1) - count).astype(jnp.int32)
    return start, count, (ascending_keys % n).astype(jnp.int32)


def build_block_layout(indices: jax.Array, n: int, *, ascending: bool = False) -> BlockLayout:
    """Both CSR views of ``indices`` [BH, K] (distinct flat pair ids per row) for ``n`` blocks per side.

    ``ascending=True`` promises that each row is already sorted (as :func:`~pallas_kernels.topk_indices` returns
    it), which saves the row view's sort.
    """
    if indices.ndim != 2:
        raise ValueError(f"indices must be [BH, K], got shape {indices.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be integer, got {indices.dtype}")
    n = int(n)
    idx = lax.stop_gradient(indices).astype(jnp.int32)
    row_start, row_count, row_cols = _csr(idx if ascending else jnp.sort(idx, axis=-1), n)
    col_start, col_count, col_rows = _csr(jnp.sort((idx % n) * n + idx // n, axis=-1), n)
    return BlockLayout(row_start, row_count, row_cols, col_start, col_count, col_rows)
