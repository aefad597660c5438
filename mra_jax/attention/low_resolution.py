"""Stage 1: the low-resolution (block-mean) attention logits."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mra_jax.configuration import BLOCK_SIZE
from pallas_kernels import low_resolution as kernels

PAD_PENALTY = 1e4
"""HF's additive penalty for padded pairs and padded keys (``1e4``, not ``inf``)."""

EPS = 1e-6
"""HF's ``+1e-6`` in block means and in the final normaliser."""


class LowResolution(NamedTuple):
    """Block-level quantities of one attention call; leading axes ``[batch, heads]``.

    logits: ``[.., n, n]`` block logits with the padding penalty applied.
    row_max: ``[.., n, 1]`` row max of the logits taken *before* the penalty (HF's order).
    token_count: ``[.., n]`` unpadded tokens per block (float, no gradient; heads axis 1).
    value_hat: ``[.., n, d]`` masked block means of the values, or ``None`` when not needed.
    scores: ``[.., n, n]`` ``logits - row_max`` for the block selection (no gradient).
    """

    logits: jax.Array
    row_max: jax.Array
    token_count: jax.Array
    value_hat: jax.Array | None
    scores: jax.Array


def block_sums(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``[B, S, H, d]`` (any float dtype) -> ``[B, n, H, d]`` float32 sums over the unpadded tokens of each block of
    32: one reduction of the input with float32 accumulation (no float32 copy of ``x``); ``mask`` ``[B, S]`` 0/1 or
    ``None``."""
    b, s, h, d = x.shape
    n = s // BLOCK_SIZE
    blocks = x.reshape(b, n, BLOCK_SIZE, h, d)
    if mask is None:
        return jnp.sum(blocks, axis=2, dtype=jnp.float32)
    # a contraction with the 0/1 mask (a multiply-then-sum makes XLA:GPU transpose x before reducing)
    return jnp.einsum("bnthd,bnt->bnhd", blocks, mask.reshape(b, n, BLOCK_SIZE).astype(x.dtype),
                      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def token_counts(mask: jax.Array | None, batch: int, n: int) -> jax.Array:
    """Unpadded tokens per block, ``[B, 1, n]`` float (no gradient), from a ``[B, S]`` 0/1 mask (``None`` = all)."""
    if mask is None:
        return jnp.full((batch, 1, n), float(BLOCK_SIZE), jnp.float32)
    return jax.lax.stop_gradient(mask.reshape(batch, 1, n, BLOCK_SIZE).sum(axis=-1))


def low_resolution(query_sum: jax.Array, key_sum: jax.Array, value_sum: jax.Array | None, count: jax.Array | None,
                   scale: float) -> LowResolution:
    """Block means from the `block_sums` of query/key/value (``[B, n, H, d]``; ``value_sum`` ``None`` when not
    needed) and `token_counts`, and their logits divided by ``scale``.

    The means divide by ``count + 1e-6`` (HF's formula, also without padding); ``count=None``: no padding.
    """
    if count is None:
        count = token_counts(None, *query_sum.shape[:2])
    denom = (count + EPS)[..., None]

    def means(x):
        return x.transpose(0, 2, 1, 3) / denom  # [B, H, n, d]

    query_hat, key_hat = means(query_sum), means(key_sum)
    value_hat = None if value_sum is None else means(value_sum)
    products = jnp.einsum("...id,...jd->...ij", query_hat, key_hat, precision=jax.lax.Precision.HIGHEST)
    logits = products / scale
    # max(products / scale) == max(products) / scale exactly (division by a positive constant is monotonic); one
    # reduction serves both. The barrier keeps XLA:GPU from fusing "max, subtract" into a softmax-like kernel of its
    # own that writes the scores, so that they are computed where the selection reads them.
    products_max = jax.lax.optimization_barrier(jnp.max(products, axis=-1, keepdims=True))
    row_max = products_max / scale
    penalty = PAD_PENALTY * ((count[..., :, None] * count[..., None, :]) < 0.5).astype(logits.dtype)
    # Selection scores logits - row_max, with each row's max at exactly 0 (HF's ties between rows): subtracting
    # before scaling guarantees it, whereas XLA may round `products / scale` differently in different fusions.
    scores = (jax.lax.stop_gradient(products) - jax.lax.stop_gradient(products_max)) / scale - penalty
    return LowResolution(logits - penalty, row_max, count, value_hat, scores)


def selection_scores(query_sum: jax.Array, key_sum: jax.Array, count: jax.Array | None, scale: float, *,
                     gpu_kernel: bool = False, interpret: bool = False) -> jax.Array:
    """`LowResolution.scores` ``[B, H, n, n]`` from the query/key `block_sums` and `token_counts` (``None``: no
    padding); ``gpu_kernel``: by the Pallas GPU kernel that writes nothing but the scores (``interpret`` runs it on
    CPU)."""
    if gpu_kernel:
        return kernels.low_resolution_scores(query_sum, key_sum, None if count is None else count[:, 0], scale=scale,
                                             eps=EPS, penalty=PAD_PENALTY, interpret=interpret)
    return low_resolution(query_sum, key_sum, None, count, scale).scores
