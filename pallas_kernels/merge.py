"""MRA's merge of the block-sparse attention (per token: normalised ``o``, log-sum-exp ``lse``) with a low-resolution
part given per query block, written once for the GPU kernel's epilogue, the TPU path and the reference.

The low-resolution part of query block ``i`` is ``(u, z, rm)``: ``u`` [d] the weighted sum of the block-mean values
and ``z`` its normaliser, both in units of ``e^rm`` (``rm`` = the row max of the block logits).  Both parts are
referred to ``M = max(lse, rm)``, with ``a = e^(lse - M)``, ``c = e^(rm - M)``:

    out = (a·o + c·u) / (a + c·z + eps)

(HF's ``(O_hi + O_lo) / (Z_hi + Z_lo + 1e-6)`` with another reference max, which moves only where ``eps`` lands).
Without a low-resolution part ("sparse" mode) ``out = o / (1 + eps)``.  Everything broadcasts, so the same code
merges one ``[32, d]`` tile in a kernel or a whole ``[B, n, 32, H, d]`` array.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["merge", "merge_weights"]


def merge_weights(lse, z, rm, eps: float, *, traced_by_autodiff: bool = False):
    """The per-token weights ``(a / D, c / D)`` of ``o`` and ``u``, ``D = a + c·z + eps`` (``a = 0`` for a query that
    sees no key, ``lse = -inf``).  ``traced_by_autodiff`` makes ``M`` a constant for autodiff (as the kernels'
    hand-written backward treats it; Pallas kernels have no ``stop_gradient``)."""
    m = jnp.maximum(lse, rm)
    if traced_by_autodiff:
        m = lax.stop_gradient(m)
    a, c = jnp.exp(lse - m), jnp.exp(rm - m)
    inv = 1.0 / (a + c * z + eps)
    return a * inv, c * inv


def merge(o, lse, low, eps: float, *, traced_by_autodiff: bool = False):
    """``out`` from ``o`` [..., d], ``lse`` [...] and ``low = (u [..., d], z [...], rm [...])`` (broadcastable), or
    ``low = None`` for ``o / (1 + eps)``; float32."""
    o = o.astype(jnp.float32)
    if low is None:
        return o / (1.0 + eps)
    u, z, rm = low
    ar, cr = merge_weights(lse, z, rm, eps, traced_by_autodiff=traced_by_autodiff)
    return ar[..., None] * o + cr[..., None] * u
