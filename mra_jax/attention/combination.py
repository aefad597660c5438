"""Stage 4: merge the high- and low-resolution parts into the attention output."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mra_jax.attention.high_resolution import HighResolution
from mra_jax.attention.low_resolution import EPS, PAD_PENALTY, LowResolution
from mra_jax.configuration import BLOCK_SIZE


def combine(high: HighResolution, low: LowResolution | None, selected: jax.Array | None,
            mask: jax.Array) -> jax.Array:
    """Normalised attention output ``[.., S, d]`` (float32), zero at padded queries.

    "sparse" mode passes ``low=None``: ``out = O_hi / (Z_hi + 1e-6)``. "full" mode adds the low-resolution
    attention over the pairs outside ``selected`` (``[.., n, n]`` 0/1), both parts re-referenced to a common
    max with HF's correction terms (kept literally so that gradients at ``delta = 0`` match torch's).
    """
    out_hi, norm_hi = high.out, high.normalizer
    if low is not None:
        row_max = low.row_max[..., 0]                                           # [.., n]
        weights = jnp.exp(low.logits - low.row_max - PAD_PENALTY * selected) * low.token_count[..., None, :]
        out_lo = jnp.matmul(weights, low.value_hat, precision=jax.lax.Precision.HIGHEST)
        out_lo = jnp.repeat(out_lo, BLOCK_SIZE, axis=-2)                       # [.., S, d]
        norm_lo = jnp.repeat(weights.sum(axis=-1), BLOCK_SIZE, axis=-1)       # [.., S]
        delta = (jnp.repeat(row_max, BLOCK_SIZE, axis=-1) - high.row_max) * mask
        low_corr = jnp.exp(delta * (delta <= 0))
        high_corr = jnp.exp(-delta * (delta > 0))
        out_hi = high_corr[..., None] * out_hi + low_corr[..., None] * out_lo
        norm_hi = high_corr * norm_hi + low_corr * norm_lo
    return out_hi / (norm_hi[..., None] + EPS) * mask[..., None]
