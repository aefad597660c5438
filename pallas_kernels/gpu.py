"""Block-sparse attention kernels for GPUs (Pallas, Triton backend).

Tokens are grouped in blocks of ``BLOCK = 32``.  Three kernels, none using atomics:

* ``attention_forward``: grid ``(n, BH)``; program ``(i, bh)`` loops over the key blocks of query block ``i``
  (row view of the :class:`~pallas_kernels.layout.BlockLayout`) with an online softmax in float32 and writes the
  normalised output ``o`` and ``lse = m + log(l)`` (``-inf`` and ``o = 0`` for rows that see no valid key).
* ``attention_dq``: same grid and loop, recomputing ``p = exp(s - lse)``; FlashAttention-2 ``ds = p * (dp - delta)``.
* ``attention_dkv``: grid ``(n, BH)`` over key blocks, looping over the column view.

Logits are ``dot(q, k) / scale``.  ``key_mask`` [B, S] (nonzero = token) is shared by the ``num_heads`` heads of a
batch item (``bh = b * num_heads + h``); padded keys get probability exactly 0.  K/V (and Q/dO in the dK/dV pass) are
passed as whole-sequence blocks of the current ``bh`` and sliced in the kernel, so only 32-row tiles are ever loaded
(Triton's power-of-two rule then only concerns ``32 x d``; ``d`` is padded to a power of two ≥ 16 in the wrappers).

The kernel bodies only use ref indexing and ``jnp``/``lax`` ops, so they also run with ``interpret=True`` on CPU.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .layout import BlockLayout

__all__ = ["BLOCK", "attention_backward", "attention_dkv", "attention_dq", "attention_forward"]

BLOCK = 32
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _precision(dtype) -> lax.Precision | None:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, contract: tuple[int, int], precision):
    """2-D ``dot_general`` with float32 accumulation; ``contract`` gives the contracted dim of a and of b."""
    return lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _padded_dim(d: int) -> int:
    p = 16
    while p < d:
        p *= 2
    return p


def _pad_last(x: jax.Array, d_pad: int) -> jax.Array:
    d = x.shape[-1]
    if d == d_pad:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)])


def _compiler_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _call(kernel, **kwargs):
    """``pl.pallas_call`` with the Triton-backend deprecation warning (jax ≥ 0.11) silenced locally."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")
        return pl.pallas_call(kernel, **kwargs)


def _check(q, k, v, key_mask, layout: BlockLayout, num_heads: int) -> tuple[int, int, int, int]:
    bh, s, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share the shape [BH, S, d]; got {q.shape}, {k.shape}, {v.shape}")
    if s % BLOCK:
        raise ValueError(f"sequence length {s} must be a multiple of {BLOCK}")
    n = s // BLOCK
    if bh % num_heads:
        raise ValueError(f"BH={bh} is not a multiple of num_heads={num_heads}")
    if key_mask.shape != (bh // num_heads, s):
        raise ValueError(f"key_mask must be [B, S] = {(bh // num_heads, s)}, got {key_mask.shape}")
    if layout.row_start.shape != (bh, n) or layout.col_start.shape != (bh, n):
        raise ValueError(f"layout does not match BH={bh}, n={n}: row_start {layout.row_start.shape}")
    kk = layout.row_cols.shape[-1]
    return bh, s, d, kk


def _mask_i32(key_mask: jax.Array) -> jax.Array:
    return (lax.stop_gradient(key_mask) != 0).astype(jnp.int32)


def _key_block_logits(q, k_ref, v_ref, mask_ref, j, scale, precision):
    """Key block ``j`` of the current bh: its keys, values and the logits of ``q`` against it (-inf at padding)."""
    off = pl.multiple_of(j * BLOCK, BLOCK)
    k = k_ref[pl.ds(off, BLOCK), :]
    v = v_ref[pl.ds(off, BLOCK), :]
    valid = mask_ref[pl.ds(off, BLOCK)] != 0
    s = _dot(q, k, (1, 1), precision) / scale
    return k, v, jnp.where(valid[None, :], s, _NEG_INF)


def _row_view_specs(n: int, kk: int, s: int, dp: int, h: int) -> list[pl.BlockSpec]:
    """Inputs of a program (i, bh) over query blocks: its row lists, its 32 queries, the whole K and V of bh, and
    the key mask of batch item bh // h."""
    return [
            pl.BlockSpec((None, n), lambda i, b: (b, 0)),
            pl.BlockSpec((None, n), lambda i, b: (b, 0)),
            pl.BlockSpec((None, kk), lambda i, b: (b, 0)),
            pl.BlockSpec((None, BLOCK, dp), lambda i, b: (b, i, 0)),
            pl.BlockSpec((None, s, dp), lambda i, b: (b, 0, 0)),
            pl.BlockSpec((None, s, dp), lambda i, b: (b, 0, 0)),
            pl.BlockSpec((None, s), lambda i, b: (b // h, 0)),
    ]


def _default_warps(d_pad: int) -> int:
    return 2 if d_pad <= 64 else 4


# ----------------------------------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(start_ref, count_ref, cols_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, scale, precision):
    i = pl.program_id(0)
    start = start_ref[i]
    count = count_ref[i]
    q = q_ref[...]
    d = q.shape[-1]

    def body(t, carry):
        acc, m, denom = carry
        j = cols_ref[start + t]
        _, v, s = _key_block_logits(q, k_ref, v_ref, mask_ref, j, scale, precision)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0), precision)
        return acc, m_new, denom

    init = (
        jnp.zeros((BLOCK, d), jnp.float32),
        jnp.full((BLOCK,), _NEG_INF, jnp.float32),
        jnp.zeros((BLOCK,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, count, body, init)
    pos = denom > 0.0
    denom_safe = jnp.where(pos, denom, 1.0)
    o_ref[...] = jnp.where(pos[:, None], acc / denom_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(pos, m + jnp.log(denom_safe), _NEG_INF)


def attention_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    layout: BlockLayout,
    *,
    scale: float,
    num_heads: int,
    interpret=False,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward: returns ``o`` [BH, S, d] (q.dtype) and ``lse`` [BH, S] float32."""
    bh, s, d, kk = _check(q, k, v, key_mask, layout, num_heads)
    n = s // BLOCK
    dp = _padded_dim(d)
    qp, kp, vp = (_pad_last(x, dp) for x in (q, k, v))
    mask = _mask_i32(key_mask)
    h = num_heads
    kernel = functools.partial(_fwd_kernel, scale=float(scale), precision=_precision(q.dtype))
    o, lse = _call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((bh, s, dp), q.dtype), jax.ShapeDtypeStruct((bh, s), jnp.float32)),
        grid=(n, bh),
        in_specs=_row_view_specs(n, kk, s, dp, h),
        out_specs=(
            pl.BlockSpec((None, BLOCK, dp), lambda i, b: (b, i, 0)),
            pl.BlockSpec((None, BLOCK), lambda i, b: (b, i)),
        ),
        compiler_params=_compiler_params(num_warps or _default_warps(dp), num_stages),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(layout.row_start, layout.row_count, layout.row_cols, qp, kp, vp, mask)
    return o[..., :d], lse


# ----------------------------------------------------------------------------------------------------------------------
# backward


def _dq_kernel(
    start_ref, count_ref, cols_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
    precision,
):
    i = pl.program_id(0)
    start = start_ref[i]
    count = count_ref[i]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(lse == _NEG_INF, 0.0, lse)  # such rows have no valid key: every p below is exp(-inf) = 0
    delta = delta_ref[...]

    def body(t, dq):
        j = cols_ref[start + t]
        k, v, s = _key_block_logits(q, k_ref, v_ref, mask_ref, j, scale, precision)
        p = jnp.exp(s - lse[:, None])
        dp = _dot(do, v, (1, 1), precision)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0), precision)

    dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq / scale).astype(dq_ref.dtype)


def _dkv_kernel(
    start_ref,
    count_ref,
    rows_ref,
    q_ref,
    k_ref,
    v_ref,
    mask_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    precision,
):
    c = pl.program_id(0)
    start = start_ref[c]
    count = count_ref[c]
    k = k_ref[...]
    v = v_ref[...]
    valid = mask_ref[...] != 0

    def body(t, carry):
        dk, dv = carry
        r = rows_ref[start + t]
        off = pl.multiple_of(r * BLOCK, BLOCK)
        q = q_ref[pl.ds(off, BLOCK), :]
        do = do_ref[pl.ds(off, BLOCK), :]
        lse = lse_ref[pl.ds(off, BLOCK)]
        lse = jnp.where(lse == _NEG_INF, 0.0, lse)
        delta = delta_ref[pl.ds(off, BLOCK)]
        s = _dot(q, k, (1, 1), precision) / scale
        s = jnp.where(valid[None, :], s, _NEG_INF)
        p = jnp.exp(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0), precision)
        dp = _dot(do, v, (1, 1), precision)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0), precision)
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, count, body, init)
    dk_ref[...] = (dk / scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def attention_dq(
    q, k, v, key_mask, layout: BlockLayout, lse, do, delta, *, scale, num_heads, interpret=False, num_warps=None,
    num_stages=2,
) -> jax.Array:
    """dQ [BH, S, d]; ``delta = rowsum(o * do) - dlse`` [BH, S] float32, ``lse`` from the forward."""
    bh, s, d, kk = _check(q, k, v, key_mask, layout, num_heads)
    n = s // BLOCK
    dp = _padded_dim(d)
    qp, kp, vp, dop = (_pad_last(x, dp) for x in (q, k, v, do.astype(q.dtype)))
    h = num_heads
    kernel = functools.partial(_dq_kernel, scale=float(scale), precision=_precision(q.dtype))
    dq = _call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bh, s, dp), q.dtype),
        grid=(n, bh),
        in_specs=[
            *_row_view_specs(n, kk, s, dp, h),
            pl.BlockSpec((None, BLOCK, dp), lambda i, b: (b, i, 0)),
            pl.BlockSpec((None, BLOCK), lambda i, b: (b, i)),
            pl.BlockSpec((None, BLOCK), lambda i, b: (b, i)),
        ],
        out_specs=pl.BlockSpec((None, BLOCK, dp), lambda i, b: (b, i, 0)),
        compiler_params=_compiler_params(num_warps or _default_warps(dp), num_stages),
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(
        layout.row_start, layout.row_count, layout.row_cols, qp, kp, vp, _mask_i32(key_mask), dop,
        lse.astype(jnp.float32), delta.astype(jnp.float32),
    )
    return dq[..., :d]


def attention_dkv(
    q, k, v, key_mask, layout: BlockLayout, lse, do, delta, *, scale, num_heads, interpret=False, num_warps=None,
    num_stages=2,
) -> tuple[jax.Array, jax.Array]:
    """(dK, dV) [BH, S, d] via the column view; key blocks nobody selected get zeros."""
    bh, s, d, kk = _check(q, k, v, key_mask, layout, num_heads)
    n = s // BLOCK
    dp = _padded_dim(d)
    qp, kp, vp, dop = (_pad_last(x, dp) for x in (q, k, v, do.astype(q.dtype)))
    h = num_heads
    kernel = functools.partial(_dkv_kernel, scale=float(scale), precision=_precision(q.dtype))
    dk, dv = _call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((bh, s, dp), k.dtype), jax.ShapeDtypeStruct((bh, s, dp), v.dtype)),
        grid=(n, bh),
        in_specs=[
            pl.BlockSpec((None, n), lambda c, b: (b, 0)),
            pl.BlockSpec((None, n), lambda c, b: (b, 0)),
            pl.BlockSpec((None, kk), lambda c, b: (b, 0)),
            pl.BlockSpec((None, s, dp), lambda c, b: (b, 0, 0)),
            pl.BlockSpec((None, BLOCK, dp), lambda c, b: (b, c, 0)),
            pl.BlockSpec((None, BLOCK, dp), lambda c, b: (b, c, 0)),
            pl.BlockSpec((None, BLOCK), lambda c, b: (b // h, c)),
            pl.BlockSpec((None, s, dp), lambda c, b: (b, 0, 0)),
            pl.BlockSpec((None, s), lambda c, b: (b, 0)),
            pl.BlockSpec((None, s), lambda c, b: (b, 0)),
        ],
        out_specs=(
            pl.BlockSpec((None, BLOCK, dp), lambda c, b: (b, c, 0)),
            pl.BlockSpec((None, BLOCK, dp), lambda c, b: (b, c, 0)),
        ),
        compiler_params=_compiler_params(num_warps or 4, num_stages),
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(
        layout.col_start, layout.col_count, layout.col_rows, qp, kp, vp, _mask_i32(key_mask), dop,
        lse.astype(jnp.float32), delta.astype(jnp.float32),
    )
    return dk[..., :d], dv[..., :d]


def attention_backward(
    q, k, v, key_mask, layout: BlockLayout, o, lse, do, dlse=None, *, scale, num_heads, interpret=False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dQ, dK, dV) for cotangents ``do`` of ``o`` and ``dlse`` of ``lse`` (``None`` = zero)."""
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    kw = dict(scale=scale, num_heads=num_heads, interpret=interpret)
    dq = attention_dq(q, k, v, key_mask, layout, lse, do, delta, **kw)
    dk, dv = attention_dkv(q, k, v, key_mask, layout, lse, do, delta, **kw)
    return dq, dk, dv
