"""Stage 3, jnp reference: attention of each query block over the key blocks selected in its row."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mra_jax.attention.low_resolution import PAD_PENALTY, matmul_precision
from mra_jax.configuration import BLOCK_SIZE
from pallas_kernels import block_sparse_attention

EMPTY_ROW_MAX = -1e5
"""Reference max of query blocks with no selected pair (HF's finite sentinel, ``-1e8 / 1000``)."""


class HighResolution(NamedTuple):
    """Unnormalised high-resolution sums per query token; leading axes ``[batch, heads]``.

    out: ``[.., S, d]`` float32, ``sum exp(s - row_max) v`` over the selected keys.
    normalizer: ``[.., S]`` float32, ``sum exp(s - row_max)``.
    row_max: ``[.., S]`` float32 reference max (a constant for autodiff); ``EMPTY_ROW_MAX`` in rows of query
    blocks without a selected pair, where ``out`` and ``normalizer`` are 0.
    """

    out: jax.Array
    normalizer: jax.Array
    row_max: jax.Array


def quantized_block_max(block_max: jax.Array, rows: jax.Array, n: int) -> jax.Array:
    """HF's ``index_max``: per query token the max over its row's blocks, truncated toward zero to 1e-3.

    ``block_max`` ``[k, 32]`` (max over the keys of each selected block), ``rows`` ``[k]`` -> ``[n, 32]``.
    """
    quantized = (block_max * 1000.0).astype(jnp.int32)
    init = jnp.full((n, BLOCK_SIZE), int(EMPTY_ROW_MAX * 1000), jnp.int32)
    row_max = init.at[rows].max(quantized).astype(jnp.float32)
    # Correctly rounded int / 1000 as HF's kernel: XLA turns division by a constant into a multiplication by its
    # reciprocal (1 ulp off half the time), so the divisor is made an array it cannot fold.
    return row_max / (1000.0 + 0.0 * row_max)


def _high_resolution_single(query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array,
                            indices: jax.Array, scale: float) -> HighResolution:
    """One (batch, head): ``query/key/value`` ``[S, d]``, ``key_mask`` ``[S]``, ``indices`` ``[k]``."""
    s, d = query.shape
    n = s // BLOCK_SIZE
    rows, cols = indices // n, indices % n
    q_blocks = query.reshape(n, BLOCK_SIZE, d)[rows]
    k_blocks = key.reshape(n, BLOCK_SIZE, d)[cols]
    v_blocks = value.reshape(n, BLOCK_SIZE, d)[cols]
    # Logits in HF's [key, query] block layout.
    precision = matmul_precision(query.dtype)
    logits = jnp.einsum("kad,kcd->kac", k_blocks, q_blocks, precision=precision,
                        preferred_element_type=jnp.float32) / scale
    row_max = jax.lax.stop_gradient(quantized_block_max(logits.max(axis=1), rows, n))
    key_pad = 1.0 - key_mask.reshape(n, BLOCK_SIZE)[cols]
    logits = logits - row_max[rows][:, None, :] - PAD_PENALTY * key_pad[:, :, None]
    probs = jnp.exp(logits)
    block_out = jnp.einsum("kac,kad->kcd", probs.astype(value.dtype), v_blocks, precision=precision,
                           preferred_element_type=jnp.float32)
    out = jax.ops.segment_sum(block_out, rows, num_segments=n).reshape(s, d)
    normalizer = jax.ops.segment_sum(probs.sum(axis=1), rows, num_segments=n).reshape(s)
    return HighResolution(out, normalizer, row_max.reshape(s))


def high_resolution_reference(query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array,
                              indices: jax.Array, scale: float) -> HighResolution:
    """Gather / segment-sum reference of stage 3.

    ``query/key/value`` ``[B, H, S, d]`` already masked, ``key_mask`` ``[B, S]`` float 0/1, ``indices``
    ``[B, H, k]`` int32 flat pair indices. Matmuls run in the input dtype with float32 accumulation.
    """
    per_head = jax.vmap(_high_resolution_single, in_axes=(0, 0, 0, None, 0, None))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, None))
    return per_batch(query, key, value, key_mask, indices, scale)


def high_resolution_pallas(query: jax.Array, key: jax.Array, value: jax.Array, key_mask: jax.Array,
                           indices: jax.Array, scale: float, backend: str, interpret: bool) -> HighResolution:
    """Stage 3 with the Pallas kernels of ``backend`` ("gpu" or "tpu"); arguments as `high_resolution_reference`.

    The kernels return the normalised output ``o`` and its log-sum-exp; here they become unnormalised sums with
    reference max ``lse`` (a constant for autodiff): ``out = o``, ``normalizer = 1``. Equal to the reference
    contract up to HF's ``+1e-6`` terms, which see another reference max (~1e-6 relative).
    """
    batch, heads, seq, dim = query.shape
    o, lse = block_sparse_attention(*(x.reshape(batch * heads, seq, dim) for x in (query, key, value)), key_mask,
                                    indices.reshape(batch * heads, -1), scale=scale, num_heads=heads,
                                    interpret=interpret, backend=backend)
    finite = jnp.isfinite(lse)
    row_max = jax.lax.stop_gradient(jnp.where(finite, lse, EMPTY_ROW_MAX))
    normalizer = jnp.where(finite, jnp.exp(jnp.where(finite, lse, row_max) - row_max), 0.0)
    out = o.astype(jnp.float32) * normalizer[..., None]
    return HighResolution(*(x.reshape(batch, heads, *x.shape[1:]) for x in (out, normalizer, row_max)))
