"""Stage 2: which block pairs get high-resolution attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.selection import auto_method, topk_selection, unpack_bits

PRIOR_BONUS = 5000.0
"""HF's additive bonus for the pairs a prior forces into the selection."""


def add_priors(scores: jax.Array, first_n_blocks: int, diagonal_n_blocks: int) -> jax.Array:
    """Add HF's priors to ``[.., n, n]`` block scores.

    Diagonal prior: +5000 on the band ``|i - j| <= diagonal_n_blocks // 2``. First-n prior: +5000 on the first
    ``first_n_blocks`` query rows and again on the first key columns (their corner gets +10000). The bonuses are
    added one at a time in HF's order, so that float32 rounding (and hence ties in the top-k) is HF's.
    """
    n = scores.shape[-1]
    i = jnp.arange(n)[:, None]
    j = jnp.arange(n)[None, :]
    bands = []
    if diagonal_n_blocks > 0:
        bands.append(jnp.abs(i - j) <= diagonal_n_blocks // 2)
    if first_n_blocks > 0:
        bands += [jnp.broadcast_to(i < first_n_blocks, (n, n)), jnp.broadcast_to(j < first_n_blocks, (n, n))]
    for band in bands:
        scores = scores + PRIOR_BONUS * band.astype(scores.dtype)
    return scores


def select_blocks(scores: jax.Array, num_blocks: int, first_n_blocks: int = 0, diagonal_n_blocks: int = 0, *,
                  gpu_kernel: bool = False, interpret=False) -> tuple[jax.Array, jax.Array]:
    """Global top-``num_blocks`` of the ``n * n`` pairs of ``[.., n, n]`` scores, per leading index.

    Returns int32 flat pair indices ``i * n + j`` (i = query block, j = key block), ``[.., num_blocks]``, in
    ascending order (the row view of the block lists as they are), and the same set as packed bits
    ``[.., ceil(n * n / 32)]`` (see `selected_pair_mask`). Ties keep the lowest flat indices, as HF's CUDA top-k
    does. No gradient. ``gpu_kernel``: select with the Pallas GPU kernels, for rows of any length (see
    `pallas_kernels.selection.auto_method`; ``interpret`` as for the attention kernels).
    """
    n = scores.shape[-1]
    if not 0 < num_blocks <= n * n:
        raise ValueError(f"num_blocks must be in [1, {n * n}] for {n} blocks per row, got {num_blocks}")
    scores = add_priors(jax.lax.stop_gradient(scores), first_n_blocks, diagonal_n_blocks)
    # The same set as lax.top_k (ties included) by radix selection, several times faster at large n * n.
    flat = scores.reshape(*scores.shape[:-2], n * n).astype(jnp.float32)
    return topk_selection(flat, num_blocks, method=auto_method(flat.shape, gpu_kernel=gpu_kernel), interpret=interpret)


def selected_pair_mask(bits: jax.Array, n: int) -> jax.Array:
    """Packed selection bits ``[.., ceil(n * n / 32)]`` -> ``[.., n, n]`` float 0/1 mask of the selected pairs
    (elementwise, so it fuses into the low-resolution weights instead of being scattered into memory).

    The low-resolution part of "full" mode covers exactly the complement of this set. (HF marks every pair
    scoring at least the k-th value, so pairs tied at the threshold but left out by top-k fall out of both
    parts; without ties the two agree.)
    """
    return unpack_bits(bits, n * n).reshape(*bits.shape[:-1], n, n).astype(jnp.float32)
