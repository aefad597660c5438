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


class LowResolution(NamedTuple):
    """Block-level quantities of one attention call; leading axes ``[batch, heads]``.

    logits: ``[.., n, n]`` block logits with the padding penalty applied.
    row_max: ``[.., n, 1]`` row max of the logits taken *before* the penalty (HF's order).
    token_count: ``[.., n]`` unpadded tokens per block (float, no gradient).
    value_hat: ``[.., n, d]`` masked block means of the values, or ``None`` when not needed.
    """

    logits: jax.Array
    row_max: jax.Array
    token_count: jax.Array
    value_hat: jax.Array | None


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
    logits = jnp.einsum("...id,...jd->...ij", query_hat, key_hat) / scale
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    padded_pair = (count[..., :, None] * count[..., None, :]) < 0.5
    logits = logits - PAD_PENALTY * padded_pair.astype(logits.dtype)
    return LowResolution(logits, row_max, count, value_hat)
