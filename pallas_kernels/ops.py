"""Differentiable block-sparse attention returning ``(o, lse)``, plus a pure-jnp reference with the same contract.

Contract (both functions): ``q``, ``k``, ``v`` are [BH, S, d] with ``S`` a multiple of 32 (``n = S // 32`` blocks);
``key_mask`` [B, S] (nonzero = token, 0 = padding) is shared by the ``num_heads`` heads of a batch item
(``bh = b * num_heads + h``); ``indices`` [BH, K] int holds, per row, K distinct flat block pairs ``i * n + j``
(query block ``i`` attends to key block ``j``).  Each query token gets softmax attention over the valid keys of its
row's selected blocks with logits ``dot(q, k) / scale``:

* ``o`` [BH, S, d] (q.dtype), normalised; 0 for a query that sees no valid key;
* ``lse`` [BH, S] float32 = log-sum-exp of its logits; ``-inf`` for a query that sees no valid key.

Both outputs are differentiable w.r.t. q, k, v; ``key_mask`` and ``indices`` get no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import gpu, tpu
from .layout import build_block_layout

__all__ = ["BLOCK", "block_sparse_attention", "block_sparse_attention_reference"]

BLOCK = gpu.BLOCK
if tpu.BLOCK != BLOCK:  # pragma: no cover
    raise ImportError("pallas_kernels.gpu and pallas_kernels.tpu disagree on BLOCK")

_BACKENDS = {"gpu": gpu, "tpu": tpu}


def _validate(q, k, v, key_mask, indices, num_heads: int) -> tuple[int, int, int, int, int]:
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share the shape [BH, S, d]; got {q.shape}, {k.shape}, {v.shape}")
    bh, s, d = q.shape
    if s % BLOCK:
        raise ValueError(f"sequence length {s} must be a multiple of {BLOCK}")
    if num_heads <= 0 or bh % num_heads:
        raise ValueError(f"BH={bh} is not a multiple of num_heads={num_heads}")
    b = bh // num_heads
    if key_mask.shape != (b, s):
        raise ValueError(f"key_mask must be [B, S] = {(b, s)}, got {key_mask.shape}")
    if indices.ndim != 2 or indices.shape[0] != bh:
        raise ValueError(f"indices must be [BH, K] with BH={bh}, got {indices.shape}")
    n = s // BLOCK
    if indices.shape[1] > n * n:
        raise ValueError(f"K={indices.shape[1]} exceeds the n*n={n * n} block pairs")
    return bh, s, d, n, indices.shape[1]


# ----------------------------------------------------------------------------------------------------------------------
# Pallas path


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _bsa(q, k, v, key_mask, indices, scale, num_heads, interpret, backend):
    out, _ = _bsa_fwd(q, k, v, key_mask, indices, scale, num_heads, interpret, backend)
    return out


def _bsa_fwd(q, k, v, key_mask, indices, scale, num_heads, interpret, backend):
    layout = build_block_layout(indices, q.shape[1] // BLOCK)
    o, lse = _BACKENDS[backend].attention_forward(
        q, k, v, key_mask, layout, scale=scale, num_heads=num_heads, interpret=interpret
    )
    return (o, lse), (q, k, v, key_mask, layout, o, lse)


def _bsa_bwd(scale, num_heads, interpret, backend, res, cts):
    q, k, v, key_mask, layout, o, lse = res
    do, dlse = cts
    dq, dk, dv = _BACKENDS[backend].attention_backward(
        q, k, v, key_mask, layout, o, lse, do, dlse, scale=scale, num_heads=num_heads, interpret=interpret
    )
    return dq, dk, dv, None, None


_bsa.defvjp(_bsa_fwd, _bsa_bwd)


def block_sparse_attention(
    q, k, v, key_mask, indices, *, scale: float, num_heads: int, interpret=False, backend: str = "gpu"
):
    """Block-sparse attention with the Pallas kernels; returns ``(o, lse)`` (see module docstring).

    ``scale`` is a Python float (logits are divided by it).  ``backend`` picks the kernels: ``"gpu"`` (Triton,
    :mod:`pallas_kernels.gpu`) or ``"tpu"`` (Mosaic, :mod:`pallas_kernels.tpu`); forward and backward use the same
    backend.  ``interpret`` is passed to ``pl.pallas_call``: ``True`` runs the kernels on CPU, and for ``"tpu"`` a
    ``pltpu.InterpretParams(...)`` selects the TPU interpreter.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    _validate(q, k, v, key_mask, indices, num_heads)
    return _bsa(q, k, v, key_mask, lax.stop_gradient(indices), float(scale), int(num_heads), interpret, backend)


# ----------------------------------------------------------------------------------------------------------------------
# Pure-jnp reference (gather over the selected blocks)


def block_sparse_attention_reference(q, k, v, key_mask, indices, *, scale: float, num_heads: int, interpret=False):
    """Pure-jnp oracle with the same signature and semantics as :func:`block_sparse_attention`.

    Gathers the K selected 32x32 blocks per row (memory O(BH·K·32·(32 + d))), computes in float32
    (``Precision.HIGHEST``) and merges the blocks of a query row with scatter max/add.  ``interpret`` is ignored.
    Differentiable with plain JAX autodiff.
    """
    del interpret
    bh, s, d, n, _ = _validate(q, k, v, key_mask, indices, num_heads)
    idx = lax.stop_gradient(indices).astype(jnp.int32)
    rows, cols = idx // n, idx % n  # [BH, K]
    f32 = jnp.float32

    def blocks(x):
        return x.astype(f32).reshape(bh, n, BLOCK, d)

    qg = jnp.take_along_axis(blocks(q), rows[:, :, None, None], axis=1)  # [BH, K, 32, d]
    kg = jnp.take_along_axis(blocks(k), cols[:, :, None, None], axis=1)
    vg = jnp.take_along_axis(blocks(v), cols[:, :, None, None], axis=1)
    valid = jnp.repeat(lax.stop_gradient(key_mask) != 0, num_heads, axis=0).reshape(bh, n, BLOCK)
    vmask = jnp.take_along_axis(valid, cols[:, :, None], axis=1)  # [BH, K, 32]

    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("bkqd,bkcd->bkqc", qg, kg, precision=hi) / scale
    logits = jnp.where(vmask[:, :, None, :], logits, -jnp.inf)

    b_ids = jnp.broadcast_to(jnp.arange(bh)[:, None], rows.shape)
    m = jnp.full((bh, n, BLOCK), -jnp.inf, f32).at[b_ids, rows].max(jnp.max(logits, axis=-1))
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(logits - m[b_ids, rows][..., None])  # [BH, K, 32, 32]
    denom = jnp.zeros((bh, n, BLOCK), f32).at[b_ids, rows].add(jnp.sum(p, axis=-1))
    acc = jnp.zeros((bh, n, BLOCK, d), f32).at[b_ids, rows].add(jnp.einsum("bkqc,bkcd->bkqd", p, vg, precision=hi))
    pos = denom > 0
    denom_safe = jnp.where(pos, denom, 1.0)
    o = jnp.where(pos[..., None], acc / denom_safe[..., None], 0.0).reshape(bh, s, d).astype(q.dtype)
    lse = jnp.where(pos, m + jnp.log(denom_safe), -jnp.inf).reshape(bh, s)
    return o, lse
