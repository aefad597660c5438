"""Block-sparse attention kernels for TPUs (Pallas, Mosaic backend).

Same contract and math as :mod:`pallas_kernels.gpu` (tokens in blocks of ``BLOCK = 32``; logits ``dot(q, k) / scale``;
``key_mask`` [B, S] shared by the ``num_heads`` heads of batch item ``b = bh // num_heads``; padded keys get probability
exactly 0; ``o`` normalised in the input dtype, ``lse`` float32, ``o = 0`` / ``lse = -inf`` for a query that sees no
valid key; float32 accumulation, ``Precision.HIGHEST`` for float32 dots).  Three kernels, no atomics:

* ``attention_forward``: grid ``(BH, S_pad // 128)``; a step handles ``ROWS = 128`` query tokens, i.e. four query
  blocks, each with its own ``lax.fori_loop`` over its key blocks (row view) and an online softmax;
* ``attention_dq``: same grid and loops, recomputing ``p = exp(s - lse)`` (FlashAttention-2 ``ds = p * (dp - delta)``);
* ``attention_dkv``: grid ``(BH, S_pad // 128)`` over four key blocks per step, looping over the column view.  Scores
  are computed transposed (keys on sublanes, queries on lanes) so that every matmul is ``A @ B`` or ``A @ B.T``.

TPU layout choices (the ``(8, 128)`` block rule and lane-dense stores):

* the CSR lists of the :class:`~pallas_kernels.layout.BlockLayout` are *scalar-prefetch* operands (SMEM), flattened
  to 1-D (2-D SMEM arrays are padded); the per-step index maps do not depend on them;
* K/V (forward, dQ) and Q/dO (dK/dV) are whole-sequence ``(None, S_pad, d_pad)`` blocks whose index only changes
  with ``bh``: each is DMA'd into VMEM once per ``bh`` and sliced in the kernel with 32-row dynamic slices;
* ``S`` is zero-padded to a multiple of 128 (``S_pad``; padded keys are masked, padded query blocks select nothing)
  and ``d`` to a multiple of 128 (``d_pad``; zero columns change no dot product);
* per-token values that the loops need along *lanes* (the key mask in forward/dQ, ``lse``/``delta`` in dK/dV) are
  passed as ``[.., n_pad, 8, 32]`` "block rows" (sublane-broadcast) and read with a dynamic *leading* index;
  values needed along *sublanes* (``lse``/``delta`` in dQ, the key mask in dK/dV) are ``[.., S_pad, 128]``
  lane-broadcast arrays read in ``(None, 128, 128)`` blocks.  The forward writes ``lse`` in that lane-broadcast form.

Only verified in interpret mode (``interpret=True`` or ``pltpu.InterpretParams()``) and by exporting for the TPU
platform (Pallas -> Mosaic lowering); Mosaic compilation and speed on hardware are untested.

VMEM per step (double-buffered): forward ``2 * 2 * S_pad * d_pad * itemsize`` for K/V plus ``2 * n_pad * 4 KiB``
for the mask rows (S = 4096, d = 128, bf16: ~5 MiB); dK/dV likewise for Q/dO plus the lse/delta rows (~6 MiB).
SMEM holds ``4 * BH * (2 * n_pad + K)`` bytes of CSR lists.  ``vmem_limit_bytes`` raises Mosaic's scoped-VMEM limit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .layout import BlockLayout

__all__ = ["BLOCK", "ROWS", "attention_backward", "attention_dkv", "attention_dq", "attention_forward"]

BLOCK = 32  # tokens per block (same as gpu.BLOCK)
ROWS = 128  # tokens per grid step (4 blocks): sublane-aligned for every dtype, lane-dense for [.., S, 128] arrays
_PER_STEP = ROWS // BLOCK
_LANES = 128
_SUBLANES = 8
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _precision(dtype) -> lax.Precision | None:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot_nn(a, b, precision):
    """``a @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _dot_nt(a, b, precision):
    """``a @ b.T`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_to(x: jax.Array, s_pad: int, d_pad: int) -> jax.Array:
    """Zero-pad [BH, S, d] to [BH, s_pad, d_pad]."""
    _, s, d = x.shape
    if (s, d) == (s_pad, d_pad):
        return x
    return jnp.pad(x, ((0, 0), (0, s_pad - s), (0, d_pad - d)))


def _pad_seq(x: jax.Array, s_pad: int, value=0) -> jax.Array:
    """Pad [N, S] to [N, s_pad] with ``value``."""
    s = x.shape[1]
    return x if s == s_pad else jnp.pad(x, ((0, 0), (0, s_pad - s)), constant_values=value)


def _lane_bcast(x: jax.Array) -> jax.Array:
    """[N, S] -> [N, S, 128] (value repeated along lanes)."""
    return jnp.broadcast_to(x[:, :, None], (*x.shape, _LANES))


def _block_rows(x: jax.Array) -> jax.Array:
    """[N, S] -> [N, S // 32, 8, 32]: block ``j``'s 32 values along lanes, repeated on 8 sublanes."""
    n_, s = x.shape
    x = x.reshape(n_, s // BLOCK, 1, BLOCK)
    return jnp.broadcast_to(x, (n_, s // BLOCK, _SUBLANES, BLOCK))


def _flat_csr(start: jax.Array, count: jax.Array, ids: jax.Array, n_pad: int):
    """Flatten a CSR view to 1-D int32 (SMEM) and give the padded blocks an empty list."""
    n = start.shape[1]
    if n_pad != n:
        start = jnp.pad(start, ((0, 0), (0, n_pad - n)))
        count = jnp.pad(count, ((0, 0), (0, n_pad - n)))
    return start.reshape(-1), count.reshape(-1), ids.reshape(-1)


def _check(q, k, v, key_mask, layout: BlockLayout, num_heads: int) -> tuple[int, int, int, int]:
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share the shape [BH, S, d]; got {q.shape}, {k.shape}, {v.shape}")
    bh, s, d = q.shape
    if s % BLOCK:
        raise ValueError(f"sequence length {s} must be a multiple of {BLOCK}")
    n = s // BLOCK
    if num_heads <= 0 or bh % num_heads:
        raise ValueError(f"BH={bh} is not a multiple of num_heads={num_heads}")
    if key_mask.shape != (bh // num_heads, s):
        raise ValueError(f"key_mask must be [B, S] = {(bh // num_heads, s)}, got {key_mask.shape}")
    if layout.row_start.shape != (bh, n) or layout.col_start.shape != (bh, n):
        raise ValueError(f"layout does not match BH={bh}, n={n}: row_start {layout.row_start.shape}")
    return bh, s, d, layout.row_cols.shape[-1]


def _geometry(s: int, d: int) -> tuple[int, int, int]:
    s_pad = _round_up(s, ROWS)
    return s_pad, s_pad // BLOCK, _round_up(d, _LANES)


def _mask_i32(key_mask: jax.Array, s_pad: int) -> jax.Array:
    return _pad_seq((lax.stop_gradient(key_mask) != 0).astype(jnp.int32), s_pad)


def _batch(bh, num_heads: int):
    """Batch item of fused row ``bh`` (truncating division: ``//`` lowers via ``sign``, which needs a TPU to lower)."""
    return lax.div(bh, jnp.int32(num_heads))


def _key_valid(mrow_ref, j) -> jax.Array:
    """[32, 32] bool: validity of key block ``j``'s keys along lanes (from the ``[n_pad, 8, 32]`` block rows)."""
    row = mrow_ref[j][:1, :]  # [1, 32] int32; broadcast the int32 row, then compare (no i1 broadcast)
    return jnp.broadcast_to(row, (BLOCK, BLOCK)) != 0


def _compiler_params(vmem_limit_bytes: int | None):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes)


# ----------------------------------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(
    start_ref, count_ref, cols_ref, q_ref, k_ref, v_ref, mrow_ref, o_ref, lse_ref, *, scale, precision, n_pad, kk
):
    b = pl.program_id(0)
    step = pl.program_id(1)
    dp = q_ref.shape[-1]
    for r in range(_PER_STEP):  # the four query blocks of this step, each with its own key-block list
        blk = b * n_pad + step * _PER_STEP + r
        start = b * kk + start_ref[blk]
        count = count_ref[blk]
        rows = slice(r * BLOCK, (r + 1) * BLOCK)
        q = q_ref[rows, :]

        def body(t, carry, q=q, start=start):
            acc, m, denom = carry
            j = cols_ref[start + t]
            off = pl.multiple_of(j * BLOCK, BLOCK)
            k = k_ref[pl.ds(off, BLOCK), :]
            v = v_ref[pl.ds(off, BLOCK), :]
            s = _dot_nt(q, k, precision) / scale  # [32 q, 32 k]
            s = jnp.where(_key_valid(mrow_ref, j), s, _NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe)
            denom = denom * alpha + jnp.sum(p, axis=1, keepdims=True)
            acc = acc * alpha + _dot_nn(p.astype(v.dtype), v, precision)
            return acc, m_new, denom

        init = (
            jnp.zeros((BLOCK, dp), jnp.float32),
            jnp.full((BLOCK, 1), _NEG_INF, jnp.float32),
            jnp.zeros((BLOCK, 1), jnp.float32),
        )
        acc, m, denom = lax.fori_loop(0, count, body, init)
        pos = denom > 0.0  # [32, 1]; every select below is between same-shape operands
        denom_safe = jnp.where(pos, denom, 1.0)
        inv = jnp.where(pos, 1.0 / denom_safe, 0.0)  # acc is exactly 0 where denom == 0
        o_ref[rows, :] = (acc * inv).astype(o_ref.dtype)
        lse = jnp.where(pos, m + jnp.log(denom_safe), _NEG_INF)
        lse_ref[rows, :] = jnp.broadcast_to(lse, (BLOCK, _LANES))


def _forward_padded(q, k, v, key_mask, layout, *, scale, num_heads, interpret, vmem_limit_bytes):
    """Forward on padded operands: returns ``o`` [BH, S_pad, d_pad] and lane-broadcast ``lse`` [BH, S_pad, 128]."""
    bh, s, d, kk = _check(q, k, v, key_mask, layout, num_heads)
    s_pad, n_pad, dp = _geometry(s, d)
    qp, kp, vp = (_pad_to(x, s_pad, dp) for x in (q, k, v))
    mrow = _block_rows(_mask_i32(key_mask, s_pad))  # [B, n_pad, 8, 32]
    h = num_heads
    kernel = functools.partial(_fwd_kernel, scale=float(scale), precision=_precision(q.dtype), n_pad=n_pad, kk=kk)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(bh, s_pad // ROWS),
        in_specs=[
            pl.BlockSpec((None, ROWS, dp), lambda b, i, *_: (b, i, 0)),
            pl.BlockSpec((None, s_pad, dp), lambda b, i, *_: (b, 0, 0)),
            pl.BlockSpec((None, s_pad, dp), lambda b, i, *_: (b, 0, 0)),
            pl.BlockSpec((None, n_pad, _SUBLANES, BLOCK), lambda b, i, *_: (_batch(b, h), 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, ROWS, dp), lambda b, i, *_: (b, i, 0)),
            pl.BlockSpec((None, ROWS, _LANES), lambda b, i, *_: (b, i, 0)),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct((bh, s_pad, dp), q.dtype),
            jax.ShapeDtypeStruct((bh, s_pad, _LANES), jnp.float32),
        ),
        compiler_params=_compiler_params(vmem_limit_bytes),
        interpret=interpret,
        name="block_sparse_attention_tpu_fwd",
    )(*_flat_csr(layout.row_start, layout.row_count, layout.row_cols, n_pad), qp, kp, vp, mrow)


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
    vmem_limit_bytes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward: returns ``o`` [BH, S, d] (q.dtype) and ``lse`` [BH, S] float32.

    ``interpret``: ``False`` (Mosaic), ``True`` or ``pltpu.InterpretParams(...)`` (CPU interpreters).
    """
    _, s, d = q.shape
    o, lse = _forward_padded(
        q, k, v, key_mask, layout, scale=scale, num_heads=num_heads, interpret=interpret,
        vmem_limit_bytes=vmem_limit_bytes,
    )
    return o[:, :s, :d], lse[:, :s, 0]


# ----------------------------------------------------------------------------------------------------------------------
# backward


def _dq_kernel(
    start_ref, count_ref, cols_ref, q_ref, k_ref, v_ref, mrow_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
    precision, n_pad, kk,
):
    b = pl.program_id(0)
    step = pl.program_id(1)
    for r in range(_PER_STEP):
        blk = b * n_pad + step * _PER_STEP + r
        start = b * kk + start_ref[blk]
        count = count_ref[blk]
        rows = slice(r * BLOCK, (r + 1) * BLOCK)
        q = q_ref[rows, :]
        do = do_ref[rows, :]
        lse = lse_ref[rows, :BLOCK]  # [32, 32]: the row's lse repeated along lanes
        lse = jnp.where(lse == _NEG_INF, 0.0, lse)  # such rows have no valid key: every p below is exp(-inf) = 0
        delta = delta_ref[rows, :BLOCK]

        def body(t, dq, q=q, do=do, lse=lse, delta=delta, start=start):
            j = cols_ref[start + t]
            off = pl.multiple_of(j * BLOCK, BLOCK)
            k = k_ref[pl.ds(off, BLOCK), :]
            v = v_ref[pl.ds(off, BLOCK), :]
            s = _dot_nt(q, k, precision) / scale
            s = jnp.where(_key_valid(mrow_ref, j), s, _NEG_INF)
            p = jnp.exp(s - lse)
            dp = _dot_nt(do, v, precision)
            ds = p * (dp - delta)
            return dq + _dot_nn(ds.astype(k.dtype), k, precision)

        dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
        dq_ref[rows, :] = (dq / scale).astype(dq_ref.dtype)


def _dkv_kernel(
    start_ref, count_ref, qrows_ref, q_ref, k_ref, v_ref, mcol_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
    scale, precision, n_pad, kk,
):
    b = pl.program_id(0)
    step = pl.program_id(1)
    for r in range(_PER_STEP):  # the four key blocks of this step, each with its own query-block list
        blk = b * n_pad + step * _PER_STEP + r
        start = b * kk + start_ref[blk]
        count = count_ref[blk]
        rows = slice(r * BLOCK, (r + 1) * BLOCK)
        k = k_ref[rows, :]
        v = v_ref[rows, :]
        valid = mcol_ref[rows, :BLOCK] != 0  # [32 k, 32]: key validity repeated along lanes

        def body(t, carry, k=k, v=v, valid=valid, start=start):
            dk, dv = carry
            i = qrows_ref[start + t]
            off = pl.multiple_of(i * BLOCK, BLOCK)
            q = q_ref[pl.ds(off, BLOCK), :]
            do = do_ref[pl.ds(off, BLOCK), :]
            lse = lse_ref[i][:1, :]  # [1, 32 q]
            lse = jnp.where(lse == _NEG_INF, 0.0, lse)
            delta = delta_ref[i][:1, :]
            s_t = _dot_nt(k, q, precision) / scale  # [32 k, 32 q]
            s_t = jnp.where(valid, s_t, _NEG_INF)
            p_t = jnp.exp(s_t - lse)
            dv = dv + _dot_nn(p_t.astype(do.dtype), do, precision)
            dp_t = _dot_nt(v, do, precision)
            ds_t = p_t * (dp_t - delta)
            dk = dk + _dot_nn(ds_t.astype(q.dtype), q, precision)
            return dk, dv

        init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
        dk, dv = lax.fori_loop(0, count, body, init)
        dk_ref[rows, :] = (dk / scale).astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)


def _prepare_bwd(q, k, v, key_mask, layout, lse, do, delta, num_heads):
    bh, s, d, kk = _check(q, k, v, key_mask, layout, num_heads)
    s_pad, n_pad, dp = _geometry(s, d)
    qp, kp, vp, dop = (_pad_to(x, s_pad, dp) for x in (q, k, v, do.astype(q.dtype)))
    lse = _pad_seq(lse.astype(jnp.float32), s_pad, _NEG_INF)
    delta = _pad_seq(delta.astype(jnp.float32), s_pad)
    return bh, s, d, kk, s_pad, n_pad, dp, (qp, kp, vp, dop), lse, delta


def attention_dq(
    q, k, v, key_mask, layout: BlockLayout, lse, do, delta, *, scale, num_heads, interpret=False,
    vmem_limit_bytes: int | None = None,
) -> jax.Array:
    """dQ [BH, S, d]; ``delta = rowsum(o * do) - dlse`` [BH, S] float32, ``lse`` [BH, S] from the forward."""
    bh, s, d, kk, s_pad, n_pad, dp, (qp, kp, vp, dop), lse, delta = _prepare_bwd(
        q, k, v, key_mask, layout, lse, do, delta, num_heads
    )
    h = num_heads
    kernel = functools.partial(_dq_kernel, scale=float(scale), precision=_precision(q.dtype), n_pad=n_pad, kk=kk)
    row_blk = pl.BlockSpec((None, ROWS, dp), lambda b, i, *_: (b, i, 0))
    seq_blk = pl.BlockSpec((None, s_pad, dp), lambda b, i, *_: (b, 0, 0))
    lane_blk = pl.BlockSpec((None, ROWS, _LANES), lambda b, i, *_: (b, i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(bh, s_pad // ROWS),
        in_specs=[
            row_blk,
            seq_blk,
            seq_blk,
            pl.BlockSpec((None, n_pad, _SUBLANES, BLOCK), lambda b, i, *_: (_batch(b, h), 0, 0, 0)),
            row_blk,
            lane_blk,
            lane_blk,
        ],
        out_specs=row_blk,
    )
    dq = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((bh, s_pad, dp), q.dtype),
        compiler_params=_compiler_params(vmem_limit_bytes),
        interpret=interpret,
        name="block_sparse_attention_tpu_dq",
    )(
        *_flat_csr(layout.row_start, layout.row_count, layout.row_cols, n_pad), qp, kp, vp,
        _block_rows(_mask_i32(key_mask, s_pad)), dop, _lane_bcast(lse), _lane_bcast(delta),
    )
    return dq[:, :s, :d]


def attention_dkv(
    q, k, v, key_mask, layout: BlockLayout, lse, do, delta, *, scale, num_heads, interpret=False,
    vmem_limit_bytes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(dK, dV) [BH, S, d] via the column view; key blocks nobody selected get zeros."""
    bh, s, d, kk, s_pad, n_pad, dp, (qp, kp, vp, dop), lse, delta = _prepare_bwd(
        q, k, v, key_mask, layout, lse, do, delta, num_heads
    )
    h = num_heads
    kernel = functools.partial(_dkv_kernel, scale=float(scale), precision=_precision(q.dtype), n_pad=n_pad, kk=kk)
    row_blk = pl.BlockSpec((None, ROWS, dp), lambda b, i, *_: (b, i, 0))
    seq_blk = pl.BlockSpec((None, s_pad, dp), lambda b, i, *_: (b, 0, 0))
    brow_blk = pl.BlockSpec((None, n_pad, _SUBLANES, BLOCK), lambda b, i, *_: (b, 0, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(bh, s_pad // ROWS),
        in_specs=[
            seq_blk,
            row_blk,
            row_blk,
            pl.BlockSpec((None, ROWS, _LANES), lambda b, i, *_: (_batch(b, h), i, 0)),
            seq_blk,
            brow_blk,
            brow_blk,
        ],
        out_specs=[row_blk, row_blk],
    )
    dk, dv = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(jax.ShapeDtypeStruct((bh, s_pad, dp), k.dtype), jax.ShapeDtypeStruct((bh, s_pad, dp), v.dtype)),
        compiler_params=_compiler_params(vmem_limit_bytes),
        interpret=interpret,
        name="block_sparse_attention_tpu_dkv",
    )(
        *_flat_csr(layout.col_start, layout.col_count, layout.col_rows, n_pad), qp, kp, vp,
        _lane_bcast(_mask_i32(key_mask, s_pad)), dop, _block_rows(lse), _block_rows(delta),
    )
    return dk[:, :s, :d], dv[:, :s, :d]


def attention_backward(
    q, k, v, key_mask, layout: BlockLayout, o, lse, do, dlse=None, *, scale, num_heads, interpret=False,
    vmem_limit_bytes: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dQ, dK, dV) for cotangents ``do`` of ``o`` and ``dlse`` of ``lse`` (``None`` = zero)."""
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    kw = dict(scale=scale, num_heads=num_heads, interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)
    dq = attention_dq(q, k, v, key_mask, layout, lse, do, delta, **kw)
    dk, dv = attention_dkv(q, k, v, key_mask, layout, lse, do, delta, **kw)
    return dq, dk, dv
