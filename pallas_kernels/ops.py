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
                           interpret=False, block_sums=None):
    """Block-sparse attention; returns ``(o, lse)`` (see the module docstring), or ``(o, lse, block_sums)``.

    ``backend``: ``"gpu"`` (Pallas Triton kernels), ``"tpu"`` (Pallas Mosaic kernels) or ``"reference"`` (jnp
    gathers, differentiated by JAX).  ``interpret`` is passed to ``pl.pallas_call``: ``True`` runs the kernels on CPU;
    for ``"tpu"`` a ``pltpu.InterpretParams(...)`` selects the TPU interpreter.

    ``block_sums`` (optional): ``(q_sum, k_sum, v_sum)`` [B, n, H, d] float32, the sums of ``q``, ``k``, ``v`` over
    the unpadded tokens of each block (MRA's block means before the division), computed by the caller.  They are
    returned as they are; use the returned ones downstream and their cotangents reach ``q``, ``k``, ``v`` through the
    kernels' epilogues (each unpadded token of a block gets its block's cotangent) instead of separate passes over the
    ``[B, S, H, d]`` gradients.  Values and gradients equal passing the sums around the function.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _validate(q, k, v, layout, key_mask)
    if block_sums is not None:
        b, s, h, d = q.shape
        shapes = [tuple(x.shape) for x in block_sums]
        if len(shapes) != 3 or any(x != (b, s // BLOCK, h, d) for x in shapes):
            raise ValueError(f"block_sums must be three [B, n, H, d] = {(b, s // BLOCK, h, d)} arrays, got {shapes}")
    layout = jax.tree.map(lax.stop_gradient, layout)
    key_mask = None if key_mask is None else (lax.stop_gradient(key_mask) != 0).astype(jnp.int32)
    if backend == "reference":
        out = _reference(q, k, v, layout, key_mask, float(sm_scale))
        return out if block_sums is None else (*out, tuple(block_sums))
    sums = None if block_sums is None else tuple(x.astype(jnp.float32) for x in block_sums)
    out = _kernel_attention(q, k, v, layout, key_mask, sums, float(sm_scale), backend, interpret)
    return out[:2] if block_sums is None else out


# ----------------------------------------------------------------------------------------------------------------------
# Pallas kernels: one custom VJP for both families


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _kernel_attention(q, k, v, layout, key_mask, sums, sm_scale, backend, interpret):
    o, lse = _KERNELS[backend].attention_forward(q, k, v, layout, key_mask, sm_scale=sm_scale, interpret=interpret)
    return o, lse, sums


def _kernel_attention_fwd(q, k, v, layout, key_mask, sums, sm_scale, backend, interpret):
    out = _kernel_attention(q, k, v, layout, key_mask, sums, sm_scale, backend, interpret)
    return out, (q, k, v, layout, key_mask, out[0], out[1])


def _token_grads(block_grad, key_mask, s: int):
    """[B, n, H, d] block cotangents -> [B, S, H, d]: each unpadded token gets its block's."""
    b, n, h, d = block_grad.shape
    grad = jnp.broadcast_to(block_grad[:, :, None], (b, n, BLOCK, h, d)).reshape(b, s, h, d)
    return grad if key_mask is None else jnp.where(key_mask[:, :, None, None] != 0, grad, 0.0)


def _kernel_attention_bwd(sm_scale, backend, interpret, res, cts):
    """FlashAttention-2's backward: ``delta = rowsum(o * do) - dlse``, then dQ over the row view and dK/dV over the
    column view (no atomics); block-sum cotangents are added in the GPU kernels' epilogues (on TPU, after them)."""
    q, k, v, layout, key_mask, o, lse = res
    do, dlse, dsums = cts
    summed = dsums is not None
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1) - dlse.astype(jnp.float32)
    args = (q, k, v, layout, key_mask, lse, do.astype(q.dtype), delta)
    kw = dict(sm_scale=sm_scale, interpret=interpret)
    if backend == "gpu" and summed:
        dq = gpu.attention_dq(*args, **kw, block_grad=dsums[0])
        dk, dv = gpu.attention_dkv(*args, **kw, block_grads=dsums[1:])
    else:
        kernels = _KERNELS[backend]
        dq = kernels.attention_dq(*args, **kw)
        dk, dv = kernels.attention_dkv(*args, **kw)
        if summed:
            dq, dk, dv = (g + _token_grads(c, key_mask, q.shape[1]).astype(g.dtype)
                          for g, c in zip((dq, dk, dv), dsums, strict=True))
    return dq, dk, dv, None, None, None  # the sums' cotangents are in dq, dk, dv (None: symbolic zeros, no work)


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
