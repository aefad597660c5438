"""Stage 1: the low-resolution (block-mean) attention logits."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mra_jax.configuration import BLOCK_SIZE

PAD_PENALTY = 1e4
"""HF's additive penalty for padded pairs and padded keys (``1e4``, not ``inf``)."""

EPS = 1e-6
"""HF's ``+1e-6`` in block means and in the final normaliser."""


def matmul_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """Full float32 products for float32 inputs (as HF; GPUs would use TF32 and TPUs bfloat16 by default, which
    can change the block selection); the backend default for lower precisions."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


class LowResolution(NamedTuple):
    """Block-level quantities of one attention call; leading axes ``[batch, heads]``.

    logits: ``[.., n, n]`` block logits with the padding penalty applied.
    row_max: ``[.., n, 1]`` row max of the logits taken *before* the penalty (HF's order).
    token_count: ``[.., n]`` unpadded tokens per block (float, no gradient).
    value_hat: ``[.., n, d]`` masked block means of the values, or ``None`` when not needed.
    scores: ``[.., n, n]`` ``logits - row_max`` for the block selection (no gradient).
    """

    logits: jax.Array
    row_max: jax.Array
    token_count: jax.Array
    value_hat: jax.Array | None
    scores: jax.Array


def block_sums(x: jax.Array) -> jax.Array:
    """``[.., S, d] -> [.., S/32, d]`` sums over each block of 32 tokens."""
    *lead, s, d = x.shape
    return x.reshape(*lead, s // BLOCK_SIZE, BLOCK_SIZE, d).sum(axis=-2)


def low_resolution(query: jax.Array, key: jax.Array, value: jax.Array | None, mask: jax.Array,
                   scale: float) -> LowResolution:
    """Block means of masked ``query``/``key``/``value`` (``[.., S, d]``, float32) and their logits.

    ``mask`` is ``[.., S]`` float 0/1 (broadcastable against the leading axes). The means divide by
    ``count + 1e-6`` (HF's formula, also with an all-ones mask).
    """
    *lead, s = mask.shape
    count = jax.lax.stop_gradient(mask.reshape(*lead, s // BLOCK_SIZE, BLOCK_SIZE).sum(axis=-1))
    denom = (count + EPS)[..., None]
    query_hat = block_sums(query) / denom
    key_hat = block_sums(key) / denom
    value_hat = None if value is None else block_sums(value) / denom
    products = jnp.einsum("...id,...jd->...ij", query_hat, key_hat, precision=jax.lax.Precision.HIGHEST)
    logits = products / scale
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    penalty = PAD_PENALTY * ((count[..., :, None] * count[..., None, :]) < 0.5).astype(logits.dtype)
    # Selection scores logits - row_max, with each row's max at exactly 0 (HF's ties between rows): subtracting
    # before scaling guarantees it, whereas XLA may round `products / scale` differently in different fusions.
    scores = (products - jnp.max(products, axis=-1, keepdims=True)) / scale - penalty
    return LowResolution(logits - penalty, row_max, count, value_hat, jax.lax.stop_gradient(scores))
