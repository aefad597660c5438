"""Block-sparse attention kernels for TPUs (Pallas, Mosaic backend) whose VMEM use does not grow with the sequence.

Same contract and math as :mod:`pallas_kernels.gpu` (tokens in blocks of ``BLOCK = 32``; logits
``dot(q, k) * sm_scale``; ``[B, S, H, d]`` in and out, moved to ``[B·H, S, d]`` rows here because a block of
``[.., H, d]`` would squeeze the second-minor axis, which Mosaic's (8, 128) block rule does not allow; ``key_mask``
[B, S] shared by the heads of a batch item, ``None`` = no padding; padded keys get probability exactly 0; ``o``
normalised in the input dtype, ``lse`` float32, ``o = 0`` / ``lse = -inf`` for a query that sees no valid key; float32
accumulation, ``Precision.HIGHEST`` for float32 dots).  Three kernels, no atomics:

* ``attention_forward`` and ``attention_dq`` walk the row view (a query block and its key blocks);
* ``attention_dkv`` walks the column view (a key block and the query blocks that selected it), with scores computed
  transposed (keys on sublanes, queries on lanes) so that every matmul is ``A @ B`` or ``A @ B.T``.

Streaming (splash attention's pattern): the grid is ``(batch·head rows, steps)``.  Each grid step handles one "major"
block (the query block of the row view, the key block of the column view) and up to ``SLOTS`` of its selected
"minor" blocks.  Every operand is a 32-row block whose ``index_map`` reads the block ids from a scalar-prefetched
*visit list*, so a step DMAs only the blocks it needs (a minor operand is passed once per slot), and the pipeline
fetches the next step's blocks while this one computes.  A major block's steps are consecutive: its output block and
float32 accumulators (VMEM scratch) stay resident, initialised on its first step and written on its last.  A major
block that selected nothing still gets one step (no valid slot), so every output block is written: ``o = 0``,
``lse = -inf``, zero gradients.  An unused slot keeps the block it held at its previous step, so it costs no DMA.

Visit list: one int32 word per (step, slot), ``major << 17 | minor << 3 | valid << 2 | first << 1 | last``; a row has
``ceil(K / SLOTS) + n`` steps (enough for any selection; the steps after the last major block repeat it with no flag
set).  The words are the kernels' only scalar-prefetch operand and live in SMEM (1 MiB on v4, v5e, v5p and v6e): a
call takes as many batch·head rows as fit in ``SMEM_LIST_BYTES`` and a longer batch is split into calls writing into
the same buffers (``input_output_aliases``), so the lists never outgrow SMEM.  Bounds: ``n = S / 32 <= 16,384``
(S <= 524,288 tokens) and one row's list ``4 · SLOTS · (ceil(K / SLOTS) + n) <= SMEM_LIST_BYTES`` bytes (at 8 key
blocks per query block and ``SLOTS = 4``: S <= 349,504 tokens).

VMEM per step: a few ``[32, d]`` blocks, double-buffered, and ``[32, d]`` + 2 × ``[32, 128]`` float32 scratch, for any
sequence length.  Per-token values that the kernels need along *lanes* (the key mask in forward/dQ, ``lse``/``delta``
in dK/dV) are ``[.., n, 8, 32]`` "block rows" (sublane-broadcast); values needed along *sublanes* (``lse``/``delta`` in
dQ, the key mask in dK/dV) are ``[.., S, 128]`` lane-broadcast arrays.  The forward writes ``lse`` lane-broadcast.

Verified in interpret mode (``interpret=True`` or ``pltpu.InterpretParams()``) and by libtpu's deviceless compile
for v4, v5e, v5p and v6e; numerics and speed on TPU hardware are untested.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .layout import BLOCK, BlockLayout
from .numerics import matmul_precision

__all__ = [
    "MAX_BLOCKS", "SLOTS", "SMEM_LIST_BYTES", "attention_dkv", "attention_dq", "attention_forward", "rows_per_call",
    "visit_words",
]

SLOTS = 4  # minor blocks per grid step
SMEM_LIST_BYTES = 512 * 1024  # visit-list bytes per call (SMEM is 1 MiB; Mosaic keeps some for itself)
MAX_BLOCKS = 1 << 14  # blocks per side that a word's 14-bit fields can name
_LANES = 128
_SUBLANES = 8
_NEG_INF = float("-inf")
_MAJOR_SHIFT, _MINOR_SHIFT, _FIELD = 17, 3, MAX_BLOCKS - 1
_VALID, _FIRST, _LAST = 4, 2, 1


# ----------------------------------------------------------------------------------------------------------------------
# visit lists


def visit_words(start: jax.Array, count: jax.Array, minor: jax.Array, slots: int = SLOTS) -> jax.Array:
    """The visit list of one CSR view (``row_*`` or ``col_*`` of a :class:`BlockLayout`): [BH, steps * slots] int32.

    Major block ``i`` gets ``max(ceil(count[i] / slots), 1)`` consecutive steps holding its minor blocks in order;
    the trailing steps repeat the last major block with no flag set.
    """
    bh, n = count.shape
    kk = minor.shape[1]
    if n > MAX_BLOCKS:
        raise ValueError(f"{n} blocks per side exceed the TPU kernels' {MAX_BLOCKS} (S <= {MAX_BLOCKS * BLOCK} tokens)")
    if kk == 0:
        minor = jnp.zeros((bh, 1), jnp.int32)
    steps = -(-kk // slots) + n
    p = jnp.arange(steps, dtype=jnp.int32)
    slot = jnp.arange(slots, dtype=jnp.int32)

    def one(start, count, minor):
        per_major = jnp.maximum((count + slots - 1) // slots, 1)
        ends = jnp.cumsum(per_major)
        major = jnp.minimum(jnp.searchsorted(ends, p, side="right"), n - 1).astype(jnp.int32)
        local = p - (ends[major] - per_major[major])
        within = p < ends[-1]
        first = within & (local == 0)
        last = within & (local == per_major[major] - 1)
        t = local[:, None] * slots + slot[None, :]  # [steps, slots] position in the major block's list
        valid = within[:, None] & (t < count[major][:, None])
        ids = jnp.take(minor, (start[major][:, None] + t).reshape(-1), mode="clip").reshape(t.shape)
        # an unused slot keeps the block of its last valid step (the pipeline then fetches nothing new)
        # (a forward fill by associative_scan: lax.cummax, fill-mode gathers and a second gather each add seconds to
        # minutes to XLA:TPU's compile)
        _, ids = lax.associative_scan(_keep_last_valid, (valid, jnp.where(valid, ids, 0)), axis=0)
        # (a barrier: fused with the packing below, the scan takes XLA:TPU three times as long to compile)
        ids, valid, first, last = lax.optimization_barrier((ids, valid, first, last))
        flags = valid * _VALID + (first * _FIRST + last * _LAST)[:, None]
        return ((major[:, None] << _MAJOR_SHIFT) | (ids << _MINOR_SHIFT) | flags).astype(jnp.int32).reshape(-1)

    return jax.vmap(one)(start.astype(jnp.int32), count.astype(jnp.int32), minor.astype(jnp.int32))


def _keep_last_valid(a, b):
    return a[0] | b[0], jnp.where(b[0], b[1], a[1])


def rows_per_call(words_per_row: int) -> int:
    """Batch·head rows whose visit lists fit ``SMEM_LIST_BYTES`` (a clear error if not even one does)."""
    per_row = 4 * words_per_row
    if per_row > SMEM_LIST_BYTES:
        raise ValueError(
            f"one batch·head row's block list needs {per_row} bytes of SMEM, over the TPU kernels' {SMEM_LIST_BYTES}: "
            f"use fewer blocks per row or a shorter sequence"
        )
    return SMEM_LIST_BYTES // per_row


def _major(w):
    return lax.shift_right_logical(w, _MAJOR_SHIFT)


def _minor(w):
    return lax.bitwise_and(lax.shift_right_logical(w, _MINOR_SHIFT), _FIELD)


def _flag(w, bit) -> jax.Array:
    return lax.bitwise_and(w, bit) != 0


def _word(words_ref, steps: int, slot: int, row=None, step=None):
    """The word for ``slot`` at grid step ``(row in call, step)`` (default: the current one)."""
    row = pl.program_id(0) if row is None else row
    step = pl.program_id(1) if step is None else step
    return words_ref[(row * steps + step) * SLOTS + slot]


# ----------------------------------------------------------------------------------------------------------------------
# one pallas_call per group of rows


class _Operand:
    """A kernel input: ``array`` read in ``block`` blocks at ``index(bh, major, minor)`` (``per_slot``: once per
    slot, each slot's copy at that slot's minor block)."""

    def __init__(self, array: jax.Array, block: tuple, index: Callable, per_slot: bool = False):
        self.array, self.block, self.index, self.per_slot = array, block, index, per_slot


def _spec(block: tuple, index: Callable, *, row0: int, steps: int, slot: int) -> pl.BlockSpec:
    def index_map(c, p, words_ref):
        w = _word(words_ref, steps, slot, c, p)
        return index(row0 + c, _major(w), _minor(w))

    return pl.BlockSpec(block, index_map)


def _streamed_call(
    kernel: Callable, words: jax.Array, inputs: Sequence[_Operand], outputs: Sequence[tuple], scratch: Sequence,
    *, name: str, interpret, vmem_limit_bytes: int | None,
) -> list[jax.Array]:
    """Run ``kernel`` over grid ``(rows, steps)`` in as many calls as SMEM needs; ``outputs`` are
    ``(ShapeDtypeStruct, block, index)``.  Later calls write into the earlier calls' buffers (aliased, untouched)."""
    bh, per_row = words.shape
    steps = per_row // SLOTS
    group = rows_per_call(per_row)
    n_in = sum(SLOTS if op.per_slot else 1 for op in inputs)
    results: list[jax.Array] = []
    for row0 in range(0, bh, group):
        rows = min(group, bh - row0)
        kw = dict(row0=row0, steps=steps)
        in_specs, args = [], []
        for op in inputs:
            for slot in range(SLOTS) if op.per_slot else (0,):
                in_specs.append(_spec(op.block, op.index, slot=slot, **kw))
                args.append(op.array)
        aliases = {1 + n_in + t: t for t in range(len(results))}  # operand 0 is the visit list
        in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * len(results)
        args += results

        def body(words_ref, *refs, n_alias=len(aliases)):  # noqa: B008 (bound per call on purpose)
            kernel(words_ref, *refs[:n_in], *refs[n_in + n_alias :], steps=steps)

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(rows, steps),
            in_specs=in_specs,
            out_specs=[_spec(block, index, slot=0, **kw) for _, block, index in outputs],
            scratch_shapes=list(scratch),
        )
        results = list(pl.pallas_call(
            body,
            grid_spec=grid_spec,
            out_shape=[shape for shape, _, _ in outputs],
            input_output_aliases=aliases,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=vmem_limit_bytes
            ),
            interpret=interpret,
            name=name,
        )(words[row0 : row0 + rows].reshape(-1), *args))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _dot_nn(a, b, precision):
    """``a @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _dot_nt(a, b, precision):
    """``a @ b.T`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _lane_bcast(x: jax.Array) -> jax.Array:
    """[N, S] -> [N, S, 128] (value repeated along lanes)."""
    return jnp.broadcast_to(x[:, :, None], (*x.shape, _LANES))


def _block_rows(x: jax.Array) -> jax.Array:
    """[N, S] -> [N, S // 32, 8, 32]: block ``j``'s 32 values along lanes, repeated on 8 sublanes."""
    n_, s = x.shape
    return jnp.broadcast_to(x.reshape(n_, s // BLOCK, 1, BLOCK), (n_, s // BLOCK, _SUBLANES, BLOCK))


def _to_rows(x: jax.Array) -> jax.Array:
    """[B, S, H, ...] -> [B·H, S, ...], the kernels' layout."""
    b, s, h = x.shape[:3]
    return jnp.moveaxis(x, 2, 1).reshape(b * h, s, *x.shape[3:])


def _from_rows(x: jax.Array, h: int) -> jax.Array:
    """[B·H, S, ...] -> [B, S, H, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0] // h, h, *x.shape[1:]), 1, 2)


def _mask_i32(key_mask: jax.Array | None, b: int, s: int) -> jax.Array:
    return jnp.ones((b, s), jnp.int32) if key_mask is None else key_mask.astype(jnp.int32)


def _batch(bh, num_heads: int):
    """Batch item of fused row ``bh`` (truncating division: ``//`` lowers via ``sign``, which needs a TPU to lower)."""
    return lax.div(bh, jnp.int32(num_heads))


def _key_valid(mrow_ref) -> jax.Array:
    """[32, 32] bool: a key block's validity along lanes (from its ``[8, 32]`` block row)."""
    return jnp.broadcast_to(mrow_ref[:1, :], (BLOCK, BLOCK)) != 0  # broadcast the int32 row (no i1 broadcast)


def _seq_block(d: int) -> tuple:
    return (None, BLOCK, d)


def _at_major(bh, i, j):
    return bh, i, 0


def _at_minor(bh, i, j):
    return bh, j, 0


def _rows_at_minor(bh, i, j):
    return bh, j, 0, 0


def _kw(vmem_limit_bytes, interpret) -> dict:
    return dict(interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)


# ----------------------------------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(words_ref, q_ref, *refs, sm_scale, precision, steps):
    k_refs, v_refs, m_refs = refs[:SLOTS], refs[SLOTS : 2 * SLOTS], refs[2 * SLOTS : 3 * SLOTS]
    o_ref, lse_ref, acc_ref, max_ref, den_ref = refs[3 * SLOTS :]
    head = _word(words_ref, steps, 0)

    @pl.when(_flag(head, _FIRST))
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        max_ref[...] = jnp.full(max_ref.shape, _NEG_INF, jnp.float32)
        den_ref[...] = jnp.zeros(den_ref.shape, jnp.float32)

    q = q_ref[...]
    for slot in range(SLOTS):

        @pl.when(_flag(_word(words_ref, steps, slot), _VALID))
        def _update(slot=slot):
            v = v_refs[slot][...]
            s = _dot_nt(q, k_refs[slot][...], precision) * sm_scale  # [32 q, 32 k]
            s = jnp.where(_key_valid(m_refs[slot]), s, _NEG_INF)
            m_prev = max_ref[...]  # [32, 128], lane-broadcast
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            den_ref[...] = den_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
            acc_ref[...] = acc_ref[...] * alpha[:, :1] + _dot_nn(p.astype(v.dtype), v, precision)
            max_ref[...] = m_new

    @pl.when(_flag(head, _LAST))
    def _finish():
        denom = den_ref[...][:, :1]
        pos = denom > 0.0  # acc is exactly 0 where denom == 0
        denom_safe = jnp.where(pos, denom, 1.0)
        o_ref[...] = (acc_ref[...] * jnp.where(pos, 1.0 / denom_safe, 0.0)).astype(o_ref.dtype)
        lse = jnp.where(pos, max_ref[...][:, :1] + jnp.log(denom_safe), _NEG_INF)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def attention_forward(q, k, v, layout: BlockLayout, key_mask, *, sm_scale: float, interpret=False,
                      vmem_limit_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``o`` [B, S, H, d] (q.dtype) and ``lse`` [B, S, H] float32 (arguments checked by ``ops``).

    ``interpret``: ``False`` (Mosaic), ``True`` or ``pltpu.InterpretParams(...)`` (CPU interpreters).
    """
    b, s, h, d = q.shape
    q, k, v = (_to_rows(x) for x in (q, k, v))
    words = visit_words(layout.row_start, layout.row_count, layout.row_cols)
    mrow = _block_rows(_mask_i32(key_mask, b, s))  # [B, n, 8, 32]
    o, lse = _streamed_call(
        functools.partial(_fwd_kernel, sm_scale=sm_scale, precision=matmul_precision(q.dtype)),
        words,
        [
            _Operand(q, _seq_block(d), _at_major),
            _Operand(k, _seq_block(d), _at_minor, per_slot=True),
            _Operand(v, _seq_block(d), _at_minor, per_slot=True),
            _Operand(mrow, (None, None, _SUBLANES, BLOCK), lambda r, i, j: (_batch(r, h), j, 0, 0), per_slot=True),
        ],
        [
            (jax.ShapeDtypeStruct((b * h, s, d), q.dtype), _seq_block(d), _at_major),
            (jax.ShapeDtypeStruct((b * h, s, _LANES), jnp.float32), _seq_block(_LANES), _at_major),
        ],
        [pltpu.VMEM((BLOCK, d), jnp.float32), pltpu.VMEM((BLOCK, _LANES), jnp.float32),
         pltpu.VMEM((BLOCK, _LANES), jnp.float32)],
        name="block_sparse_attention_tpu_fwd",
        **_kw(vmem_limit_bytes, interpret),
    )
    return _from_rows(o, h), _from_rows(lse[:, :, 0], h)


# ----------------------------------------------------------------------------------------------------------------------
# backward


def _dq_kernel(words_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, sm_scale, precision, steps):
    k_refs, v_refs, m_refs = refs[:SLOTS], refs[SLOTS : 2 * SLOTS], refs[2 * SLOTS : 3 * SLOTS]
    dq_ref, acc_ref = refs[3 * SLOTS :]
    head = _word(words_ref, steps, 0)

    @pl.when(_flag(head, _FIRST))
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    q, do = q_ref[...], do_ref[...]
    lse = lse_ref[:, :BLOCK]  # [32, 32]: the row's lse repeated along lanes
    lse = jnp.where(lse == _NEG_INF, 0.0, lse)  # such rows have no valid key: every p below is exp(-inf) = 0
    delta = delta_ref[:, :BLOCK]
    for slot in range(SLOTS):

        @pl.when(_flag(_word(words_ref, steps, slot), _VALID))
        def _update(slot=slot):
            k = k_refs[slot][...]
            s = _dot_nt(q, k, precision) * sm_scale
            p = jnp.exp(jnp.where(_key_valid(m_refs[slot]), s, _NEG_INF) - lse)
            ds = p * (_dot_nt(do, v_refs[slot][...], precision) - delta)
            acc_ref[...] += _dot_nn(ds.astype(k.dtype), k, precision)

    @pl.when(_flag(head, _LAST))
    def _finish():
        dq_ref[...] = (acc_ref[...] * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(words_ref, k_ref, v_ref, mcol_ref, *refs, sm_scale, precision, steps):
    q_refs, do_refs = refs[:SLOTS], refs[SLOTS : 2 * SLOTS]
    lse_refs, delta_refs = refs[2 * SLOTS : 3 * SLOTS], refs[3 * SLOTS : 4 * SLOTS]
    dk_ref, dv_ref, dk_acc, dv_acc = refs[4 * SLOTS :]
    head = _word(words_ref, steps, 0)

    @pl.when(_flag(head, _FIRST))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    k, v = k_ref[...], v_ref[...]
    valid = mcol_ref[:, :BLOCK] != 0  # [32 k, 32]: key validity repeated along lanes
    for slot in range(SLOTS):

        @pl.when(_flag(_word(words_ref, steps, slot), _VALID))
        def _update(slot=slot):
            q, do = q_refs[slot][...], do_refs[slot][...]
            lse = lse_refs[slot][:1, :]  # [1, 32 q]
            lse = jnp.where(lse == _NEG_INF, 0.0, lse)
            s_t = _dot_nt(k, q, precision) * sm_scale  # [32 k, 32 q]
            p_t = jnp.exp(jnp.where(valid, s_t, _NEG_INF) - lse)
            dv_acc[...] += _dot_nn(p_t.astype(do.dtype), do, precision)
            ds_t = p_t * (_dot_nt(v, do, precision) - delta_refs[slot][:1, :])
            dk_acc[...] += _dot_nn(ds_t.astype(q.dtype), q, precision)

    @pl.when(_flag(head, _LAST))
    def _finish():
        dk_ref[...] = (dk_acc[...] * sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def attention_dq(q, k, v, layout: BlockLayout, key_mask, lse, do, delta, *, sm_scale: float, interpret=False,
                 vmem_limit_bytes: int | None = None) -> jax.Array:
    """dQ [B, S, H, d]; ``delta = rowsum(o * do) - dlse`` and ``lse`` are [B, S, H] float32."""
    b, s, h, d = q.shape
    q, k, v, do = (_to_rows(x) for x in (q, k, v, do))
    lse, delta = (_to_rows(x) for x in (lse, delta))
    words = visit_words(layout.row_start, layout.row_count, layout.row_cols)
    (dq,) = _streamed_call(
        functools.partial(_dq_kernel, sm_scale=sm_scale, precision=matmul_precision(q.dtype)),
        words,
        [
            _Operand(q, _seq_block(d), _at_major),
            _Operand(do, _seq_block(d), _at_major),
            _Operand(_lane_bcast(lse), _seq_block(_LANES), _at_major),
            _Operand(_lane_bcast(delta), _seq_block(_LANES), _at_major),
            _Operand(k, _seq_block(d), _at_minor, per_slot=True),
            _Operand(v, _seq_block(d), _at_minor, per_slot=True),
            _Operand(_block_rows(_mask_i32(key_mask, b, s)), (None, None, _SUBLANES, BLOCK),
                     lambda r, i, j: (_batch(r, h), j, 0, 0), per_slot=True),
        ],
        [(jax.ShapeDtypeStruct((b * h, s, d), q.dtype), _seq_block(d), _at_major)],
        [pltpu.VMEM((BLOCK, d), jnp.float32)],
        name="block_sparse_attention_tpu_dq",
        **_kw(vmem_limit_bytes, interpret),
    )
    return _from_rows(dq, h)


def attention_dkv(q, k, v, layout: BlockLayout, key_mask, lse, do, delta, *, sm_scale: float, interpret=False,
                  vmem_limit_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(dK, dV) [B, S, H, d] via the column view; key blocks nobody selected get zeros."""
    b, s, h, d = q.shape
    q, k, v, do = (_to_rows(x) for x in (q, k, v, do))
    lse, delta = (_to_rows(x) for x in (lse, delta))
    words = visit_words(layout.col_start, layout.col_count, layout.col_rows)
    rows_block = (None, None, _SUBLANES, BLOCK)
    dk, dv = _streamed_call(
        functools.partial(_dkv_kernel, sm_scale=sm_scale, precision=matmul_precision(q.dtype)),
        words,
        [
            _Operand(k, _seq_block(d), _at_major),
            _Operand(v, _seq_block(d), _at_major),
            _Operand(_lane_bcast(_mask_i32(key_mask, b, s)), _seq_block(_LANES),
                     lambda r, j, i: (_batch(r, h), j, 0)),
            _Operand(q, _seq_block(d), _at_minor, per_slot=True),
            _Operand(do, _seq_block(d), _at_minor, per_slot=True),
            _Operand(_block_rows(lse), rows_block, _rows_at_minor, per_slot=True),
            _Operand(_block_rows(delta), rows_block, _rows_at_minor, per_slot=True),
        ],
        [
            (jax.ShapeDtypeStruct((b * h, s, d), k.dtype), _seq_block(d), _at_major),
            (jax.ShapeDtypeStruct((b * h, s, d), v.dtype), _seq_block(d), _at_major),
        ],
        [pltpu.VMEM((BLOCK, d), jnp.float32), pltpu.VMEM((BLOCK, d), jnp.float32)],
        name="block_sparse_attention_tpu_dkv",
        **_kw(vmem_limit_bytes, interpret),
    )
    return _from_rows(dk, h), _from_rows(dv, h)
