"""Stage 4: merge the high- and low-resolution parts into the attention output."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mra_jax.attention.low_resolution import EPS, PAD_PENALTY, LowResolution
from mra_jax.configuration import BLOCK_SIZE


def _per_block(x: jax.Array) -> jax.Array:
    """``[B, H, n, ...]`` block quantities -> ``[B, n, 1, H, ...]``, broadcastable against ``[B, n, 32, H, ...]``."""
    return jnp.moveaxis(x, 1, 2)[:, :, None]


def combine(o: jax.Array, lse: jax.Array, low: LowResolution | None, selected: jax.Array | None,
            mask: jax.Array | None) -> jax.Array:
    """Attention output ``[B, S, H, d]`` (float32), zero at padded queries, from the high-resolution part in
    log-sum-exp form (``o`` ``[B, S, H, d]`` normalised, ``lse`` ``[B, S, H]``, ``-inf`` where a query saw nothing).

    "sparse" mode passes ``low=None``: ``out = o / (1 + 1e-6)`` (HF's ``O_hi / (Z_hi + 1e-6)`` with the high part as
    its own reference). "full" mode adds the low-resolution attention over the pairs outside ``selected`` (``[B, H,
    n, n]`` 0/1): both parts are referred to ``M = max(lse, row_max_lo)`` (a constant for autodiff) and
    ``out = (e^(lse-M) o + e^(rm-M) O_lo) / (e^(lse-M) + e^(rm-M) Z_lo + 1e-6)`` — HF's formula with another reference
    max, which changes only where the ``1e-6`` lands (~1e-6 relative). Block quantities broadcast over their 32 tokens
    inside one fusion (no repeated ``[S, d]`` arrays).
    """
    b, s, h, d = o.shape
    n = s // BLOCK_SIZE
    o = o.astype(jnp.float32).reshape(b, n, BLOCK_SIZE, h, d)
    if low is None:
        out = o / (1.0 + EPS)
    else:
        row_max = low.row_max[..., 0]                                                       # [B, H, n]
        weights = jnp.exp(low.logits - low.row_max - PAD_PENALTY * selected) * low.token_count[..., None, :]
        # One pass over the n x n weights: their row sums come out of the same matmul, as a column of ones.
        ones = jnp.ones((*low.value_hat.shape[:-1], 1), low.value_hat.dtype)
        sums = jnp.matmul(weights, jnp.concatenate([low.value_hat, ones], axis=-1),
                          precision=jax.lax.Precision.HIGHEST)
        out_lo, norm_lo, row_max = _per_block(sums[..., :d]), _per_block(sums[..., d]), _per_block(row_max)
        lse = lse.reshape(b, n, BLOCK_SIZE, h)
        ref = jax.lax.stop_gradient(jnp.maximum(lse, row_max))
        w_hi, w_lo = jnp.exp(lse - ref), jnp.exp(row_max - ref)
        out = (w_hi[..., None] * o + w_lo[..., None] * out_lo) / (w_hi + w_lo * norm_lo + EPS)[..., None]
    if mask is not None:
        out = jnp.where(mask.reshape(b, n, BLOCK_SIZE, 1, 1) > 0, out, 0.0)
    return out.reshape(b, s, h, d)
