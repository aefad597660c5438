"""Differentiable block-sparse attention returning ``(o, lse)`` in the callers' layout: the Pallas kernels of a GPU
or a TPU, or a pure-jnp reference, behind one function.

Contract (every backend): ``q``, ``k``, ``v`` are ``[B, S, H, d]`` (``jax.nn.dot_product_attention``'s layout) with
``S`` a multiple of ``BLOCK = 32`` (``n = S // 32`` blocks); ``layout`` is the :class:`BlockLayout` of the selection,
one row per ``bh = b * H + h``; ``key_mask`` is ``[B, S]`` (nonzero = token, 0 = padding) or ``None`` (no padding).
Each query token gets softmax attention over the valid keys of its row's selected blocks, with logits
``dot(q, k) * sm_scale``:

* ``o`` ``[B, S, H, d]`` (q.dtype), normalised; 0 for a query that sees no valid key;
* ``lse`` ``[B, S, H]`` float32, the log-sum-exp of its logits; ``-inf`` for a query that sees no valid key.

Both outputs are differentiable w.r.t. q, k, v; ``layout`` and ``key_mask`` get no gradient.  The kernels read and
write this layout directly through their block specs (the TPU wrapper transposes, see :mod:`pallas_kernels.tpu`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import gpu, tpu
from .layout import BLOCK, BlockLayout

__all__ = ["BACKENDS", "block_sparse_attention"]

BACKENDS = ("gpu", "tpu", "reference")
_KERNELS = {"gpu": gpu, "tpu": tpu}


def _validate(q, k, v, layout: BlockLayout, key_mask) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share the shape [B, S, H, d]; got {q.shape}, {k.shape}, {v.shape}")
    b, s, h, _ = q.shape
    if s % BLOCK:
        raise ValueError(f"sequence length {s} must be a multiple of {BLOCK}")
    if key_mask is not None and key_mask.shape != (b, s):
        raise ValueError(f"key_mask must be [B, S] = {(b, s)}, got {key_mask.shape}")
    n = s // BLOCK
    if layout.row_start.shape != (b * h, n) or layout.col_start.shape != (b * h, n):
        raise ValueError(f"layout must have rows [B*H, n] = {(b * h, n)}, got {layout.row_start.shape}")
    if layout.row_cols.shape[-1] > n * n:
        raise ValueError(f"K={layout.row_cols.shape[-1]} exceeds the n*n={n * n} block pairs")


def block_sparse_attention(q, k, v, layout: BlockLayout, key_mask=None, *, sm_scale: float, backend: str = "gpu",
                           interpret=False):
    """Block-sparse attention; returns ``(o, lse)`` (see the module docstring).

    ``backend``: ``"gpu"`` (Pallas Triton kernels), ``"tpu"`` (Pallas Mosaic kernels) or ``"reference"`` (jnp
    gathers, differentiated by JAX).  ``interpret`` is passed to ``pl.pallas_call``: ``True`` runs the kernels on CPU;
    for ``"tpu"`` a ``pltpu.InterpretParams(...)`` selects the TPU interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _validate(q, k, v, layout, key_mask)
    layout = jax.tree.map(lax.stop_gradient, layout)
    key_mask = None if key_mask is None else (lax.stop_gradient(key_mask) != 0).astype(jnp.int32)
    if backend == "reference":
        return _reference(q, k, v, layout, key_mask, float(sm_scale))
    return _kernel_attention(q, k, v, layout, key_mask, float(sm_scale), backend, interpret)


# ----------------------------------------------------------------------------------------------------------------------
# Pallas kernels: one custom VJP for both families


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _kernel_attention(q, k, v, layout, key_mask, sm_scale, backend, interpret):
    return _KERNELS[backend].attention_forward(q, k, v, layout, key_mask, sm_scale=sm_scale, interpret=interpret)


def _kernel_attention_fwd(q, k, v, layout, key_mask, sm_scale, backend, interpret):
    o, lse = _kernel_attention(q, k, v, layout, key_mask, sm_scale, backend, interpret)
    return (o, lse), (q, k, v, layout, key_mask, o, lse)


def _kernel_attention_bwd(sm_scale, backend, interpret, res, cts):
    """FlashAttention-2's backward: ``delta = rowsum(o * do) - dlse``, then dQ over the row view and dK/dV over the
    column view (no atomics)."""
    q, k, v, layout, key_mask, o, lse = res
    do, dlse = cts
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.astype(jnp.float32)
    args = (q, k, v, layout, key_mask, lse, do.astype(q.dtype), delta)
    kernels = _KERNELS[backend]
    dq = kernels.attention_dq(*args, sm_scale=sm_scale, interpret=interpret)
    dk, dv = kernels.attention_dkv(*args, sm_scale=sm_scale, interpret=interpret)
    return dq, dk, dv, None, None


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Pure-jnp reference (gather over the selected blocks)


def _reference(q, k, v, layout: BlockLayout, key_mask, sm_scale: float):
    """Gathers the K selected 32x32 blocks per row (memory O(BH·K·32·(32 + d))), computes in float32
    (``Precision.HIGHEST``) and merges the blocks of a query row with scatter max/add."""
    b, s, h, d = q.shape
    n = s // BLOCK
    kk = layout.row_cols.shape[-1]
    f32 = jnp.float32
    rows = jax.vmap(lambda c: jnp.repeat(jnp.arange(n, dtype=jnp.int32), c, total_repeat_length=kk))(layout.row_count)
    cols = layout.row_cols  # [BH, K]

    def blocks(x):  # [B, S, H, d] -> [BH, n, 32, d]
        return x.astype(f32).reshape(b, n, BLOCK, h, d).transpose(0, 3, 1, 2, 4).reshape(b * h, n, BLOCK, d)

    qg = jnp.take_along_axis(blocks(q), rows[:, :, None, None], axis=1)  # [BH, K, 32, d]
    kg = jnp.take_along_axis(blocks(k), cols[:, :, None, None], axis=1)
    vg = jnp.take_along_axis(blocks(v), cols[:, :, None, None], axis=1)
    hi = lax.Precision.HIGHEST
    logits = jnp.einsum("bkqd,bkcd->bkqc", qg, kg, precision=hi) * sm_scale
    if key_mask is not None:
        valid = jnp.repeat(key_mask != 0, h, axis=0).reshape(b * h, n, BLOCK)
        logits = jnp.where(jnp.take_along_axis(valid, cols[:, :, None], axis=1)[:, :, None, :], logits, -jnp.inf)

    b_ids = jnp.broadcast_to(jnp.arange(b * h)[:, None], rows.shape)
    m = jnp.full((b * h, n, BLOCK), -jnp.inf, f32).at[b_ids, rows].max(jnp.max(logits, axis=-1))
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(logits - m[b_ids, rows][..., None])  # [BH, K, 32, 32]
    denom = jnp.zeros((b * h, n, BLOCK), f32).at[b_ids, rows].add(jnp.sum(p, axis=-1))
    acc = jnp.zeros((b * h, n, BLOCK, d), f32).at[b_ids, rows].add(jnp.einsum("bkqc,bkcd->bkqd", p, vg, precision=hi))
    pos = denom > 0
    denom_safe = jnp.where(pos, denom, 1.0)
    o = jnp.where(pos[..., None], acc / denom_safe[..., None], 0.0)
    lse = jnp.where(pos, m + jnp.log(denom_safe), -jnp.inf)
    o = o.reshape(b, h, s, d).transpose(0, 2, 1, 3).astype(q.dtype)
    return o, lse.reshape(b, h, s).transpose(0, 2, 1)
