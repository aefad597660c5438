"""Block-sparse attention kernels for GPUs (Pallas, Triton backend), reading and writing ``[B, S, H, d]`` directly.

Tokens are grouped in blocks of ``BLOCK = 32``.  Three kernels, none using atomics, each with grid ``(n, B·H)``:

* ``attention_forward``: program ``(i, bh)`` loops over the key blocks of query block ``i`` (row view of the
  :class:`~pallas_kernels.layout.BlockLayout`) with an online softmax in float32 and writes the normalised output
  ``o`` and ``lse = m + log(l)`` (``-inf`` and ``o = 0`` for rows that see no valid key).
* ``attention_dq``: same grid and loop, recomputing ``p = exp(s - lse)``; FlashAttention-2 ``ds = p * (dp - delta)``.
* ``attention_dkv``: program ``(j, bh)`` over key block ``j``, looping over the column view.

Logits are ``dot(q, k) * sm_scale``, kept in base 2 inside the loops (one multiply by ``sm_scale·log2(e)``, then
``exp2``).  Each loop visits ``chunk`` listed blocks per iteration (their rows gathered into one ``[chunk·32, d]``
tile, so the dots are ``32 × chunk·32`` rather than 32 × 32), then the remainder of the list one block at a time.
The block specs index ``[B, S, H, d]`` as ``(b, block, h, :)``, so no transposes surround the kernels; K/V (and Q/dO
in the dK/dV pass) are passed as the whole sequence of one (b, h) and indexed in the kernel, so only the listed
blocks' rows are ever loaded.  Without a key mask (``key_mask=None``) a static variant skips the mask loads; with
one, padded keys get probability exactly 0.  ``d`` is padded to a power of two >= 16 (Triton's rule) only when
needed.

The kernel bodies only use ref indexing and ``jnp``/``lax`` ops, so they also run with ``interpret=True`` on CPU.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .layout import BLOCK, BlockLayout
from .merge import merge
from .numerics import matmul_precision

__all__ = ["attention_dkv", "attention_dq", "attention_forward"]

_NEG_INF = float("-inf")
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)

_LAUNCH = {
    # (kernel, float32 inputs, padded head_dim <= 64) -> (num_warps, num_stages, chunk), chunk = listed blocks per
    # loop iteration. Chosen by ptxas's register and spill report for an H100 (../shared/tools/h100-compile): the
    # largest chunk of 4 / 2 / 1 that compiles without spills (bfloat16 at 4 warps: 4, dK/dV at d = 128: 2; float32
    # spills at 2: 1, with the fewest warps, one stage for dK/dV, that do not spill). Speed on hardware not measured.
    ("fwd", False, True): (4, 2, 4), ("fwd", False, False): (4, 2, 4), ("fwd", True, True): (4, 2, 1),
    ("fwd", True, False): (4, 2, 1),
    ("dq", False, True): (4, 2, 4), ("dq", False, False): (4, 2, 4), ("dq", True, True): (4, 2, 1),
    ("dq", True, False): (4, 2, 1),
    ("dkv", False, True): (4, 2, 4), ("dkv", False, False): (4, 2, 2), ("dkv", True, True): (4, 1, 1),
    ("dkv", True, False): (8, 1, 1),
}


# ----------------------------------------------------------------------------------------------------------------------
# helpers


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
    return x if d == d_pad else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)])


def _launch(name: str, dtype, dp: int) -> tuple[int, int, int]:
    return _LAUNCH[name, jnp.dtype(dtype) == jnp.float32, dp <= 64]


def triton_call(kernel, *, name: str, num_warps: int, num_stages: int = 2, **kwargs):
    """``pl.pallas_call`` for the Triton backend with these launch settings, its deprecation warning (jax >= 0.11)
    silenced locally; shared by every GPU kernel of the package."""
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]riton.*")
        return pl.pallas_call(kernel, compiler_params=params, name=name, **kwargs)


def _call(kernel, name: str, dtype, dp: int, **kwargs):
    """`triton_call` with the warps and stages of the table."""
    warps, stages, _ = _launch(name, dtype, dp)
    return triton_call(kernel, name=f"block_sparse_attention_{name}", num_warps=warps, num_stages=stages, **kwargs)


def _over_list(start, count, chunk: int, step, init):
    """``step(first, size, carry)`` over list entries ``[start, start + count)``: ``chunk`` entries at a time, then
    the remainder one at a time (``size`` is static)."""
    full = count // chunk
    carry = lax.fori_loop(0, full, lambda t, c: step(start + t * chunk, chunk, c), init)
    if chunk == 1:
        return carry
    rest = start + full * chunk
    return lax.fori_loop(0, count - full * chunk, lambda t, c: step(rest + t, 1, c), carry)


def _gather(ref, ids_ref, first, size: int):
    """The tokens of blocks ``ids_ref[first : first + size]`` of a per-(b, h) ``[S, ...]`` ref, in list order:
    ``[size·32, ...]`` (one contiguous slice when ``size == 1``)."""
    if size == 1:
        return ref[pl.ds(pl.multiple_of(ids_ref[first] * BLOCK, BLOCK), BLOCK)]
    ids = ids_ref[pl.ds(first, size)]
    return ref[(ids[:, None] * BLOCK + jnp.arange(BLOCK, dtype=ids.dtype)[None, :]).reshape(size * BLOCK)]


def _key_logits(q, k_ref, v_ref, mask_ref, cols_ref, first, size: int, qk_scale, precision):
    """Key blocks ``cols_ref[first : first + size]`` of the current (b, h): their keys, values and the base-2 logits
    of ``q`` (``[32, size·32]``, -inf at padding)."""
    k = _gather(k_ref, cols_ref, first, size)
    v = _gather(v_ref, cols_ref, first, size)
    s = _dot(q, k, (1, 1), precision) * qk_scale
    if mask_ref is not None:
        s = jnp.where(_gather(mask_ref, cols_ref, first, size)[None, :] != 0, s, _NEG_INF)
    return k, v, s


class _Specs:
    """Block specs over ``[B, S, H, d]`` arrays for a grid ``(block, bh)`` with ``h`` heads."""

    def __init__(self, s: int, h: int, dp: int):
        self.s, self.h, self.dp = s, h, dp

    def block(self):  # the program's 32 tokens of one (b, h)
        return pl.BlockSpec((None, BLOCK, None, self.dp), lambda i, r: (r // self.h, i, r % self.h, 0))

    def sequence(self):  # the whole sequence of one (b, h)
        return pl.BlockSpec((None, self.s, None, self.dp), lambda i, r: (r // self.h, 0, r % self.h, 0))

    def block_stat(self):  # [B, S, H] statistics of the program's 32 tokens
        return pl.BlockSpec((None, BLOCK, None), lambda i, r: (r // self.h, i, r % self.h))

    def sequence_stat(self):
        return pl.BlockSpec((None, self.s, None), lambda i, r: (r // self.h, 0, r % self.h))

    def mask(self, whole: bool):  # [B, S] key mask: the whole sequence or the program's block
        if whole:
            return pl.BlockSpec((None, self.s), lambda i, r: (r // self.h, 0))
        return pl.BlockSpec((None, BLOCK), lambda i, r: (r // self.h, i))

    def block_row(self):  # one [d] row of a [B, n, H, d] per-block array (block sums and their cotangents)
        return pl.BlockSpec((None, None, None, self.dp), lambda i, r: (r // self.h, i, r % self.h, 0))

    def lists(self, length: int):  # a [B·H, length] CSR array
        return pl.BlockSpec((None, length), lambda i, r: (r, 0))


def _prepare(q, k, v, key_mask):
    b, s, h, d = q.shape
    dp = _padded_dim(d)
    return (b, s, h, d, dp), _Specs(s, h, dp), [_pad_last(x, dp) for x in (q, k, v)], key_mask is not None


# ----------------------------------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(start_ref, count_ref, cols_ref, q_ref, k_ref, v_ref, *refs, qk_scale, precision, masked, chunk,
                merged, full, eps):
    mask_ref = refs[0] if masked else None  # the whole sequence's key mask
    qmask_ref = refs[1] if masked and merged else None  # this block's tokens
    low_refs = refs[-4:-2] if full else None  # this query block's low-resolution part: u [d], (z, rm) [2]
    o_ref, lse_ref = refs[-2:]
    i = pl.program_id(0)
    start = start_ref[i]
    q = q_ref[...]

    def step(first, size, carry):
        acc, m, denom = carry
        _, v, s = _key_logits(q, k_ref, v_ref, mask_ref, cols_ref, first, size, qk_scale, precision)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0), precision)
        return acc, m_new, denom

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((BLOCK,), _NEG_INF, jnp.float32),
        jnp.zeros((BLOCK,), jnp.float32),
    )
    acc, m, denom = _over_list(start, count_ref[i], chunk, step, init)
    pos = denom > 0.0
    denom_safe = jnp.where(pos, denom, 1.0)
    o = jnp.where(pos[:, None], acc / denom_safe[:, None], 0.0)
    lse = jnp.where(pos, (m + jnp.log2(denom_safe)) * _LN2, _NEG_INF)
    if merged:  # MRA's output in the epilogue: o never goes to memory
        low = (low_refs[0][...][None, :], low_refs[1][0], low_refs[1][1]) if full else None
        o = merge(o, lse, low, eps)
        if qmask_ref is not None:
            o = jnp.where(qmask_ref[...][:, None] != 0, o, 0.0)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def attention_forward(q, k, v, layout: BlockLayout, key_mask, *, sm_scale: float, interpret=False,
                      merge_eps: float | None = None, low=None):
    """``o`` [B, S, H, d] (q.dtype) and ``lse`` [B, S, H] float32 (arguments checked by ``ops``).

    With ``merge_eps`` the first output is MRA's merged output instead of ``o`` (:func:`~pallas_kernels.merge.merge`
    of ``o``, ``lse`` and ``low = (u [B, n, H, d], z [B, n, H], rm [B, n, H])`` float32 or ``None``, zero at padded
    queries), computed in the epilogue.
    """
    (b, s, h, d, dp), spec, (qp, kp, vp), masked = _prepare(q, k, v, key_mask)
    n, kk = s // BLOCK, layout.row_cols.shape[-1]
    merged, full = merge_eps is not None, low is not None
    if full and not merged:
        raise ValueError("a low-resolution part needs merge_eps")
    kernel = functools.partial(_fwd_kernel, qk_scale=sm_scale * _LOG2E, precision=matmul_precision(q.dtype),
                               masked=masked, chunk=_launch("fwd", q.dtype, dp)[2], merged=merged, full=full,
                               eps=merge_eps)
    extra_specs = [spec.mask(whole=True)] * masked + [spec.mask(whole=False)] * (masked and merged)
    extra = [key_mask] * masked + [key_mask] * (masked and merged)
    if full:
        u, z, rm = low
        extra_specs += [spec.block_row(), pl.BlockSpec((None, None, None, 2), lambda i, r: (r // h, i, r % h, 0))]
        extra += [_pad_last(u.astype(jnp.float32), dp), jnp.stack([z, rm], axis=-1).astype(jnp.float32)]
    o, lse = _call(
        kernel, "fwd", q.dtype, dp,
        out_shape=(jax.ShapeDtypeStruct((b, s, h, dp), q.dtype), jax.ShapeDtypeStruct((b, s, h), jnp.float32)),
        grid=(n, b * h),
        in_specs=[spec.lists(n), spec.lists(n), spec.lists(kk), spec.block(), spec.sequence(), spec.sequence(),
                  *extra_specs],
        out_specs=(spec.block(), spec.block_stat()),
        interpret=interpret,
    )(layout.row_start, layout.row_count, layout.row_cols, qp, kp, vp, *extra)
    return o[..., :d], lse


# ----------------------------------------------------------------------------------------------------------------------
# backward


def _with_block_grad(grad, block_grad_ref, token_mask_ref):
    """``grad`` [32, d] of one block plus the cotangent of that block's (masked) token sum: ``block_grad`` [d] added
    to each token of the block (each unpadded token when there is a mask)."""
    if block_grad_ref is None:
        return grad
    add = block_grad_ref[...][None, :]
    if token_mask_ref is not None:
        add = jnp.where(token_mask_ref[...][:, None] != 0, add, 0.0)
    return grad + add


def _dq_kernel(start_ref, count_ref, cols_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, qk_scale,
               sm_scale, precision, masked, summed, chunk):
    mask_ref = refs[0] if masked else None  # the whole sequence's key mask
    qmask_ref = refs[1] if masked and summed else None  # this block's tokens
    dsum_ref = refs[-2] if summed else None
    dq_ref = refs[-1]
    i = pl.program_id(0)
    start = start_ref[i]
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    lse2 = jnp.where(lse == _NEG_INF, 0.0, lse * _LOG2E)  # such rows see no valid key: every p below is 0
    delta = delta_ref[...]

    def step(first, size, dq):
        k, v, s = _key_logits(q, k_ref, v_ref, mask_ref, cols_ref, first, size, qk_scale, precision)
        p = jnp.exp2(s - lse2[:, None])
        ds = p * (_dot(do, v, (1, 1), precision) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0), precision)

    dq = _over_list(start, count_ref[i], chunk, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = _with_block_grad(dq * sm_scale, dsum_ref, qmask_ref).astype(dq_ref.dtype)


def _dkv_kernel(start_ref, count_ref, rows_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, qk_scale,
                sm_scale, precision, masked, summed, chunk):
    mask_ref = refs[0] if masked else None  # this key block's tokens
    dk_sum_ref, dv_sum_ref = refs[-4:-2] if summed else (None, None)
    dk_ref, dv_ref = refs[-2:]
    c = pl.program_id(0)
    start = start_ref[c]
    k = k_ref[...]
    v = v_ref[...]

    def step(first, size, carry):
        dk, dv = carry
        q, do, lse, delta = (_gather(ref, rows_ref, first, size) for ref in (q_ref, do_ref, lse_ref, delta_ref))
        lse2 = jnp.where(lse == _NEG_INF, 0.0, lse * _LOG2E)
        s = _dot(q, k, (1, 1), precision) * qk_scale
        if masked:
            s = jnp.where(mask_ref[...][None, :] != 0, s, _NEG_INF)
        p = jnp.exp2(s - lse2[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0), precision)
        ds = p * (_dot(do, v, (1, 1), precision) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0), precision)
        return dk, dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _over_list(start, count_ref[c], chunk, step, init)
    dk_ref[...] = _with_block_grad(dk * sm_scale, dk_sum_ref, mask_ref).astype(dk_ref.dtype)
    dv_ref[...] = _with_block_grad(dv, dv_sum_ref, mask_ref).astype(dv_ref.dtype)


def _backward_kwargs(name: str, q, dp: int, sm_scale: float, masked: bool, summed: bool) -> dict:
    return dict(qk_scale=sm_scale * _LOG2E, sm_scale=sm_scale, precision=matmul_precision(q.dtype), masked=masked,
                summed=summed, chunk=_launch(name, q.dtype, dp)[2])


def attention_dq(q, k, v, layout: BlockLayout, key_mask, lse, do, delta, *, sm_scale: float, interpret=False,
                 block_grad=None):
    """dQ [B, S, H, d]; ``delta = rowsum(o * do) - dlse`` and ``lse`` are [B, S, H] float32.

    ``block_grad`` [B, n, H, d] float32 (optional): the cotangent of the masked block sums of ``q``, added to each
    unpadded token of its block in the epilogue (the gradient of MRA's block means, without a pass over dQ).
    """
    (b, s, h, d, dp), spec, (qp, kp, vp), masked = _prepare(q, k, v, key_mask)
    n, kk = s // BLOCK, layout.row_cols.shape[-1]
    summed = block_grad is not None
    extra_specs = [spec.mask(whole=True)] * masked + [spec.mask(whole=False)] * (masked and summed)
    extra = [key_mask] * masked + [key_mask] * (masked and summed)
    if summed:
        extra_specs.append(spec.block_row())
        extra.append(_pad_last(block_grad, dp))
    dq = _call(
        functools.partial(_dq_kernel, **_backward_kwargs("dq", q, dp, sm_scale, masked, summed)), "dq", q.dtype, dp,
        out_shape=jax.ShapeDtypeStruct((b, s, h, dp), q.dtype),
        grid=(n, b * h),
        in_specs=[spec.lists(n), spec.lists(n), spec.lists(kk), spec.block(), spec.sequence(), spec.sequence(),
                  spec.block(), spec.block_stat(), spec.block_stat(), *extra_specs],
        out_specs=spec.block(),
        interpret=interpret,
    )(layout.row_start, layout.row_count, layout.row_cols, qp, kp, vp, _pad_last(do, dp), lse, delta, *extra)
    return dq[..., :d]


def attention_dkv(q, k, v, layout: BlockLayout, key_mask, lse, do, delta, *, sm_scale: float, interpret=False,
                  block_grads=None):
    """(dK, dV) [B, S, H, d] via the column view; key blocks nobody selected get zeros (plus ``block_grads``).

    ``block_grads`` (optional): the cotangents ``(dk_sum, dv_sum)`` [B, n, H, d] float32 of the masked block sums of
    ``k`` and ``v``, added in the epilogue as in `attention_dq`.
    """
    (b, s, h, d, dp), spec, (qp, kp, vp), masked = _prepare(q, k, v, key_mask)
    n, kk = s // BLOCK, layout.col_rows.shape[-1]
    summed = block_grads is not None
    extra_specs = [spec.mask(whole=False)] * masked + [spec.block_row()] * (2 * summed)
    extra = [key_mask] * masked + [_pad_last(g, dp) for g in (block_grads if summed else ())]
    dk, dv = _call(
        functools.partial(_dkv_kernel, **_backward_kwargs("dkv", q, dp, sm_scale, masked, summed)), "dkv", q.dtype, dp,
        out_shape=(jax.ShapeDtypeStruct((b, s, h, dp), k.dtype), jax.ShapeDtypeStruct((b, s, h, dp), v.dtype)),
        grid=(n, b * h),
        in_specs=[spec.lists(n), spec.lists(n), spec.lists(kk), spec.sequence(), spec.block(), spec.block(),
                  spec.sequence(), spec.sequence_stat(), spec.sequence_stat(), *extra_specs],
        out_specs=(spec.block(), spec.block()),
        interpret=interpret,
    )(layout.col_start, layout.col_count, layout.col_rows, qp, kp, vp, _pad_last(do, dp), lse, delta, *extra)
    return dk[..., :d], dv[..., :d]
