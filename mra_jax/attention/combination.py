"""Stage 4, its low-resolution half: per query block, the low-resolution attention over the pairs outside the
selection, in the form that :func:`pallas_kernels.merged_attention` merges with the high-resolution part (in the GPU
forward kernel's epilogue; see :mod:`pallas_kernels.merge` for the formula)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mra_jax.attention.low_resolution import EPS, PAD_PENALTY, low_resolution
from mra_jax.attention.selection import selected_pair_mask
from pallas_kernels import low_resolution as kernels


def low_resolution_output(sums: tuple[jax.Array, jax.Array, jax.Array], aux: tuple[jax.Array, jax.Array], *,
                          scale: float, gpu_kernel: bool = False,
                          interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(u [B, n, H, d], z [B, n, H], rm [B, n, H])`` float32 from the query/key/value `block_sums`
    ``[B, n, H, d]`` and ``aux = (token_count [B, 1, n] or None for no padding, packed selection bits [B, H,
    ceil(n*n/32)])``.

    With the block logits ``L`` (padding penalty applied) and their row max ``rm`` (before the penalty, HF's order),
    the weights ``e^(L - rm - 1e4·selected) · count_j`` give ``u = Σ_j w_ij v̂_j`` and ``z = Σ_j w_ij``: HF's low-
    resolution output and normaliser in units of ``e^rm`` (pairs inside the selection fall to ``e^-1e4 = 0``).
    One pass over the n x n weights: their row sums come out of the same matmul, as a column of ones.
    ``gpu_kernel``: the same formula as Pallas GPU kernels that never write an n x n array
    (:mod:`pallas_kernels.low_resolution`; ``interpret`` runs them on CPU).
    """
    count, bits = aux
    if gpu_kernel:
        return kernels.low_resolution_output(sums, None if count is None else count[:, 0], bits, scale=scale, eps=EPS,
                                             penalty=PAD_PENALTY, interpret=interpret)
    low = low_resolution(*sums, count, scale)
    count = low.token_count  # [B, 1, n]
    weights = jnp.exp(low.logits - low.row_max - PAD_PENALTY * selected_pair_mask(bits, count.shape[-1]))
    weights = weights * count[..., None, :]
    ones = jnp.ones((*low.value_hat.shape[:-1], 1), low.value_hat.dtype)
    uz = jnp.matmul(weights, jnp.concatenate([low.value_hat, ones], axis=-1), precision=jax.lax.Precision.HIGHEST)
    per_block = lambda x: jnp.moveaxis(x, 1, 2)  # noqa: E731  [B, H, n, ...] -> [B, n, H, ...]
    return per_block(uz[..., :-1]), per_block(uz[..., -1]), per_block(low.row_max[..., 0])
